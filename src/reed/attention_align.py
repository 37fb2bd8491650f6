"""Attention-map alignment (HASTE, arXiv 2505.16792; spec methods.md §3): distil a teacher's attention into
mid-level denoiser blocks.

For paired (student block, teacher block) and each kept head, rows of pre-softmax attention logits (B, H, T, T)
become distributions over keys; the loss is the cross-entropy of the student's rows under the teacher's:

    L_attn = mean_pairs mean_rows [ - sum_keys p_T log p_S ]

a KL(p_T || p_S) plus the teacher's entropy, so its minimum is H(p_T), not 0. Computed with ``log_softmax`` in
fp32 (the reference takes the log of an fp16 softmax and can produce NaN).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def attention_cross_entropy(student: Tensor, teacher: Tensor) -> Tensor:
    """Per-sample cross-entropy (B,) of student logits under teacher logits, both (B, H, T, T) with T keys per row;
    the mean over heads and rows."""
    if student.shape != teacher.shape:
        raise ValueError(f"student attention {tuple(student.shape)} != teacher attention {tuple(teacher.shape)}")
    log_ps = torch.log_softmax(student.float(), dim=-1)
    pt = torch.softmax(teacher.float(), dim=-1)
    return -(pt * log_ps).sum(-1).flatten(1).mean(1)


def attention_alignment(student: Sequence[Tensor], teacher: Sequence[Tensor], heads: int | None = None) -> Tensor:
    """HASTE's L_attn per sample (B,): the mean over block pairs of :func:`attention_cross_entropy`, keeping the
    first ``heads`` heads of the student and the teacher (all when None; the reference keeps 12)."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"attention alignment needs as many student as teacher maps, got {len(student)} and "
                         f"{len(teacher)}")
    terms = [attention_cross_entropy(s[:, :heads], t[:, :heads]) for s, t in zip(student, teacher)]
    return torch.stack(terms).mean(0)
