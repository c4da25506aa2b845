"""Fixed token windows as a causal-LM training set (e.g. from :func:`peft_sparse.data.load_calibration`)."""

from __future__ import annotations

import torch


class TokenWindowDataset(torch.utils.data.Dataset):
    """Each row of a ``(n, seqlen)`` LongTensor is one example; labels are the inputs (the model shifts them)."""

    def __init__(self, windows: torch.Tensor):
        if windows.dim() != 2 or windows.dtype.is_floating_point or windows.dtype == torch.bool:
            raise ValueError(
                f"windows must be integer token ids of shape (n, seqlen), got {tuple(windows.shape)} {windows.dtype}."
            )
        self.windows = windows.long()

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[index], "labels": self.windows[index]}
