"""Curriculum: loss weights as pure functions of the training step, and alignment time weights s(t).

The REED curriculum phases the generative loss in (an optional alignment-only phase, then a linear ramp)
while the alignment weight stays constant or decays. Steps are 0-based optimizer steps.
The reference code has two bugs here, both fixed (spec image.md section 3):

* cosine generative decay: the reference computes ``cos(pi*(s-top)/total - top)``; we use
  ``0.5*(1 + cos(pi*(s-top)/(total-top)))``.
* cosine alignment decay: the reference never clamps ``s`` and the weight rises again after ``steps``;
  we clamp so it stays at 0.
"""

from __future__ import annotations

import math

import torch

DECAYS = ("constant", "linear", "cosine")


def _check_decay(decay: str) -> None:
    if decay not in DECAYS:
        raise ValueError(f"unknown decay '{decay}', expected one of {DECAYS}")


def generative_weight(step: int, *, start: int = 0, warmup: int = 0, decay: str = "constant", total: int = 0) -> float:
    """Weight of the generative (denoising) loss at ``step``.

    0 before ``start``; a linear ramp ``(step-start)/warmup`` over ``warmup`` steps; after the ramp
    (at ``top = start + warmup``) 1 for ``constant``, ``1-(step-top)/(total-top)`` for ``linear`` or
    ``0.5*(1+cos(pi*(step-top)/(total-top)))`` for ``cosine``, reaching 0 at ``total`` and staying there.
    """
    _check_decay(decay)
    if step < start:
        return 0.0
    if warmup > 0 and step < start + warmup:
        return (step - start) / warmup
    if decay == "constant":
        return 1.0
    top = start + warmup
    if total <= top:
        raise ValueError(f"generative_weight: total ({total}) must exceed start + warmup ({top}) for '{decay}' decay")
    frac = min(step - top, total - top) / (total - top)
    if decay == "linear":
        return 1.0 - frac
    return 0.5 * (1.0 + math.cos(math.pi * frac))


def alignment_weight(step: int, *, decay: str = "constant", steps: int = 0, stop: int = 0) -> float:
    """Weight of the alignment loss at ``step``: 1 (``constant``), ``max(1-step/steps, 0)`` (``linear``) or
    ``0.5*(1+cos(pi*min(step,steps)/steps))`` (``cosine``); 0 after ``steps`` and never rising again.

    ``stop`` > 0 is a hard stop (HASTE's termination): 0 from step ``stop`` on, whatever the decay, so steps
    ``0 .. stop-1`` are aligned.
    """
    _check_decay(decay)
    if stop > 0 and step >= stop:
        return 0.0
    if decay == "constant":
        return 1.0
    if steps <= 0:
        raise ValueError(f"alignment_weight: steps must be > 0 for '{decay}' decay, got {steps}")
    frac = min(step, steps) / steps
    if decay == "linear":
        return 1.0 - frac
    return 0.5 * (1.0 + math.cos(math.pi * frac))


def time_weight(t: torch.Tensor, schedule: str = "constant", cutoffs: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Per-sample alignment weight s(t) for times ``t`` (B,) (t=0 data, t=1 noise); returns (B,) float32.

    constant 1 | linear 1-t | cosine 0.5(1+cos(pi t)) | sigmoid 1/(1+exp(10(t-0.5))) | loglinear 1-ln(1+t) |
    cutoff 1 on [cutoffs[0], cutoffs[1]] else 0. Multiplied per sample with the per-sample alignment loss
    (the reference broadcast (B,1,1,1)x(B,) and got mean(w)*mean(loss) instead).
    """
    t = t.float().reshape(-1)
    if schedule == "constant":
        return torch.ones_like(t)
    if schedule == "linear":
        return 1.0 - t
    if schedule == "cosine":
        return 0.5 * (1.0 + torch.cos(math.pi * t))
    if schedule == "sigmoid":
        return torch.sigmoid(-10.0 * (t - 0.5))
    if schedule == "loglinear":
        return 1.0 - torch.log1p(t)
    if schedule == "cutoff":
        lo, hi = cutoffs
        return ((t >= lo) & (t <= hi)).float()
    raise ValueError(f"unknown time-weight schedule '{schedule}'")
