"""Continuous interpolant flow (SiT): x_t = alpha_t x0 + sigma_t eps, velocity prediction.

Convention: t=0 is data, t=1 is noise (SiT). Paths:
  * linear: alpha = 1-t, sigma = t (velocity target eps - x0)
  * cosine: alpha = cos(pi t/2), sigma = sin(pi t/2)
Time sampling: uniform t~U(0,1), or lognormal: s = exp(n), n~N(mean,std), t = s/(1+s) (linear) or
(2/pi) atan(s) (cosine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PATHS = ("linear", "cosine")
TIME_SAMPLINGS = ("uniform", "lognormal")


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B,1,...,1) broadcastable against ``like``."""
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


@dataclass
class Corrupted:
    """One corrupted batch: inputs and the regression target for the network."""

    x_t: torch.Tensor  # (B, ...) noisy input
    t: torch.Tensor  # (B,) times in [0,1]
    target: torch.Tensor  # (B, ...) velocity target
    noise: torch.Tensor  # (B, ...) the eps used


class FlowProcess:
    """Interpolant flow with velocity prediction."""

    def __init__(self, path: str = "linear", time_sampling: str = "uniform", lognormal_mean: float = 0.0,
                 lognormal_std: float = 1.0):
        if path not in PATHS:
            raise ValueError(f"unknown path '{path}', expected one of {PATHS}")
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time sampling '{time_sampling}', expected one of {TIME_SAMPLINGS}")
        self.path = path
        self.time_sampling = time_sampling
        self.lognormal_mean = lognormal_mean
        self.lognormal_std = lognormal_std

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(alpha, sigma, d alpha/dt, d sigma/dt) at times ``t`` (any shape)."""
        if self.path == "linear":
            return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
        half_pi = math.pi / 2
        return (torch.cos(half_pi * t), torch.sin(half_pi * t), -half_pi * torch.sin(half_pi * t),
                half_pi * torch.cos(half_pi * t))

    def sample_time(self, batch: int, *, generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu") -> torch.Tensor:
        """Training times (B,) float32 on ``device``."""
        if self.time_sampling == "uniform":
            return torch.rand(batch, generator=generator, device=device)
        n = torch.randn(batch, generator=generator, device=device) * self.lognormal_std + self.lognormal_mean
        s = torch.exp(n)
        return s / (1 + s) if self.path == "linear" else (2 / math.pi) * torch.atan(s)

    def interpolate(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t eps; x0, noise (B,...), t (B,)."""
        a, s, _, _ = self.coefficients(_expand(t, x0))
        return a * x0 + s * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Velocity target d x_t / dt = alpha'_t x0 + sigma'_t eps; (B,...)."""
        _, _, da, ds = self.coefficients(_expand(t, x0))
        return da * x0 + ds * noise

    def corrupt(self, x0: torch.Tensor, *, generator: torch.Generator | None = None) -> Corrupted:
        """Draw t and eps for a clean batch ``x0`` (B,...) and return the network input and target."""
        t = self.sample_time(x0.shape[0], generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return Corrupted(self.interpolate(x0, noise, t), t, self.velocity(x0, noise, t), noise)

    @staticmethod
    def loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample denoising loss: mean over all non-batch dims of (pred - target)^2, in fp32; (B,)."""
        return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)

    def score_from_velocity(self, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Score of p_t from a velocity: s = (a v - x)/(sigma^2 - a sigma' sigma), a = alpha/alpha' (spec §7).

        For the linear path this is ((t-1) v - x)/t. ``t`` (B,) must be > 0.
        """
        alpha, sigma, da, ds = self.coefficients(_expand(t, x))
        a = alpha / da
        return (a * v - x) / (sigma**2 - a * ds * sigma)
