"""Distillation loss of AST (section 4.2): CE + alpha * KL(teacher || student) at temperature T."""

from __future__ import annotations

import torch
import torch.nn.functional as F

KL_CHUNK_TOKENS = 8  # 8 rows x 49k vocab in fp32 = 1.5 MB: the ~10 passes over a chunk stay in a core's L2 cache


def kl_distill_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · Σ_tokens Σ_vocab p_t (log p_t - log p_s)`` at temperature ``T``, summed (not averaged) over tokens.

    Summing lets the caller divide by the same token count as the cross-entropy (``num_items_in_batch`` under
    gradient accumulation). ``T²`` keeps gradient magnitudes comparable across temperatures (Hinton et al.).
    This is the plain reference; training uses :func:`chunked_kl_distill_sum`, which returns the same value.
    """
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="sum") * temperature**2


class _ChunkedDistill(torch.autograd.Function):
    """``α · kl_distill_sum`` (plus the summed cross-entropy against ``targets`` when given) over row chunks, with no
    full-size fp32 copy of either logits tensor.

    Each chunk's softmaxes are computed once: the forward also writes the chunk's gradient into one buffer in the
    student's dtype (``∂ α·T²·KL / ∂z = α·T·(q_T - p_t)``, plus ``softmax(z) - onehot(target)`` for the CE), which
    the backward scales in place and returns. So the backward costs one multiply, and between the passes autograd
    holds that one buffer (the size of the gradient it replaces) instead of the softmaxes. Fusing the CE in saves
    the model's own loss its full-size log-softmax, its backward and the sum of the two gradients.
    """

    @staticmethod
    def forward(ctx, student, teacher, rows, targets, temperature, alpha, chunk):
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        direction = torch.empty_like(student)
        if rows.numel() < student.shape[0]:  # unscored rows get no gradient
            unscored = torch.ones(student.shape[0], dtype=torch.bool, device=student.device)
            unscored[rows] = False
            direction[unscored] = 0
        for start in range(0, rows.numel(), chunk):
            index = rows[start:start + chunk]
            logits = student.index_select(0, index).float()
            log_q = F.log_softmax(logits / temperature, dim=-1)
            log_p = F.log_softmax(teacher.index_select(0, index).float().div_(temperature), dim=-1)
            p = log_p.exp()
            total += torch.sub(log_p, log_q).mul_(p).sum() * (alpha * temperature**2)
            grad = log_q.exp_().sub_(p).mul_(alpha * temperature)
            if targets is not None:
                target = targets[start:start + chunk].unsqueeze(1)
                log_s = F.log_softmax(logits, dim=-1)
                total -= log_s.gather(1, target).sum()
                grad.add_(log_s.exp_()).scatter_add_(1, target, torch.full_like(target, -1, dtype=grad.dtype))
            direction.index_copy_(0, index, grad.to(student.dtype))
        ctx.save_for_backward(direction)
        return total

    @staticmethod
    def backward(ctx, grad):
        (direction,) = ctx.saved_tensors
        return direction.mul_(grad), None, None, None, None, None, None


def _flat(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both ``[..., vocab]`` logits as ``[tokens, vocab]``; refuses teachers with another vocabulary."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"Student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: the teacher must share the student's vocabulary.")
    vocab = student_logits.shape[-1]
    return student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)


def chunked_kl_distill_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    rows: torch.Tensor | None = None,
    chunk_tokens: int = KL_CHUNK_TOKENS,
) -> torch.Tensor:
    """:func:`kl_distill_sum` of the ``rows`` of ``[..., vocab]`` logits (all rows if ``None``), in token chunks.

    Selecting rows inside the function avoids the gathered copies that ``logits[mask]`` would make (and keep for the
    backward); the chunks bound the fp32 work memory to ``chunk_tokens`` rows per tensor.
    """
    student, teacher = _flat(student_logits, teacher_logits)
    rows = torch.arange(student.shape[0], device=student.device) if rows is None else rows.to(student.device)
    if rows.numel() == 0:
        return student.sum() * 0.0  # nothing scored: a zero that still joins the graph
    return _ChunkedDistill.apply(student, teacher, rows, None, temperature, 1.0, chunk_tokens)


def ce_kl_distill_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
    ignore_index: int = -100,
    chunk_tokens: int = KL_CHUNK_TOKENS,
) -> torch.Tensor:
    """``Σ CE(student, targets) + α · kl_distill_sum`` over the rows whose target is not ``ignore_index``, fused.

    ``targets`` are per-row (already shifted for a causal LM). The same value as the two computed apart
    (``F.cross_entropy(..., reduction="sum")`` plus :func:`kl_distill_sum`), in one chunked pass.
    """
    student, teacher = _flat(student_logits, teacher_logits)
    targets = targets.reshape(-1).to(student.device)
    rows = (targets != ignore_index).nonzero().squeeze(1)
    if rows.numel() == 0:
        return student.sum() * 0.0
    return _ChunkedDistill.apply(student, teacher, rows, targets[rows], temperature, alpha, chunk_tokens)


def shifted_token_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose logits predict a real next token (causal-LM shift, ``-100`` ignored): ``[B, S-1]``."""
    return labels[..., 1:] != -100


def scored_rows(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices into ``[B * S]`` of the positions whose logits predict a scored token (see above)."""
    scored = F.pad(shifted_token_mask(labels), (0, 1), value=False)
    return scored.flatten().nonzero().squeeze(1)
