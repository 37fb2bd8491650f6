"""Molecule flow (SemlaFlow-style): geometry helpers, equivariant OT, interpolants, losses, CTMC and the sampler."""

import math

import pytest
import torch
import torch.nn.functional as F

from reed.molecule.flow import (
    MoleculeFlow,
    center,
    empty_self_condition,
    equivariant_ot,
    kabsch_rotation,
    self_condition_inputs,
)
from reed.molecule.sampling import ctmc_step, sample_molecules, time_grid


def _rotation(g: torch.Generator, angle: float | None = None) -> torch.Tensor:
    """A random proper rotation (3,3) (uniform via QR, or about a random axis by ``angle``)."""
    if angle is None:
        q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r))
        if torch.linalg.det(q) < 0:
            q[:, 0] = -q[:, 0]
        return q
    axis = torch.randn(3, generator=g, dtype=torch.float64)
    axis = axis / axis.norm()
    Kx = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + math.sin(angle) * Kx + (1 - math.cos(angle)) * Kx @ Kx


def _mask(counts: list[int]) -> torch.Tensor:
    n = torch.tensor(counts)
    return torch.arange(max(counts))[None] < n[:, None]


def test_center_zero_mean_and_padding():
    g = torch.Generator().manual_seed(0)
    mask = _mask([5, 3, 7])
    x = torch.randn(3, 7, 3, generator=g) + 4.0
    c = center(x, mask)
    for b, n in enumerate([5, 3, 7]):
        assert torch.allclose(c[b, :n].mean(0), torch.zeros(3), atol=1e-6)
        assert torch.allclose(c[b, :n], x[b, :n] - x[b, :n].mean(0), atol=1e-6)
    assert (c[~mask] == 0).all()


def test_kabsch_recovers_rotation_with_padding():
    g = torch.Generator().manual_seed(1)
    counts = [6, 4, 9]
    mask = _mask(counts)
    P = center(torch.randn(3, 9, 3, generator=g, dtype=torch.float64), mask)
    Rs = torch.stack([_rotation(g) for _ in counts])
    Q = P @ Rs.transpose(1, 2)
    Q[~mask] = 123.0  # garbage in padding must be ignored
    R = kabsch_rotation(P, Q, mask)
    assert torch.allclose(R, Rs, atol=1e-8)
    assert torch.allclose(torch.linalg.det(R), torch.ones(3, dtype=torch.float64), atol=1e-10)


def test_kabsch_returns_proper_rotation_for_reflected_target():
    g = torch.Generator().manual_seed(2)
    mask = _mask([8])
    P = center(torch.randn(1, 8, 3, generator=g, dtype=torch.float64), mask)
    Q = P * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)  # a reflection: best proper rotation has det +1
    R = kabsch_rotation(P, Q, mask)
    assert torch.linalg.det(R).item() == pytest.approx(1.0, abs=1e-10)
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3, dtype=torch.float64)[None], atol=1e-10)


def test_equivariant_ot_recovers_permuted_rotated_copy():
    g = torch.Generator().manual_seed(3)
    counts = [7, 5]
    mask = _mask(counts)
    data = center(3.0 * torch.randn(2, 7, 3, generator=g), mask)
    noise = torch.zeros_like(data)
    for b, n in enumerate(counts):
        perm = torch.randperm(n, generator=g)
        R = _rotation(g, angle=0.15).float()  # small enough for the Hungarian step to find the true matching
        noise[b, :n] = data[b, perm] @ R.T
    aligned = equivariant_ot(data, noise, mask)
    assert torch.allclose(aligned, data, atol=1e-4)
    assert (aligned[~mask] == 0).all()


def test_equivariant_ot_lowers_cost_and_is_equivariant():
    g = torch.Generator().manual_seed(4)
    counts = [12, 9, 12]
    mask = _mask(counts)
    data = center(torch.randn(3, 12, 3, generator=g), mask)
    noise = center(torch.randn(3, 12, 3, generator=g), mask)
    aligned = equivariant_ot(data, noise, mask)

    def cost(a, b):
        return ((a - b) ** 2 * mask[..., None]).sum(dim=(1, 2))

    c_ot = cost(aligned, data)
    assert (c_ot <= cost(noise, data) + 1e-5).all()
    for _ in range(20):
        permuted = noise.clone()
        rotated = aligned.clone()
        for b, n in enumerate(counts):
            permuted[b, :n] = noise[b, torch.randperm(n, generator=g)]
            rotated[b, :n] = aligned[b, :n] @ _rotation(g).float().T
        assert (c_ot <= cost(permuted, data) + 1e-5).all()
        assert (c_ot <= cost(rotated, data) + 1e-5).all()
    # the output is a permutation + rotation of the noise: same pairwise distances (as multisets) per molecule
    for b, n in enumerate(counts):
        d_in = torch.cdist(noise[b, :n], noise[b, :n]).flatten().sort().values
        d_out = torch.cdist(aligned[b, :n], aligned[b, :n]).flatten().sort().values
        assert torch.allclose(d_in, d_out, atol=1e-4)
    # equivariance: aligned(R data, R noise) = R aligned(data, noise)
    R = _rotation(g).float()
    aligned_r = equivariant_ot(data @ R.T, noise @ R.T, mask)
    assert torch.allclose(aligned_r, aligned @ R.T, atol=1e-4)
    # and the data orientation alone drives the output's orientation (noise rotation is absorbed)
    aligned_nr = equivariant_ot(data, noise @ R.T, mask)
    assert cost(aligned_nr, data).sum() <= cost(noise @ R.T, data).sum() + 1e-5


def test_prior_is_centred_uniform_and_symmetric():
    flow = MoleculeFlow(6)
    g = torch.Generator().manual_seed(5)
    mask = _mask([10, 4, 7])
    x1, types, bonds = flow.prior(mask, generator=g)
    for b, n in enumerate([10, 4, 7]):
        assert torch.allclose(x1[b, :n].mean(0), torch.zeros(3), atol=1e-6)
    assert (x1[~mask] == 0).all() and (types[~mask] == 0).all()
    assert types.max() < 6 and types.min() >= 0
    assert torch.equal(bonds, bonds.transpose(1, 2))
    assert (torch.diagonal(bonds, dim1=1, dim2=2) == 0).all()
    pm = mask[:, :, None] & mask[:, None, :]
    assert (bonds[~pm] == 0).all() and bonds.max() < 5
    # uniform over all K_atom classes
    big = torch.ones(200, 50, dtype=torch.bool)
    _, tt, bb = flow.prior(big, generator=g)
    freq = torch.bincount(tt.flatten(), minlength=6).float() / tt.numel()
    assert torch.allclose(freq, torch.full((6,), 1 / 6), atol=0.01)
    iu = torch.triu_indices(50, 50, offset=1)
    bf = torch.bincount(bb[:, iu[0], iu[1]].flatten(), minlength=5).float() / (200 * iu.shape[1])
    assert torch.allclose(bf, torch.full((5,), 0.2), atol=0.01)


def _toy_batch(g: torch.Generator, counts: list[int], K: int):
    mask = _mask(counts)
    B, N = mask.shape
    x0 = center(torch.randn(B, N, 3, generator=g), mask)
    types0 = torch.randint(0, K, (B, N), generator=g) * mask
    bonds0 = torch.randint(0, 5, (B, N, N), generator=g)
    bonds0 = torch.triu(bonds0, 1)
    bonds0 = (bonds0 + bonds0.transpose(1, 2)) * (mask[:, :, None] & mask[:, None, :])
    charges0 = torch.randint(0, 7, (B, N), generator=g) * mask
    return x0, types0, bonds0, charges0, mask


def test_interpolant_endpoints():
    K = 5
    g = torch.Generator().manual_seed(6)
    x0, types0, bonds0, _, mask = _toy_batch(g, [8, 5, 6], K)
    flow = MoleculeFlow(K, coord_noise=0.0)
    c0 = flow.corrupt(x0, types0, bonds0, mask, generator=g, t=torch.zeros(3))
    assert torch.allclose(c0.x_t, x0, atol=1e-6)
    assert torch.equal(c0.types_t, types0) and torch.equal(c0.bonds_t, bonds0)
    gen = torch.Generator().manual_seed(7)
    c1 = flow.corrupt(x0, types0, bonds0, mask, generator=gen, t=torch.ones(3))
    assert torch.allclose(c1.x_t, c1.noise, atol=1e-6)
    gen.manual_seed(7)
    x1, _, _ = flow.prior(mask, generator=gen)
    assert torch.allclose(c1.noise, equivariant_ot(x0, x1, mask), atol=1e-5)
    for b, n in enumerate([8, 5, 6]):
        assert torch.allclose(c1.x_t[b, :n].mean(0), torch.zeros(3), atol=1e-5)
    # ot="none": the prior itself
    flow_none = MoleculeFlow(K, coord_noise=0.0, ot="none")
    gen.manual_seed(7)
    c1n = flow_none.corrupt(x0, types0, bonds0, mask, generator=gen, t=torch.ones(3))
    assert torch.allclose(c1n.x_t, x1, atol=1e-6)
    # coordinate noise stays centred and masked
    noisy = MoleculeFlow(K, coord_noise=0.2).corrupt(x0, types0, bonds0, mask, generator=g, t=torch.zeros(3))
    assert 0 < (noisy.x_t - x0).abs().max() and (noisy.x_t[~mask] == 0).all()
    for b, n in enumerate([8, 5, 6]):
        assert torch.allclose(noisy.x_t[b, :n].mean(0), torch.zeros(3), atol=1e-5)


def test_interpolant_categoricals_statistics_and_symmetry():
    K = 4
    g = torch.Generator().manual_seed(8)
    counts = [40] * 48 + [25] * 16
    x0, types0, bonds0, _, mask = _toy_batch(g, counts, K)
    flow = MoleculeFlow(K)
    t = 0.35
    c = flow.corrupt(x0, types0, bonds0, mask, generator=g, t=torch.full((len(counts),), t))
    keep = (c.types_t == types0)[mask].float().mean().item()
    assert keep == pytest.approx(1 - t + t / K, abs=0.02)
    iu = torch.triu_indices(40, 40, offset=1)
    up_mask = (mask[:, :, None] & mask[:, None, :])[:, iu[0], iu[1]]
    keep_b = (c.bonds_t == bonds0)[:, iu[0], iu[1]][up_mask].float().mean().item()
    assert keep_b == pytest.approx(1 - t + t / 5, abs=0.02)
    assert torch.equal(c.bonds_t, c.bonds_t.transpose(1, 2))
    assert (torch.diagonal(c.bonds_t, dim1=1, dim2=2) == 0).all()
    pm = mask[:, :, None] & mask[:, None, :]
    assert (c.bonds_t[~pm] == 0).all() and (c.types_t[~mask] == 0).all() and (c.x_t[~mask] == 0).all()
    assert c.t.shape == (len(counts),)


def test_time_sampling_beta():
    g = torch.Generator().manual_seed(9)
    t = MoleculeFlow(5).sample_time(20_000, generator=g)
    assert t.shape == (20_000,) and t.min() >= 0 and t.max() <= 1
    assert t.mean().item() == pytest.approx(1 / 3, abs=0.01)
    # density of t is 2 (1 - t): P(t < 0.5) = 0.75
    assert (t < 0.5).float().mean().item() == pytest.approx(0.75, abs=0.015)
    t2 = MoleculeFlow(5, time_alpha=2.0, time_beta=3.0).sample_time(20_000, generator=g)
    assert t2.mean().item() == pytest.approx(1 - 0.4, abs=0.01)


def test_loss_hand_computed_and_padding_invariant():
    torch.manual_seed(0)
    K = 3
    mask = torch.tensor([[True, True, False], [True, True, True]])
    x0 = center(torch.randn(2, 3, 3), mask)
    types0 = torch.tensor([[0, 2, 0], [1, 1, 2]])
    bonds0 = torch.tensor([[[0, 1, 0], [1, 0, 0], [0, 0, 0]], [[0, 2, 0], [2, 0, 4], [0, 4, 0]]])
    charges0 = torch.tensor([[0, 4, 0], [1, 0, 0]])
    pred = {"coords": torch.randn(2, 3, 3) * mask[..., None], "types": torch.randn(2, 3, K),
            "bonds": torch.randn(2, 3, 3, 5), "charges": torch.randn(2, 3, 7)}
    flow_a = MoleculeFlow(K, coord_loss_norm="atoms")
    flow_p = MoleculeFlow(K, coord_loss_norm="padded", loss_weights={"types": 0.5})
    la = flow_a.loss(pred, x0, types0, bonds0, charges0, mask)
    lp = flow_p.loss(pred, x0, types0, bonds0, charges0, mask)
    for b, n in enumerate([2, 3]):
        sse = ((pred["coords"][b, :n] - x0[b, :n]) ** 2).sum()
        assert la["coords"][b].item() == pytest.approx((sse / (3 * n)).item(), rel=1e-5)
        assert lp["coords"][b].item() == pytest.approx((sse / 9).item(), rel=1e-5)
        ce_t = F.cross_entropy(pred["types"][b, :n], types0[b, :n])
        ce_c = F.cross_entropy(pred["charges"][b, :n], charges0[b, :n])
        ce_b = F.cross_entropy(pred["bonds"][b, :n, :n].reshape(-1, 5), bonds0[b, :n, :n].reshape(-1))  # incl. diag
        assert la["types"][b].item() == pytest.approx(ce_t.item(), rel=1e-5)
        assert la["charges"][b].item() == pytest.approx(ce_c.item(), rel=1e-5)
        assert la["bonds"][b].item() == pytest.approx(ce_b.item(), rel=1e-5)
        tot_a = (sse / (3 * n) + 0.2 * ce_t + ce_b + ce_c).item()
        tot_p = (sse / 9 + 0.5 * ce_t + ce_b + ce_c).item()
        assert la["total"][b].item() == pytest.approx(tot_a, rel=1e-5)
        assert lp["total"][b].item() == pytest.approx(tot_p, rel=1e-5)
    # the diagonal really counts: a confident "bond" on the diagonal raises the bond loss
    pred_d = {k: v.clone() for k, v in pred.items()}
    pred_d["bonds"][1, 0, 0] = torch.tensor([-20.0, 20.0, 0, 0, 0])
    assert flow_a.loss(pred_d, x0, types0, bonds0, charges0, mask)["bonds"][1] > la["bonds"][1] + 1.0
    # padded predictions / targets never contribute (even inf / out-of-range garbage)
    pred_g = {k: v.clone() for k, v in pred.items()}
    pred_g["coords"][0, 2] = 1e6
    pred_g["types"][0, 2] = float("inf")
    pred_g["bonds"][0, 2, :] = float("nan")
    pred_g["bonds"][0, :, 2] = -5e3
    pred_g["charges"][0, 2] = float("nan")
    t_g, b_g, c_g = types0.clone(), bonds0.clone(), charges0.clone()
    t_g[0, 2], b_g[0, 2, 1], c_g[0, 2] = 99, 77, -1
    x_g = x0.clone()
    x_g[0, 2] = 50.0
    lg = flow_a.loss(pred_g, x_g, t_g, b_g, c_g, mask)
    for k in la:
        assert torch.allclose(lg[k], la[k], rtol=1e-6, atol=1e-6), k


def test_self_condition_helpers():
    mask = _mask([3, 2])
    pred = {"coords": torch.randn(2, 3, 3, requires_grad=True), "types": torch.randn(2, 3, 4),
            "bonds": torch.randn(2, 3, 3, 5), "charges": torch.randn(2, 3, 7)}
    sc = self_condition_inputs(pred, mask)
    assert not sc["coords"].requires_grad
    assert (sc["coords"][1, 2] == 0).all() and (sc["types"][1, 2] == 0).all() and (sc["bonds"][1, 2] == 0).all()
    assert torch.allclose(sc["types"][0].sum(-1), torch.ones(3))
    assert torch.allclose(sc["bonds"][0].sum(-1), torch.ones(3, 3))
    empty = empty_self_condition(2, 3, 4, "cpu")
    assert {k: tuple(v.shape) for k, v in empty.items()} == {k: tuple(v.shape) for k, v in sc.items()}
    assert all((v == 0).all() for v in empty.values())


def test_time_grid():
    lin = time_grid(100, "linear")
    assert lin.shape == (101,) and lin[0] == 1 and lin[-1] == 0
    assert torch.allclose(lin[:-1] - lin[1:], torch.full((100,), 0.01), atol=1e-6)
    log = time_grid(100, "log")
    assert log[0] == 1 and log[-1].item() == pytest.approx(0.01)
    assert (log[1:] < log[:-1]).all()
    assert (1 - log[1]).item() == pytest.approx(0.045, abs=0.001)  # first step in t_ref
    assert (1 - log[-2]).item() == pytest.approx(0.9895, abs=0.0005)  # last model call in t_ref
    with pytest.raises(ValueError):
        time_grid(10, "cosine")


def test_ctmc_one_hot_stays_at_zero_noise():
    g = torch.Generator().manual_seed(10)
    K = 6
    cur = torch.randint(0, K, (5000,), generator=g)
    probs = F.one_hot(cur, K).float()
    for t, dt in [(0.9, 0.05), (0.3, 0.2), (0.02, 0.01)]:
        assert torch.equal(ctmc_step(cur, probs, t, dt, 0.0, generator=g), cur)


@pytest.mark.parametrize("rate", ["reference", "detailed_balance"])
def test_ctmc_empirical_jump_distribution(rate):
    g = torch.Generator().manual_seed(11)
    K, M = 5, 200_000
    probs = torch.tensor([0.1, 0.35, 0.05, 0.3, 0.2])
    c, t, dt, eta = 2, 0.6, 0.02, 1.0  # t_ref = 0.4
    t_ref = 1 - t
    if rate == "reference":
        mult = (1 + 2 * eta * (K - 1) * t_ref) / (1 - t_ref)
    else:
        mult = (1 + eta + eta * (K - 1) * t_ref) / (1 - t_ref)
    expected = dt * (mult * probs + eta * probs[c])
    expected[c] = 0
    expected[c] = 1 - expected.sum()
    assert expected.min() > 0
    out = ctmc_step(torch.full((M,), c), probs.expand(M, K), t, dt, eta, generator=g, rate=rate)
    freq = torch.bincount(out, minlength=K).double() / M
    sd = (expected.double() * (1 - expected.double()) / M).sqrt()
    assert ((freq - expected.double()).abs() <= 5 * sd + 1e-6).all(), (freq, expected)
    chi2 = (((freq - expected.double()) ** 2) / expected.double()).sum().item() * M
    assert chi2 < 25.0  # chi-square with 4 dof: P(> 25) ~ 5e-5


def test_ctmc_clipped_jump_and_floored_stay():
    g = torch.Generator().manual_seed(12)
    K, M = 3, 50_000
    probs = torch.tensor([0.0, 0.2, 0.8])
    # t_ref close to 1: jump to class 2 has probability dt * mult * 0.8 > 1, clipped; stay floored at 0
    out = ctmc_step(torch.zeros(M, dtype=torch.long), probs.expand(M, K), 0.001, 0.5, 0.0, generator=g)
    freq = torch.bincount(out, minlength=K).double() / M
    assert freq[0] == 0  # stay probability floored at 0
    expected = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64) / 2  # both clipped at 1, then normalised
    assert torch.allclose(freq, expected, atol=0.015)


def _oracle(target: dict, calls: list):
    def model_fn(x_t, types_t, bonds_t, t, mask, self_cond):
        calls.append((t.clone(), self_cond))
        assert torch.equal(bonds_t, bonds_t.transpose(1, 2))
        assert (types_t[~mask] == 0).all() and (x_t[~mask] == 0).all()
        return {k: v.clone() for k, v in target.items()}

    return model_fn


def _target_molecule(K: int):
    g = torch.Generator().manual_seed(13)
    counts = [5, 4]
    mask = _mask(counts)
    coords = center(2 * torch.randn(2, 5, 3, generator=g), mask)
    types = torch.randint(0, K, (2, 5), generator=g) * mask
    bonds = torch.triu(torch.randint(0, 5, (2, 5, 5), generator=g), 1)
    bonds = (bonds + bonds.transpose(1, 2)) * (mask[:, :, None] & mask[:, None, :])
    charges = torch.randint(0, 7, (2, 5), generator=g) * mask
    logits = {"coords": coords, "types": F.one_hot(types, K).float() * 10, "bonds": F.one_hot(bonds, 5).float() * 10,
              "charges": F.one_hot(charges, 7).float() * 10}
    return counts, mask, coords, types, bonds, charges, logits


def test_sample_molecules_with_oracle_log_grid():
    K = 6
    counts, mask, coords, types, bonds, charges, logits = _target_molecule(K)
    calls: list = []
    flow = MoleculeFlow(K)
    g = torch.Generator().manual_seed(14)
    out = sample_molecules(_oracle(logits, calls), torch.tensor(counts), K, flow=flow, steps=50, grid="log",
                           generator=g, return_trajectory=True)
    assert torch.equal(out["mask"], mask)
    assert torch.allclose(out["coords"], coords, atol=1e-6)
    assert torch.equal(out["types"], types) and torch.equal(out["bonds"], bonds)
    assert torch.equal(out["charges"], charges)
    # model called `steps` times at decreasing library times; self-conditioning zeros first, then the prediction
    assert len(calls) == 50
    ts = torch.stack([c[0][0] for c in calls])
    assert ts[0] == 1 and (ts[1:] < ts[:-1]).all()
    assert all((v == 0).all() for v in calls[0][1].values())
    assert torch.allclose(calls[1][1]["coords"], coords) and calls[1][1]["types"].shape == (2, 5, K)
    # integrated coordinates approach the target monotonically; Euler on x̂0 is exact for the linear path
    traj = out["trajectory"]
    assert traj["coords"].shape == (51, 2, 5, 3)
    rmsd = torch.stack([((x - coords) ** 2).sum(-1).sum(-1) / mask.sum(-1) for x in traj["coords"]]).sqrt()  # (S+1,B)
    assert (rmsd[1:] <= rmsd[:-1] + 1e-6).all()
    assert torch.allclose(rmsd[-1], 0.01 * rmsd[0], rtol=1e-3)
    assert torch.equal(traj["bonds"][-1], traj["bonds"][-1].transpose(1, 2))


def test_sample_molecules_final_state_linear_grid():
    K = 6
    counts, mask, coords, types, bonds, _, logits = _target_molecule(K)
    flow = MoleculeFlow(K)
    g = torch.Generator().manual_seed(15)
    out = sample_molecules(_oracle(logits, []), torch.tensor(counts), K, flow=flow, steps=20, grid="linear",
                           generator=g, self_condition=False, return_trajectory=True)
    traj = out["trajectory"]
    assert torch.allclose(traj["coords"][-1], coords, atol=1e-5)  # the last step lands on x̂0
    assert torch.equal(traj["types"][-1], types) and torch.equal(traj["bonds"][-1], bonds)
    assert torch.equal(out["types"], types) and torch.equal(out["bonds"], bonds)
    with pytest.raises(ValueError):
        sample_molecules(_oracle(logits, []), torch.tensor(counts), K + 1, flow=flow, steps=2)
