"""Tests for the molecule denoisers (``reed.molecule.nets``): shapes, E(3) and permutation equivariance, padding,
pooling, a few optimisation steps, and the parameter count of the reference-size Semla preset."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reed.molecule.nets import (
    MOLECULE_PRESETS,
    MoleculeDenoiser,
    build_molecule_model,
    masked_mean_pool,
    masked_sum_pool,
)

K = 6
TINY = {
    "semla": dict(
        arch="semla", hidden=32, layers=3, d_message=16, d_edge=16, n_coord_sets=8, n_attn_heads=4,
        d_message_hidden=16, size_emb=8, max_atoms=32,
    ),
    "egnn": dict(arch="egnn", hidden=32, layers=3, d_edge=8, size_emb=8, max_atoms=32),
}  # fmt: skip
ARCHS = list(TINY)


def _model(arch: str, dtype: torch.dtype = torch.float64, seed: int = 0, **kw) -> MoleculeDenoiser:
    torch.manual_seed(seed)
    cfg = {**TINY[arch], **kw}
    model = MoleculeDenoiser(K, **cfg).to(dtype)
    return model.eval()


def _batch(sizes: list[int], n: int | None = None, seed: int = 1, dtype: torch.dtype = torch.float64, sc: bool = True):
    """Random molecules padded to ``n`` atoms (default: the largest size)."""
    g = torch.Generator().manual_seed(seed)
    B, N = len(sizes), n or max(sizes)
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b, s in enumerate(sizes):
        mask[b, :s] = True
    x = torch.randn(B, N, 3, generator=g, dtype=dtype) * mask[..., None]
    types = torch.randint(0, K, (B, N), generator=g) * mask
    bonds = torch.randint(0, 5, (B, N, N), generator=g)
    bonds = torch.triu(bonds, 1)
    bonds = (bonds + bonds.transpose(1, 2)) * (mask[:, :, None] & mask[:, None, :])
    t = torch.rand(B, generator=g, dtype=dtype)
    self_cond = None
    if sc:
        self_cond = {
            "coords": torch.randn(B, N, 3, generator=g, dtype=dtype) * mask[..., None],
            "types": torch.softmax(torch.randn(B, N, K, generator=g, dtype=dtype), -1),
            "bonds": torch.softmax(torch.randn(B, N, N, 5, generator=g, dtype=dtype), -1),
        }
    return x, types, bonds, t, mask, self_cond


def _orthogonal(det: float, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    if torch.sign(torch.linalg.det(q)) != det:
        q[:, 0] = -q[:, 0]
    return q


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-9) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_and_symmetric_bonds(arch: str) -> None:
    model = _model(arch)
    x, types, bonds, t, mask, sc = _batch([5, 7, 3])
    B, N = mask.shape
    pred, hidden = model(x, types, bonds, t, mask, sc, taps=(1, 3))
    assert pred["coords"].shape == (B, N, 3)
    assert pred["types"].shape == (B, N, K)
    assert pred["bonds"].shape == (B, N, N, 5)
    assert pred["charges"].shape == (B, N, 7)
    assert sorted(hidden) == [1, 3]
    for h in hidden.values():
        assert h.shape == (B, N, model.hidden_size)
    assert model.depth == 3 and model.tap_dim(2) == 32
    _close(pred["bonds"], pred["bonds"].transpose(1, 2), atol=1e-12)
    # prediction is centred over real atoms and zero at padding
    _close(masked_sum_pool(pred["coords"], mask), torch.zeros(B, 3, dtype=x.dtype), atol=1e-10)
    assert torch.all(pred["coords"][~mask] == 0)
    assert all(torch.isfinite(v).all() for v in pred.values())
    # without self-conditioning input, and with a 0-dim t
    pred2, hid2 = model(x, types, bonds, torch.tensor(0.5, dtype=x.dtype), mask)
    assert pred2["coords"].shape == (B, N, 3) and hid2 == {}
    with pytest.raises(ValueError):
        model(x, types, bonds, t, mask, taps=(4,))
    with pytest.raises(ValueError):
        model.tap_dim(0)
    with pytest.raises(ValueError):
        model(x, types.float(), bonds, t, mask)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("det", [1.0, -1.0])
def test_e3_equivariance(arch: str, det: float) -> None:
    model = _model(arch)
    x, types, bonds, t, mask, sc = _batch([6, 4])
    R = _orthogonal(det)
    shift = torch.tensor([1.5, -2.0, 0.7], dtype=torch.float64)
    taps = tuple(range(1, model.depth + 1))
    pred, hidden = model(x, types, bonds, t, mask, sc, taps=taps)
    sc_r = {**sc, "coords": sc["coords"] @ R.T + shift}
    pred_r, hidden_r = model(x @ R.T + shift, types, bonds, t, mask, sc_r, taps=taps)
    _close(pred_r["coords"], pred["coords"] @ R.T, atol=1e-8)
    for key in ("types", "bonds", "charges"):
        _close(pred_r[key], pred[key], atol=1e-8)
    for d in taps:
        _close(hidden_r[d], hidden[d], atol=1e-8)
    # the check is not vacuous: the prediction actually depends on the geometry
    pred_o, _ = model(x * 1.3 + 0.1 * torch.randn_like(x) * mask[..., None], types, bonds, t, mask, sc)
    assert (pred_o["types"] - pred["types"]).abs().max() > 1e-6


@pytest.mark.parametrize("arch", ARCHS)
def test_e3_equivariance_float32(arch: str) -> None:
    model = _model(arch, dtype=torch.float32)
    x, types, bonds, t, mask, sc = _batch([7, 5], dtype=torch.float32)
    R = _orthogonal(-1.0, seed=11).float()
    pred, hidden = model(x, types, bonds, t, mask, sc, taps=(2,))
    sc_r = {**sc, "coords": sc["coords"] @ R.T}
    pred_r, hidden_r = model(x @ R.T + 3.0, types, bonds, t, mask, sc_r, taps=(2,))
    _close(pred_r["coords"], pred["coords"] @ R.T, atol=1e-3)
    _close(pred_r["bonds"], pred["bonds"], atol=1e-3)
    _close(hidden_r[2], hidden[2], atol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_permutation_equivariance(arch: str) -> None:
    model = _model(arch)
    x, types, bonds, t, mask, sc = _batch([6, 4], n=7)
    N = mask.shape[1]
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(5))
    sc_p = {
        "coords": sc["coords"][:, perm],
        "types": sc["types"][:, perm],
        "bonds": sc["bonds"][:, perm][:, :, perm],
    }
    taps = (1, 2, 3)
    pred, hidden = model(x, types, bonds, t, mask, sc, taps=taps)
    pred_p, hidden_p = model(x[:, perm], types[:, perm], bonds[:, perm][:, :, perm], t, mask[:, perm], sc_p, taps=taps)
    _close(pred_p["coords"], pred["coords"][:, perm], atol=1e-8)
    _close(pred_p["types"], pred["types"][:, perm], atol=1e-8)
    _close(pred_p["charges"], pred["charges"][:, perm], atol=1e-8)
    _close(pred_p["bonds"], pred["bonds"][:, perm][:, :, perm], atol=1e-8)
    for d in taps:
        _close(hidden_p[d], hidden[d][:, perm], atol=1e-8)


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_never_leaks(arch: str) -> None:
    model = _model(arch)
    taps = (1, 2, 3)
    # molecule A (5 atoms) alone, and the same molecule in a batch with an 8-atom molecule (A padded to 8)
    xa, ta, ba, tta, ma, sca = _batch([5], seed=21)
    xb, tb, bb, ttb, mb, scb = _batch([8], seed=22)
    n = 8
    pad1 = lambda v: F.pad(v, (0, 0) * (v.ndim - 2) + (0, n - 5))  # noqa: E731  (pads axis 1)
    pad2 = lambda v: F.pad(v, (0, 0) * (v.ndim - 3) + (0, n - 5, 0, n - 5))  # noqa: E731  (pads axes 1, 2)
    x = torch.cat([pad1(xa), xb])
    types = torch.cat([pad1(ta), tb])
    bonds = torch.cat([pad2(ba), bb])
    t = torch.cat([tta, ttb])
    mask = torch.cat([pad1(ma), mb])
    sc = {
        "coords": torch.cat([pad1(sca["coords"]), scb["coords"]]),
        "types": torch.cat([pad1(sca["types"]), scb["types"]]),
        "bonds": torch.cat([pad2(sca["bonds"]), scb["bonds"]]),
    }
    pred_a, hid_a = model(xa, ta, ba, tta, ma, sca, taps=taps)
    pred, hid = model(x, types, bonds, t, mask, sc, taps=taps)
    for key in ("coords", "types", "charges"):
        _close(pred[key][0, :5], pred_a[key][0], atol=1e-10)
    _close(pred["bonds"][0, :5, :5], pred_a["bonds"][0], atol=1e-10)
    for d in taps:
        _close(hid[d][0, :5], hid_a[d][0], atol=1e-10)
        _close(masked_sum_pool(hid[d], mask)[0], masked_sum_pool(hid_a[d], ma)[0], atol=1e-9)
        _close(masked_mean_pool(hid[d], mask)[0], masked_mean_pool(hid_a[d], ma)[0], atol=1e-10)
        assert torch.all(hid[d][0, 5:] == 0), "hidden states at padded atoms must be exactly 0"
        assert hid[d][0, :5].abs().sum() > 0
    for key in ("coords", "types", "charges"):
        assert torch.all(pred[key][0, 5:] == 0)
    assert torch.all(pred["bonds"][0, 5:] == 0) and torch.all(pred["bonds"][0, :, 5:] == 0)

    # garbage at padded positions (inputs and self-conditioning) changes nothing, bit for bit
    g = torch.Generator().manual_seed(9)
    pad = ~mask
    pair_pad = ~(mask[:, :, None] & mask[:, None, :])
    x2 = torch.where(pad[..., None], 50 * torch.randn(x.shape, generator=g, dtype=x.dtype), x)
    types2 = torch.where(pad, torch.randint(0, K, types.shape, generator=g), types)
    bonds2 = torch.where(pair_pad, torch.randint(0, 5, bonds.shape, generator=g), bonds)
    sc2 = {
        "coords": torch.where(pad[..., None], 9 * torch.randn(x.shape, generator=g, dtype=x.dtype), sc["coords"]),
        "types": torch.where(pad[..., None], torch.rand(sc["types"].shape, generator=g, dtype=x.dtype), sc["types"]),
        "bonds": torch.where(
            pair_pad[..., None], torch.rand(sc["bonds"].shape, generator=g, dtype=x.dtype), sc["bonds"]
        ),
    }
    pred2, hid2 = model(x2, types2, bonds2, t, mask, sc2, taps=taps)
    for key in pred:
        assert torch.equal(pred2[key], pred[key]), key
    for d in taps:
        assert torch.equal(hid2[d], hid[d])


def test_pooling_hand_computed() -> None:
    h = torch.tensor(
        [
            [[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]],
            [[-1.0, 0.5], [7.0, 7.0], [2.0, 1.0]],
            [[5.0, 5.0], [6.0, 6.0], [7.0, 7.0]],
        ]
    )
    mask = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    expected_sum = torch.tensor([[4.0, 6.0], [8.0, 8.5], [0.0, 0.0]])
    expected_mean = torch.tensor([[2.0, 3.0], [8.0 / 3.0, 8.5 / 3.0], [0.0, 0.0]])
    _close(masked_sum_pool(h, mask), expected_sum, atol=1e-6)
    _close(masked_mean_pool(h, mask), expected_mean, atol=1e-6)
    _close(masked_sum_pool(h, mask.float()), expected_sum, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_few_adam_steps_reduce_loss(arch: str) -> None:
    model = _model(arch, dtype=torch.float32, seed=4).train()
    g = torch.Generator().manual_seed(7)
    x1, types, bonds, _, mask, _ = _batch([6, 4], seed=13, dtype=torch.float32, sc=False)
    x1 = x1 - masked_mean_pool(x1, mask)[:, None] * mask[..., None]
    xt = (x1 + 0.3 * torch.randn(x1.shape, generator=g)) * mask[..., None]
    t = torch.tensor([0.3, 0.3])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_fn() -> torch.Tensor:
        pred, _ = model(xt, types, bonds, t, mask)
        coord = ((pred["coords"] - x1) ** 2).sum(-1)[mask].mean()
        pair = mask[:, :, None] & mask[:, None, :]
        ce = F.cross_entropy(pred["types"][mask], types[mask]) + F.cross_entropy(pred["bonds"][pair], bonds[pair])
        ce = ce + F.cross_entropy(pred["charges"][mask], torch.zeros_like(types[mask]))
        return coord + ce

    losses = []
    for _ in range(15):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        if not losses:  # no unused parameters (they break DDP without find_unused_parameters, spec §7.9)
            unused = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
            assert not unused, unused
        opt.step()
        losses.append(loss.item())
    final = loss_fn().item()
    print(f"{arch}: loss {losses[0]:.3f} -> {final:.3f}")
    assert final < 0.6 * losses[0], (losses[0], final)


def test_presets_and_reference_param_count() -> None:
    counts = {}
    for name in MOLECULE_PRESETS:
        model = build_molecule_model(name, 16)
        counts[name] = sum(p.numel() for p in model.parameters())
        assert model.arch == MOLECULE_PRESETS[name]["arch"]
        assert model.depth == MOLECULE_PRESETS[name]["layers"]
    print("molecule preset parameter counts (K=16):", counts)
    # reference: 24.32 M in total minus the 0.49 M projector and 0.53 M unused time embedder (spec §1.5)
    assert abs(counts["semla"] - 23.3e6) / 23.3e6 < 0.15
    assert counts["semla-small"] < counts["semla"] and counts["egnn-small"] < counts["egnn"]
    # overrides reach the architecture
    model = build_molecule_model("egnn-small", 16, layers=2, hidden=16)
    assert model.depth == 2 and model.hidden_size == 16
    with pytest.raises(ValueError):
        build_molecule_model("nope", 16)


def test_semla_small_forward_runs() -> None:
    model = build_molecule_model("semla-small", K).eval()
    x, types, bonds, t, mask, sc = _batch([4, 3], dtype=torch.float32)
    with torch.no_grad():
        pred, hidden = model(x, types, bonds, t, mask, sc, taps=(5,))
    assert hidden[5].shape == (2, 4, 128)
    assert torch.isfinite(pred["coords"]).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_activation_checkpointing_gives_the_same_gradients(arch: str) -> None:
    """train.activation_checkpointing: each layer is recomputed in the backward pass; the gradients are those of
    the stored activations (to float64 rounding)."""
    x, types, bonds, t, mask, sc = _batch([6, 4], seed=5)
    grads, calls = [], []
    for on in (False, True):
        model = _model(arch, seed=2).train()
        model.set_activation_checkpointing(on)
        count = [0]
        for layer in model.net.layers:
            layer.forward = _counted(layer.forward, count)  # (forward hooks are muted in the recomputation)
        pred, hidden = model(x, types, bonds, t, mask, sc, taps=(2,))
        (pred["coords"].square().sum() + pred["types"].sum() + hidden[2].square().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        calls.append(count[0])
    assert calls == [3, 6]  # 3 layers, each run again in the backward pass when checkpointed
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-10, atol=1e-12, msg=n)


def _counted(forward, count: list[int]):
    def call(*args, **kwargs):
        count[0] += 1
        return forward(*args, **kwargs)

    return call
