"""Which modules of a model are N:M sparse, and how their weights are oriented.

The one answer that pruning, sparse training, the tuners and export all ask:

* sparse layer types: ``nn.Linear`` and GPT-2's ``transformers`` ``Conv1D`` (``isinstance``, so subclasses count);
* orientation: every algorithm works on the ``(out, in)`` view, where rows are output features and N:M groups run
  along the inputs. ``Linear`` stores ``(out, in)``, ``Conv1D`` stores ``(in, out)``;
* default selection: every sparse layer inside the decoder blocks, so embeddings, ``lm_head`` and layers outside the
  blocks (OPT-350m's ``project_in`` / ``project_out``, classification heads) stay dense unless named in ``targets``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

SPARSE_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)


def is_sparse_layer(module: nn.Module) -> bool:
    return isinstance(module, SPARSE_LAYER_TYPES)


def out_in(module: nn.Module) -> torch.Tensor:
    """The weight as an ``(out, in)`` view (no copy): writes through it reach the parameter."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def to_storage(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """Bring an ``(out, in)`` tensor (weight, mask, delta) back to ``module``'s storage orientation."""
    return tensor.t() if isinstance(module, Conv1D) else tensor


def check_sparse_layer(module: nn.Module, user: str, name: str = "") -> None:
    """Fail early, naming the layer type, for anything ``user`` cannot handle."""
    if not is_sparse_layer(module):
        raise TypeError(
            f"{user} supports torch.nn.Linear and transformers Conv1D, but {name or 'the target'} is "
            f"{type(module).__name__}; leave it out of the targets."
        )


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The outermost ``nn.ModuleList`` holding ``config.num_hidden_layers`` modules, with its qualified name."""
    config = getattr(model, "config", None)
    num_layers = getattr(config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and num_layers is not None and len(module) == num_layers:
            return name, module
    model_type = getattr(config, "model_type", type(model).__name__)
    raise ValueError(
        f"Cannot find the decoder blocks of model type {model_type!r}: no nn.ModuleList of length "
        f"config.num_hidden_layers={num_layers}. peft_sparse supports decoder-only causal LMs whose blocks sit in "
        "one nn.ModuleList (Llama, Mistral, Qwen2, Gemma, Phi, OPT, GPT-2, GPT-NeoX, ...)."
    )


def compile_patterns(patterns: Iterable[str], key: str) -> list[re.Pattern[str]]:
    if isinstance(patterns, str):
        raise TypeError(f"{key} is a list of regular expressions, not a single string: use [{patterns!r}].")
    try:
        return [re.compile(p) for p in patterns]
    except re.error as exc:
        raise ValueError(f"Invalid regular expression in {key}: {exc}.") from None


def select_sparse_modules(
    model: nn.Module, targets: Iterable[str] | None = None, ignore: Iterable[str] = ()
) -> dict[str, nn.Module]:
    """The modules to make sparse, by qualified name, in model order.

    Args:
        targets: regular expressions (``re.search``) over module names; ``None`` selects every Linear / Conv1D
            inside the decoder blocks. Only sparse layer types are ever selected.
        ignore: regular expressions of module names to leave dense.

    Raises before anything is changed when nothing is left to select.
    """
    wanted = None if targets is None else compile_patterns(targets, "targets")
    skipped = compile_patterns(ignore, "ignore")
    prefix = f"{find_decoder_blocks(model)[0]}." if wanted is None else ""
    selected = {
        name: module
        for name, module in model.named_modules()
        if is_sparse_layer(module)
        and (name.startswith(prefix) if wanted is None else any(p.search(name) for p in wanted))
        and not any(p.search(name) for p in skipped)
    }
    if not selected:
        example = next((name for name, module in model.named_modules() if is_sparse_layer(module)), "<none>")
        raise ValueError(
            f"No Linear/Conv1D layer selected (targets={targets}, ignore={[p.pattern for p in skipped]}); layer "
            f"names look like {example!r}."
        )
    return selected
