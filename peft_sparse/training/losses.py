"""Distillation loss of AST (section 4.2): CE + alpha * KL(teacher || student) at temperature T."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_distill_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · Σ_tokens Σ_vocab p_t (log p_t - log p_s)`` at temperature ``T``, summed (not averaged) over tokens.

    Summing lets the caller divide by the same token count as the cross-entropy (``num_items_in_batch`` under
    gradient accumulation). ``T²`` keeps gradient magnitudes comparable across temperatures (Hinton et al.).
    """
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="sum") * temperature**2


def shifted_token_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose logits predict a real next token (causal-LM shift, ``-100`` ignored): ``[B, S-1]``."""
    return labels[..., 1:] != -100
