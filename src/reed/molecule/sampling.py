"""Euler / CTMC sampler for the molecule flow (:class:`reed.molecule.flow.MoleculeFlow`).

Time: library convention, t = 1 noise -> t = 0 data. The reference (SemlaFlow) integrates t_ref = 1 - t from 0 to 1;
every reference formula below is converted at the point of use.

Grids (:func:`time_grid`, ``steps`` + 1 points, decreasing):
  * "linear": t_k = 1 - k / steps (reference t_ref = 0, 0.01, ..., 1);
  * "log": t_k = 0.01 ** (k / steps), i.e. 1 -> 0.01 (the reference's t_ref = reversed(1 - geomspace(0.01, 1,
    steps + 1)) = 0, ≈0.045, ..., 0.99: a large first step and tiny final steps; it never reaches t_ref = 1).

The model is called ``steps`` times, at t_0 ... t_{steps-1}; step k moves from t_k to t_{k+1} (dt = t_k - t_{k+1}):
  * coordinates: Euler on the x̂0 velocity, x <- x + dt (x̂0 - x) / t_k (the reference's (x̂1 - x)/(1 - t_ref));
  * atom types and bonds: one CTMC jump (:func:`ctmc_step`) with the predicted probabilities; bonds are stepped on the
    strict upper triangle (probabilities symmetrised) and mirrored, so the state stays symmetric with zero diagonal
    (the reference stepped every ordered pair independently, spec §7.11); eta is 0 on the final step;
  * self-conditioning: zeros at the first call, then the previous prediction.

Returned sample: as in the reference (spec §1.9), the **last prediction**, not the integrated state: the x̂0
coordinates of the final model call, and the argmax of its type, bond (symmetrised) and charge logits. For an
x̂0-parameterised model called at t ≈ 0 this is the natural estimate of the clean molecule; the integrated state is
available through ``return_trajectory=True``. Note: the reference switched the CTMC noise off only where
t_ref + dt >= 1, which never happens on the log grid; here eta is zeroed on the final step on both grids.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from reed.molecule.flow import (
    MoleculeFlow,
    _upper_mirror,
    empty_self_condition,
    pair_mask,
    self_condition_inputs,
)

GRIDS = ("linear", "log")
CTMC_RATES = ("reference", "detailed_balance")
_T_EPS = 1e-5


def time_grid(steps: int, kind: str = "log") -> torch.Tensor:
    """(steps + 1,) float32 library times, decreasing from 1 (noise): "linear" ends at 0, "log" at 0.01."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    k = torch.arange(steps + 1, dtype=torch.float64) / steps
    if kind == "linear":
        t = 1.0 - k
    elif kind == "log":
        t = torch.pow(torch.tensor(0.01, dtype=torch.float64), k)
    else:
        raise ValueError(f"unknown grid '{kind}', expected one of {GRIDS}")
    return t.float()


def ctmc_step(current: torch.Tensor, probs: torch.Tensor, t: float | torch.Tensor, dt: float, eta: float,
              generator: torch.Generator | None = None, *, rate: str = "reference") -> torch.Tensor:
    """One Euler step of the "uniform" discrete-flow CTMC (Campbell et al. 2024) from library time t to t - dt.

    current (...,) int64 states, probs (...,K) predicted clean-class probabilities, t library time (float, or a tensor
    broadcastable to ``current``), dt > 0 step size, eta >= 0 noise level -> (...,) int64 new states.

    In reference time t_ref = 1 - t (clamped to [1e-5, 1 - 1e-5]) with c the current class, the probability of
    jumping to j != c is

        dt * [ (1 + 2 eta (K-1) t_ref) / (1 - t_ref) * p_j + eta * p_c ]      (rate="reference", SemlaFlow)

    clipped at 1; the stay probability is 1 minus their sum, floored at 0; one categorical draw per entry.

    Derivation check. For the uniform path p_t(x | x1) = t_ref δ(x, x1) + (1 - t_ref)/K, the minimal generating rate
    is δ(j, x1) / (1 - t_ref), and the detailed-balance noise rate that leaves the marginals unchanged is
    eta [δ(c, x1) + (1 + (K-1) t_ref)/(1 - t_ref) δ(j, x1)]. Averaging over x1 ~ p gives
    (1 + eta + eta (K-1) t_ref)/(1 - t_ref) p_j + eta p_c (``rate="detailed_balance"``, as in Campbell et al.).
    The reference's coefficient 2 eta (K-1) t_ref replaces eta (1 + (K-1) t_ref): it is still a valid (non-negative)
    CTMC and identical at eta = 0, but its noise term satisfies detailed balance only at t_ref = 1/(K-1); for larger
    t_ref it adds a net drift toward the predicted classes (for smaller t_ref, away from them). The reference formula
    is the default, for fidelity.
    """
    if rate not in CTMC_RATES:
        raise ValueError(f"unknown rate '{rate}', expected one of {CTMC_RATES}")
    K = probs.shape[-1]
    p = probs.float()
    cur = current.long().unsqueeze(-1)
    t_ref = (1.0 - torch.as_tensor(t, dtype=torch.float32, device=p.device)).clamp(_T_EPS, 1.0 - _T_EPS)
    if t_ref.dim() > 0:
        t_ref = t_ref.unsqueeze(-1)
    if rate == "reference":
        mult = (1.0 + 2.0 * eta * (K - 1) * t_ref) / (1.0 - t_ref)
    else:
        mult = (1.0 + eta + eta * (K - 1) * t_ref) / (1.0 - t_ref)
    p_cur = torch.gather(p, -1, cur)
    step = (dt * (mult * p + eta * p_cur)).clamp(max=1.0)
    step = step.scatter(-1, cur, 0.0)
    stay = (1.0 - step.sum(dim=-1, keepdim=True)).clamp(min=0.0)
    step = step.scatter(-1, cur, stay)
    # one categorical draw per entry by inverse CDF
    cdf = step.cumsum(dim=-1)
    u = torch.rand(cdf.shape[:-1] + (1,), generator=generator, device=p.device) * cdf[..., -1:]
    return (cdf <= u).sum(dim=-1).clamp(max=K - 1)


def _sym_probs(bond_logits: torch.Tensor) -> torch.Tensor:
    """(B,N,N,C) logits -> (B,N,N,C) probabilities averaged over (i,j) and (j,i)."""
    p = bond_logits.float().softmax(dim=-1)
    return 0.5 * (p + p.transpose(1, 2))


@torch.no_grad()
def sample_molecules(model_fn: Callable[..., dict], num_atoms: torch.Tensor, num_atom_types: int, *,
                     flow: MoleculeFlow, steps: int = 100, grid: str = "log", eta: float = 1.0,
                     generator: torch.Generator | None = None, self_condition: bool = True,
                     device: torch.device | str = "cpu", return_trajectory: bool = False,
                     ctmc_rate: str = "reference") -> dict:
    """Generate molecules with given atom counts.

    model_fn(x_t (B,N,3), types_t (B,N), bonds_t (B,N,N), t (B,) library time, mask (B,N), self_cond dict | None)
    -> {"coords" (B,N,3) x̂0, "types" (B,N,K_atom), "bonds" (B,N,N,5), "charges" (B,N,7) logits}.
    num_atoms (B,) int atom counts; N = max(num_atoms).

    Returns {"coords" (B,N,3) normalised units (last x̂0), "types" (B,N), "bonds" (B,N,N) symmetric, zero diagonal,
    "charges" (B,N) (argmax of the last prediction), "mask" (B,N) bool}; padding entries are 0. With
    ``return_trajectory``, also "trajectory": {"t" (S+1,), "coords" (S+1,B,N,3), "types" (S+1,B,N),
    "bonds" (S+1,B,N,N) integrated states (index 0 the prior, index S the final state), "pred_coords" (S,B,N,3)}.
    """
    if num_atom_types != flow.num_atom_types:
        raise ValueError(f"num_atom_types={num_atom_types} but flow.num_atom_types={flow.num_atom_types}")
    num_atoms = torch.as_tensor(num_atoms, device=device).long().reshape(-1)
    if num_atoms.numel() == 0 or int(num_atoms.min()) < 1:
        raise ValueError("num_atoms must be a non-empty tensor of positive counts")
    B, N = num_atoms.numel(), int(num_atoms.max())
    mask = torch.arange(N, device=device)[None, :] < num_atoms[:, None]
    pm = pair_mask(mask)
    m3 = mask[..., None].float()
    x, types, bonds = flow.prior(mask, generator=generator)
    ts = time_grid(steps, grid)
    sc = empty_self_condition(B, N, num_atom_types, device, num_bond_types=flow.num_bond_types) \
        if self_condition else None
    traj = {"coords": [x], "types": [types], "bonds": [bonds], "pred_coords": []}
    pred: dict = {}
    for k in range(steps):
        t_cur, t_next = float(ts[k]), float(ts[k + 1])
        dt = t_cur - t_next
        t_vec = torch.full((B,), t_cur, device=device)
        pred = model_fn(x, types, bonds, t_vec, mask, sc)
        x0_hat = pred["coords"].float() * m3
        x = (x + dt * (x0_hat - x) / t_cur) * m3
        eta_k = 0.0 if k == steps - 1 else eta
        types = ctmc_step(types, pred["types"].float().softmax(dim=-1), t_cur, dt, eta_k, generator,
                          rate=ctmc_rate) * mask
        new_bonds = ctmc_step(bonds, _sym_probs(pred["bonds"]), t_cur, dt, eta_k, generator, rate=ctmc_rate)
        bonds = _upper_mirror(new_bonds) * pm
        if self_condition:
            sc = self_condition_inputs(pred, mask)
        if return_trajectory:
            traj["coords"].append(x)
            traj["types"].append(types)
            traj["bonds"].append(bonds)
            traj["pred_coords"].append(x0_hat)

    out = {
        "coords": pred["coords"].float() * m3,
        "types": pred["types"].argmax(dim=-1) * mask,
        "bonds": _upper_mirror(_sym_probs(pred["bonds"]).argmax(dim=-1)) * pm,
        "charges": pred["charges"].argmax(dim=-1) * mask,
        "mask": mask,
    }
    if return_trajectory:
        out["trajectory"] = {"t": ts, **{key: torch.stack(v) for key, v in traj.items()}}
    return out
