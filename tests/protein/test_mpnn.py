"""Tests of the ProteinMPNN-style denoiser (``reed.protein.mpnn``) on real PDB backbones."""

from __future__ import annotations

from pathlib import Path

import biotite.structure as struc
import biotite.structure.io.pdb as pdbio
import numpy as np
import pytest
import torch

from reed.protein.mpnn import (
    ATOM_PAIRS,
    MASK_ID,
    MPNN_PRESETS,
    VOCAB,
    MPNNDenoiser,
    PositionalEncodings,
    ProteinFeatures,
    build_mpnn,
    knn_graph,
    rbf,
    virtual_cb,
)

AA3 = "ALA CYS ASP GLU PHE GLY HIS ILE LYS LEU MET ASN PRO GLN ARG SER THR VAL TRP TYR".split()


def load_chain(path: Path, chain: str = "A") -> dict[str, np.ndarray]:
    """Backbone ``(L, 4, 3)`` (N, CA, C, O; NaN where missing), real CB ``(L, 3)`` and token ids ``(L,)``."""
    atoms = pdbio.PDBFile.read(str(path)).get_structure(model=1)
    atoms = atoms[struc.filter_amino_acids(atoms) & (atoms.chain_id == chain)]
    starts = struc.get_residue_starts(atoms)
    ends = np.append(starts[1:], len(atoms))
    X = np.full((len(starts), 4, 3), np.nan)
    cb = np.full((len(starts), 3), np.nan)
    seq = np.zeros(len(starts), dtype=np.int64)
    for r, (s, e) in enumerate(zip(starts, ends)):
        res = atoms[s:e]
        for a, name in enumerate(("N", "CA", "C", "O")):
            hit = np.nonzero(res.atom_name == name)[0]
            if len(hit):
                X[r, a] = res.coord[hit[0]]
        hit = np.nonzero(res.atom_name == "CB")[0]
        if len(hit):
            cb[r] = res.coord[hit[0]]
        name = res.res_name[0]
        seq[r] = AA3.index(name) if name in AA3 else 20
    return {"X": X, "cb": cb, "seq": seq}


def batch(chains: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Pad single-chain proteins into a batch in the reference layout."""
    L = max(len(c["seq"]) for c in chains)
    B = len(chains)
    X = torch.zeros(B, L, 4, 3)
    S = torch.full((B, L), MASK_ID, dtype=torch.long)
    mask = torch.zeros(B, L)
    ridx = torch.full((B, L), -100, dtype=torch.long)
    chain = torch.zeros(B, L, dtype=torch.long)
    for b, c in enumerate(chains):
        n = len(c["seq"])
        xb = torch.tensor(c["X"], dtype=torch.float32)
        ok = torch.isfinite(xb).all(-1).all(-1)
        X[b, :n] = torch.nan_to_num(xb, nan=0.0)
        S[b, :n] = torch.tensor(c["seq"])
        mask[b, :n] = ok.float()
        ridx[b, :n] = torch.arange(n)
        chain[b, :n] = 1
    return {"X": X, "S": S, "mask": mask, "residue_idx": ridx, "chain_encoding": chain}


@pytest.fixture(scope="module")
def p5l33(pdb_dir: Path) -> dict[str, np.ndarray]:
    return load_chain(pdb_dir / "5L33.pdb", "A")


@pytest.fixture(scope="module")
def p6mrr(pdb_dir: Path) -> dict[str, np.ndarray]:
    return load_chain(pdb_dir / "6MRR.pdb", "A")


def run(model: MPNNDenoiser, b: dict[str, torch.Tensor], S: torch.Tensor | None = None, **kw):
    return model(b["X"], b["S"] if S is None else S, b["mask"], b["residue_idx"], b["chain_encoding"], **kw)


# ----------------------------------------------------------------------------------------------------------------------
def test_virtual_cb(p5l33):
    X = p5l33["X"]
    n, ca, c = X[0, 0], X[0, 1], X[0, 2]
    b_, c_ = ca - n, c - ca
    a_ = np.cross(b_, c_)
    expect = -0.58273431 * a_ + 0.56802827 * b_ - 0.54067466 * c_ + ca
    got = virtual_cb(torch.tensor(X[0], dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, expect, atol=1e-9)

    cb = virtual_cb(torch.tensor(X, dtype=torch.float64)).numpy()
    non_gly = p5l33["seq"] != AA3.index("GLY")
    d = np.linalg.norm(cb - X[:, 1], axis=-1)[non_gly]
    assert abs(np.nanmean(d) - 1.52) < 0.05
    # the virtual Cb sits close to the real one
    real = p5l33["cb"][non_gly]
    err = np.linalg.norm(cb[non_gly] - real, axis=-1)
    assert np.nanmean(err) < 0.25


def test_rbf_values():
    d = 7.3
    out = rbf(torch.tensor([d], dtype=torch.float64))
    assert out.shape == (1, 16)
    mu = np.linspace(2.0, 22.0, 16)
    sigma = 20.0 / 16
    np.testing.assert_allclose(out[0].numpy(), np.exp(-(((d - mu) / sigma) ** 2)), rtol=1e-12)
    # peak at a centre
    assert rbf(torch.tensor(mu[3]))[3].item() == pytest.approx(1.0)


def test_atom_pairs_order():
    assert len(ATOM_PAIRS) == 25 and len(set(ATOM_PAIRS)) == 25
    assert ATOM_PAIRS[:5] == (("CA", "CA"), ("N", "N"), ("C", "C"), ("O", "O"), ("Cb", "Cb"))
    assert ATOM_PAIRS[12] == ("Cb", "C") and ATOM_PAIRS[-1] == ("C", "O")


def test_knn_graph(p5l33):
    CA = torch.tensor(p5l33["X"][:, 1], dtype=torch.float32)[None]
    L = CA.shape[1]
    mask = torch.ones(1, L)
    D, E_idx = knn_graph(CA, mask, 30)
    assert D.shape == E_idx.shape == (1, L, 30) and E_idx.dtype == torch.int64
    ca = p5l33["X"][:, 1]
    dist = np.linalg.norm(ca[:, None] - ca[None], axis=-1)
    for i in (0, 17, 53, L - 1):
        order = np.argsort(dist[i], kind="stable")[:30]
        assert order[0] == i and E_idx[0, i, 0].item() == i  # self first
        np.testing.assert_array_equal(E_idx[0, i].numpy(), order)
        np.testing.assert_allclose(D[0, i].numpy(), np.sqrt(dist[i, order] ** 2 + 1e-6), atol=1e-4)
    assert D[0, 0, 0].item() == pytest.approx(1e-3, rel=1e-2)

    # K = min(k, L)
    _, E_all = knn_graph(CA, mask, 500)
    assert E_all.shape == (1, L, L)

    # masked residues never rank before valid ones
    mask2 = mask.clone()
    masked = torch.tensor([1, 2, 3, 40, 41, 90])
    mask2[0, masked] = 0
    _, E_m = knn_graph(CA, mask2, 500)
    n_valid = int(mask2.sum())
    for i in range(L):
        if mask2[0, i] == 0:
            continue
        is_masked = (1 - mask2[0])[E_m[0, i]]
        assert is_masked[:n_valid].sum() == 0 and is_masked[n_valid:].all()


def test_relative_position_classes():
    pe = PositionalEncodings()
    offset = torch.tensor([[[-100, -33, -32, -1, 0, 1, 31, 32, 40, 5]]])
    same = torch.tensor([[[1, 1, 1, 1, 1, 1, 1, 1, 1, 0]]])
    np.testing.assert_array_equal(pe.classes(offset, same)[0, 0].numpy(), [0, 0, 0, 31, 32, 33, 63, 64, 64, 65])


def test_features_two_chain_by_hand(p5l33):
    """Rebuild one edge feature vector by hand on a toy two-chain input (chain 1: 40 residues, chain 2: 20)."""
    X = torch.tensor(p5l33["X"][:60], dtype=torch.float64)[None]
    mask = torch.ones(1, 60, dtype=torch.float64)
    ridx = torch.cat([torch.arange(40), 100 + torch.arange(20)])[None]
    chain = torch.cat([torch.ones(40), 2 * torch.ones(20)]).long()[None]
    torch.manual_seed(0)
    feats = ProteinFeatures(edge_features=32, top_k=30).double()
    E, E_idx = feats(X, mask, ridx, chain)
    assert E.shape == (1, 60, 30, 32) and E_idx.shape == (1, 60, 30)

    # classes of all edges: same chain -> clipped offset, else 65
    j = E_idx[0]
    i = torch.arange(60)[:, None].expand_as(j)
    cls = feats.embeddings.classes(ridx[0][i] - ridx[0][j], chain[0][i] == chain[0][j])
    inter = chain[0][i] != chain[0][j]
    assert inter.any() and (cls[inter] == 65).all()
    assert ((cls[~inter] >= 0) & (cls[~inter] <= 64)).all()

    xn = X[0].numpy()
    n_, ca_, c_, o_ = xn[:, 0], xn[:, 1], xn[:, 2], xn[:, 3]
    bb, cc = ca_ - n_, c_ - ca_
    cb_ = -0.58273431 * np.cross(bb, cc) + 0.56802827 * bb - 0.54067466 * cc + ca_
    atoms = {"N": n_, "CA": ca_, "C": c_, "O": o_, "Cb": cb_}
    mu, sigma = np.linspace(2, 22, 16), 1.25
    lin, emb, ln = feats.embeddings.linear, feats.edge_embedding, feats.norm_edges
    checked_inter = False
    for ii in (5, 38, 45):
        for kk in range(30):
            jj = int(E_idx[0, ii, kk])
            rb = []
            for a_i, a_j in ATOM_PAIRS:
                dist = np.sqrt(((atoms[a_i][ii] - atoms[a_j][jj]) ** 2).sum() + 1e-6)
                rb.append(np.exp(-(((dist - mu) / sigma) ** 2)))
            if chain[0, ii] == chain[0, jj]:
                k_cls = int(np.clip(int(ridx[0, ii] - ridx[0, jj]) + 32, 0, 64))
            else:
                k_cls, checked_inter = 65, True
            onehot = np.zeros(66)
            onehot[k_cls] = 1
            pos = lin.weight.detach().numpy() @ onehot + lin.bias.detach().numpy()
            x = emb.weight.detach().numpy() @ np.concatenate([pos, np.concatenate(rb)])
            x = (x - x.mean()) / np.sqrt(x.var() + ln.eps) * ln.weight.detach().numpy() + ln.bias.detach().numpy()
            np.testing.assert_allclose(E[0, ii, kk].detach().numpy(), x, atol=1e-8)
    assert checked_inter


def test_shapes_taps_and_padding(p5l33, p6mrr):
    torch.manual_seed(0)
    model = build_mpnn().eval()
    assert model.hidden_size == 128 and model.depth == 3
    names = model.tap_names()
    assert names == ["encoder"] + [f"decoder.{d}.{k}" for d in range(3) for k in ("nodes", "edges")]
    assert model.tap_dim("encoder") == 128 and model.tap_dim("decoder.1.nodes") == 128
    assert model.tap_dim("decoder.2.edges") == 256
    with pytest.raises(ValueError, match="decoder.0.nodes"):
        model.tap_dim("decoder.3.nodes")

    both = batch([p5l33, p6mrr])
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(both["S"].shape, generator=g) < 0.5
    S = torch.where(keep, both["S"], torch.full_like(both["S"], MASK_ID))
    with torch.no_grad():
        lp, out = run(model, both, S, taps=names)
        with pytest.raises(ValueError, match="valid taps"):
            run(model, both, S, taps=["decoder.9.nodes"])
    B, L = S.shape
    assert lp.shape == (B, L, VOCAB)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(B, L))
    assert out["encoder"].shape == (B, L, 128)
    for d in range(3):
        assert out[f"decoder.{d}.nodes"].shape == (B, L, 128)
        assert out[f"decoder.{d}.edges"].shape == (B, L, 30, 256)
    assert out["edge_index"].shape == (B, L, 30) and out["edge_index"].dtype == torch.int64
    em = out["edge_mask"]
    assert em.shape == (B, L, 30) and em.dtype == torch.float32
    n = len(p6mrr["seq"])
    assert (em[1, n:] == 0).all() and (em[1, :n] == 1).all()
    assert (em[1, :n][out["edge_index"][1, :n] >= n] == 0).all()

    # padding does not change the real residues' outputs
    alone = batch([p6mrr])
    with torch.no_grad():
        lp1, out1 = run(model, alone, S[1:, :n], taps=["encoder", "decoder.1.edges"])
    torch.testing.assert_close(lp[1, :n], lp1[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["encoder"][1, :n], out1["encoder"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["decoder.1.edges"][1, :n], out1["decoder.1.edges"][0], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(out["edge_index"][1, :n].numpy(), out1["edge_index"][0].numpy())

    # only the always-present keys when no tap is requested
    with torch.no_grad():
        _, out0 = run(model, alone)
    assert set(out0) == {"edge_index", "edge_mask"}


def test_rigid_motion_invariance(p6mrr):
    torch.manual_seed(0)
    model = build_mpnn("mpnn-small").eval()
    b = batch([p6mrr])
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    X2 = (b["X"].double() @ q.T + torch.tensor([12.0, -30.0, 7.5], dtype=torch.float64)).float()
    S = b["S"].clone()
    S[:, ::2] = MASK_ID
    with torch.no_grad():
        lp1, _ = run(model, b, S)
        lp2, _ = model(X2, S, b["mask"], b["residue_idx"], b["chain_encoding"])
    torch.testing.assert_close(lp1, lp2, atol=2e-4, rtol=0)


def test_parameter_count():
    model = build_mpnn()
    n = sum(p.numel() for p in model.parameters())
    # Exact count for H=128, 3+3 layers: 2,403,910 (incl. the 128-d frozen node init; 2,403,782 trainable).
    # Spec §1.5: denoiser ~2.40 M.
    assert n == 2_403_910
    assert abs(n - 2.40e6) / 2.40e6 < 0.05
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2_403_782
    assert MPNN_PRESETS["mpnn-small"]["hidden"] == 64


def test_training_reduces_loss(p6mrr):
    torch.manual_seed(0)
    model = build_mpnn("mpnn-small").train()
    b = batch([p6mrr])
    S_mask = torch.full_like(b["S"], MASK_ID)
    target = b["S"]
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)

    def loss_fn() -> torch.Tensor:
        lp, _ = model(b["X"], S_mask, b["mask"], b["residue_idx"], b["chain_encoding"], generator=g)
        nll = -lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        return (nll * b["mask"]).sum() / b["mask"].sum()

    losses = []
    for _ in range(15):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < losses[0] - 0.3


def test_backbone_noise_generator(p6mrr):
    torch.manual_seed(0)
    model = build_mpnn("mpnn-small", dropout=0.0)
    b = batch([p6mrr])
    model.train()
    with torch.no_grad():
        a1, _ = run(model, b, generator=torch.Generator().manual_seed(3))
        a2, _ = run(model, b, generator=torch.Generator().manual_seed(3))
        a3, _ = run(model, b, generator=torch.Generator().manual_seed(4))
        model.eval()
        e1, _ = run(model, b)
        e2, _ = run(model, b, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a1, a2, atol=0, rtol=0)
    assert not torch.allclose(a1, a3)
    torch.testing.assert_close(e1, e2, atol=0, rtol=0)
    assert not torch.allclose(a1, e1)


def test_learnable_node_and_update_edge(p6mrr):
    frozen = build_mpnn("mpnn-small")
    assert not frozen.node_embeds.requires_grad and (frozen.node_embeds == 0).all()
    learn = build_mpnn("mpnn-small", learnable_node=True)
    assert learn.node_embeds.requires_grad and (learn.node_embeds == 0).all()

    torch.manual_seed(0)
    m0 = build_mpnn("mpnn-small", update_edge=False).eval()
    torch.manual_seed(0)
    m1 = build_mpnn("mpnn-small", update_edge=True).eval()
    sd0, sd1 = m0.state_dict(), m1.state_dict()
    assert sd0.keys() == sd1.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    b = batch([p6mrr])
    S = b["S"].clone()
    S[:, 1::3] = MASK_ID
    taps = ["decoder.0.nodes", "decoder.0.edges", "decoder.1.nodes"]
    with torch.no_grad():
        lp0, o0 = run(m0, b, S, taps=taps)
        lp1, o1 = run(m1, b, S, taps=taps)
    torch.testing.assert_close(o0["decoder.0.nodes"], o1["decoder.0.nodes"])
    torch.testing.assert_close(o0["decoder.0.edges"], o1["decoder.0.edges"])
    assert not torch.allclose(o0["decoder.1.nodes"], o1["decoder.1.nodes"], atol=1e-4)
    assert not torch.allclose(lp0, lp1, atol=1e-4)

    # without update_edge the edge branch gets gradient only through the edge taps
    m0.train()
    lp, out = run(m0, b, S, taps=["decoder.1.edges"])
    lp.sum().backward(retain_graph=True)
    assert m0.decoder_layers[1].edge_W1.weight.grad is None
    out["decoder.1.edges"].sum().backward()
    assert m0.decoder_layers[1].edge_W1.weight.grad is not None


def test_autocast_bf16_cpu(p6mrr):
    torch.manual_seed(0)
    model = build_mpnn("mpnn-small").eval()
    b = batch([p6mrr])
    with torch.no_grad():
        ref, _ = run(model, b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp, out = run(model, b, taps=model.tap_names())
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all()
    assert all(torch.isfinite(v.float()).all() for v in out.values())
    assert (lp.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(p6mrr):
    torch.manual_seed(0)
    model = build_mpnn("mpnn-small").eval()
    b = batch([p6mrr])
    with torch.no_grad():
        ref, _ = run(model, b)
        bc = {k: v.cuda() for k, v in b.items()}
        lp, out = run(model.cuda(), bc, taps=["decoder.0.edges"])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lp16, _ = run(model, bc)
    torch.testing.assert_close(lp.cpu(), ref, atol=1e-3, rtol=0)
    assert out["edge_index"].device.type == "cuda" and torch.isfinite(lp16).all()
    model.train()
    run(model, bc, generator=torch.Generator(device="cuda").manual_seed(0))


def test_activation_checkpointing_gives_the_same_gradients(p6mrr):
    """Each encoder/decoder layer recomputed in the backward pass, dropout and backbone noise replayed: the
    gradients equal those of stored activations."""
    b = batch([p6mrr])
    grads, calls = [], []
    for on in (False, True):
        torch.manual_seed(0)
        model = build_mpnn("mpnn-small").train()
        model.set_activation_checkpointing(on)
        count = [0]
        for layer in [*model.encoder_layers, *model.decoder_layers]:
            layer.forward = _counted(layer.forward, count)  # (forward hooks are muted in the recomputation)
        torch.manual_seed(1)  # the same dropout masks in both runs
        lp, hid = run(model, b, taps=("encoder",), generator=torch.Generator().manual_seed(2))
        (lp.square().mean() + hid["encoder"].square().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        calls.append(count[0])
    n_layers = len(model.encoder_layers) + len(model.decoder_layers)
    assert calls == [n_layers, 2 * n_layers]  # each layer run again in the backward pass when checkpointed
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


def _counted(forward, count: list[int]):
    def call(*args, **kwargs):
        count[0] += 1
        return forward(*args, **kwargs)

    return call
