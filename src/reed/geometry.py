"""Point-cloud geometry shared by the domains: masked centring, Kabsch superposition and RMSD.

One implementation, in torch, batched over any leading dimensions with per-point weights or a boolean mask.
Every function accepts torch tensors or numpy arrays and returns the same kind: tensors keep the input's floating
dtype (float32 for integer input) and device, numpy input gives float64 numpy output. Kabsch and RMSD compute in
float64 whatever the input dtype. Nothing is detached: on tensors the operations are ordinary torch ops (autograd
flows through them, through the SVD as well, whose gradient is ill-defined for degenerate point sets).

Conventions: coordinates ``(..., N, 3)``; weights/mask ``(..., N)`` (bool or non-negative numbers; the leading
dimensions broadcast against the coordinates'); the fit maps P onto Q: ``P @ R.transpose(-1, -2) + t ≈ Q``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["center", "centroid", "kabsch", "rmsd", "superpose"]


def _as_tensor(x: Any) -> Tensor:
    if isinstance(x, Tensor):
        return x
    a = np.asarray(x)
    if not a.flags.writeable or any(st < 0 for st in a.strides):  # torch refuses/warns (a[::-1], read-only views)
        a = a.copy()
    return torch.from_numpy(a)


def _out(x: Tensor, like: Any) -> Any:
    """``x`` in the kind of ``like``: numpy float64 for numpy input, else a tensor of like's float dtype/device."""
    if not isinstance(like, Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return x.to(dtype=dtype, device=like.device)


def _weights(w: Any, x: Tensor) -> Tensor:
    """Weights (..., N) as float64 on x's device; None -> ones."""
    if w is None:
        return torch.ones(x.shape[:-1], dtype=torch.float64, device=x.device)
    return _as_tensor(w).to(device=x.device, dtype=torch.float64)


def centroid(x: Tensor | np.ndarray, weights: Tensor | np.ndarray | None = None) -> Tensor | np.ndarray:
    """Weighted mean ``(..., 3)`` of the points ``(..., N, 3)`` (float64); 0 where the weights sum to 0."""
    xt = _as_tensor(x)
    w = _weights(weights, xt)
    x64 = xt.to(torch.float64)
    wsum = w.sum(-1, keepdim=True)
    c = (w[..., None] * x64).sum(-2) / torch.where(wsum > 0, wsum, torch.ones_like(wsum))
    return _out(c, x)


def center(x: Tensor | np.ndarray, mask: Tensor | np.ndarray | None = None) -> Tensor | np.ndarray:
    """Remove the mean over real points: ``x`` (..., N, 3), ``mask`` (..., N) bool (None: all points real).

    Returns (..., N, 3) in ``x``'s dtype (computed in it) with zero mean over each set's real points; masked rows
    are 0, and a set with no real points is all 0.
    """
    xt = _as_tensor(x)
    if not xt.is_floating_point():
        xt = xt.to(torch.float32 if isinstance(x, Tensor) else torch.float64)
    if mask is None:
        m = torch.ones(xt.shape[:-1] + (1,), dtype=torch.bool, device=xt.device)
    else:
        m = _as_tensor(mask).to(device=xt.device).bool()[..., None]
    zero = torch.zeros((), dtype=xt.dtype, device=xt.device)
    xm = torch.where(m, xt, zero)
    n = m.sum(dim=-2, keepdim=True).clamp(min=1).to(xt.dtype)  # (..., 1, 1)
    mean = xm.sum(dim=-2, keepdim=True) / n
    out = torch.where(m, xm - mean, zero)
    return out if isinstance(x, Tensor) else out.numpy()


def _kabsch64(P: Tensor, Q: Tensor, w: Tensor, centre: bool) -> tuple[Tensor, Tensor]:
    """float64 core: R (..., 3, 3), t (..., 3) minimising sum_n w_n |R p_n + t - q_n|^2 with det R = +1."""
    real = (w != 0)[..., None]
    p = torch.where(real, P.to(torch.float64), 0.0)  # ignored points: any value, even NaN, has no effect
    q = torch.where(real, Q.to(torch.float64), 0.0)
    wsum = w.sum(-1)  # (...)
    if centre:
        safe = torch.where(wsum > 0, wsum, torch.ones_like(wsum))[..., None]
        pc = torch.einsum("...n,...ni->...i", w, p) / safe
        qc = torch.einsum("...n,...ni->...i", w, q) / safe
        p = p - pc[..., None, :]
        q = q - qc[..., None, :]
    H = torch.einsum("...n,...ni,...nj->...ij", w, p, q)  # sum_n w_n p_n q_n^T
    U, _, Vh = torch.linalg.svd(H)
    V = Vh.transpose(-1, -2)
    Ut = U.transpose(-1, -2)
    d = torch.sign(torch.linalg.det(V @ Ut))
    d = torch.where(d == 0, torch.ones_like(d), d)
    ones = torch.ones_like(d)
    R = V @ torch.diag_embed(torch.stack([ones, ones, d], dim=-1)) @ Ut  # V diag(1, 1, d) U^T
    eye = torch.eye(3, dtype=R.dtype, device=R.device).expand_as(R)
    R = torch.where((wsum > 0)[..., None, None], R, eye)  # no weight at all: identity
    if centre:
        t = qc - torch.einsum("...ij,...j->...i", R, pc)
    else:
        t = torch.zeros(R.shape[:-1], dtype=R.dtype, device=R.device)
    return R, t


def kabsch(P: Tensor | np.ndarray, Q: Tensor | np.ndarray, weights: Tensor | np.ndarray | None = None, *,
           center: bool = True) -> tuple[Any, Any]:
    """Optimal proper rotation and translation superposing P onto Q (weighted least squares).

    P, Q (..., N, 3) with rows corresponding; ``weights`` (..., N) non-negative numbers or a bool mask (None: all
    1); leading dimensions broadcast, so e.g. P, Q (N, 3) with weights (S, N) fit S weightings at once. Returns
    R (..., 3, 3) with det R = +1 (a reflection is never used: when the best orthogonal fit is improper its last
    singular direction is flipped) and t (..., 3) minimising ``sum_n w_n |R p_n + t - q_n|^2``, i.e.
    ``P @ R.transpose(-1, -2) + t ≈ Q``. Points with weight 0 are ignored entirely (their coordinates may be
    anything finite or not). With ``center=False`` the inputs are taken as already centred: no translation is
    fitted and ``t`` is 0. A set whose weights sum to 0 gets the identity. Computed in float64; returned as P's
    kind (see the module docstring).
    """
    Pt, Qt = _as_tensor(P), _as_tensor(Q)
    Qt = Qt.to(device=Pt.device)
    R, t = _kabsch64(Pt, Qt, _weights(weights, Pt), center)
    return _out(R, P), _out(t, P)


def superpose(P: Tensor | np.ndarray, Q: Tensor | np.ndarray, weights: Tensor | np.ndarray | None = None
              ) -> Tensor | np.ndarray:
    """P (..., N, 3) moved by its Kabsch fit onto Q: ``P @ R.T + t`` (float64 arithmetic, P's kind)."""
    Pt, Qt = _as_tensor(P), _as_tensor(Q).to(device=_as_tensor(P).device)
    R, t = _kabsch64(Pt, Qt, _weights(weights, Pt), True)
    return _out(Pt.to(torch.float64) @ R.transpose(-1, -2) + t[..., None, :], P)


def rmsd(P: Tensor | np.ndarray, Q: Tensor | np.ndarray, weights: Tensor | np.ndarray | None = None, *,
         align: bool = True) -> Tensor | np.ndarray:
    """Root-mean-square deviation ``sqrt(sum_n w_n |p_n - q_n|^2 / sum_n w_n)`` between (..., N, 3) point sets,
    after the optimal proper superposition of P onto Q (:func:`kabsch`) when ``align``.

    Returns (...) in float64 arithmetic: a numpy array (0-d for a single pair; ``float()`` it) for numpy P, else a
    tensor of P's float dtype. NaN where the weights sum to 0.
    """
    Pt, Qt = _as_tensor(P), _as_tensor(Q)
    Qt = Qt.to(device=Pt.device)
    w = _weights(weights, Pt)
    p, q = Pt.to(torch.float64), Qt.to(torch.float64)
    if align:
        R, t = _kabsch64(p, q, w, True)
        p = p @ R.transpose(-1, -2) + t[..., None, :]
    sq = ((p - q) ** 2).sum(-1)
    msd = torch.where(w != 0, w * sq, 0.0).sum(-1) / w.sum(-1)
    return _out(msd.sqrt(), P)
