"""Alignment on kNN edges with masks, standardisation with masked statistics, and token-pooled reduction."""

import pytest
import torch
import torch.nn.functional as F

from reed.align import gather_edges, masked_standardize
from reed.objective import AlignTerm, Curriculum, DenoiserOutput, Objective, ReedModule


class _Den(torch.nn.Module):
    hidden_size = 4

    def tap_dim(self, tap):
        return {"nodes": 4, "edges": 6}[tap]


class _Process:
    pass


def test_gather_edges_hand_values():
    z = torch.arange(2 * 3 * 3 * 1, dtype=torch.float32).reshape(2, 3, 3, 1)
    idx = torch.tensor([[[0, 2], [1, 0], [2, 2]], [[1, 1], [0, 2], [2, 0]]])
    out = gather_edges(z, idx)
    assert out.shape == (2, 3, 2, 1)
    for b in range(2):
        for i in range(3):
            for k in range(2):
                assert out[b, i, k, 0] == z[b, i, idx[b, i, k], 0]
    with pytest.raises(ValueError, match="pair targets"):
        gather_edges(torch.zeros(2, 3, 2, 1), idx)


def test_masked_standardize_ignores_padding():
    z = torch.tensor([[[1.0], [3.0], [1e6]]])
    m = torch.tensor([[1, 1, 0]])
    out = masked_standardize(z, m)
    torch.testing.assert_close(out[0, :2, 0], torch.tensor([-1.0, 1.0]), atol=1e-5, rtol=0)


def test_edge_term_matches_manual_computation_and_ignores_masked_edges():
    torch.manual_seed(0)
    B, L, K, Dz = 2, 5, 3, 8
    terms = [AlignTerm("pair", Dz, "edges", kind="edges", coeff=2.0, projector_dim=16, projector_layers=2,
                       standardize=True, modality="structure"),
             AlignTerm("single", 5, "nodes", kind="tokens", coeff=0.5, projector_dim=10, projector_layers=2,
                       modality="structure")]
    module = ReedModule(_Den(), terms, 4)
    assert module.projectors["pair"].net[0].in_features == 6
    obj = Objective(_Process(), terms, method="reed", proj_coeff=0.2, curriculum=Curriculum())
    mask = torch.ones(B, L)
    mask[1, 3:] = 0
    edge_index = torch.randint(0, L, (B, L, K))
    edge_mask = mask[:, :, None] * torch.gather(mask, 1, edge_index.flatten(1)).view(B, L, K)
    h_e, h_n = torch.randn(B, L, K, 6), torch.randn(B, L, 4)
    z_pair, z_single = torch.randn(B, L, L, Dz), torch.randn(B, L, 5)
    out = DenoiserOutput(torch.tensor(1.5), torch.rand(B), {"edges": h_e, "nodes": h_n}, token_mask=mask,
                         edge_index=edge_index, edge_mask=edge_mask)
    loss, parts = obj.combine(module, out, {"pair": z_pair, "single": z_single}, step=0)

    # by hand: gather, standardise over valid edges, project, cosine, mean over all valid edges of the batch
    zg = torch.stack([z_pair[b][torch.arange(L)[:, None], edge_index[b]] for b in range(B)])
    m = edge_mask.bool()
    mu, sd = zg[m].mean(0), zg[m].std(0, unbiased=False)
    zs = (zg - mu) / (sd + 1e-6)
    cos = F.cosine_similarity(module.projectors["pair"](h_e), zs, dim=-1)
    l_pair = -(cos * edge_mask).sum() / edge_mask.sum()
    cos_s = F.cosine_similarity(module.projectors["single"](h_n), z_single, dim=-1)
    l_single = -(cos_s * mask).sum() / mask.sum()
    assert parts["align/pair"].item() == pytest.approx(l_pair.item(), abs=1e-5)
    assert parts["align/single"].item() == pytest.approx(l_single.item(), abs=1e-5)
    expect = 1.5 + 0.2 * (2.0 * l_pair + 0.5 * l_single)
    assert loss.item() == pytest.approx(expect.item(), abs=1e-5)

    # targets on masked edges / padded residues do not matter
    z2 = z_pair.clone()
    z2[1, 3:] = 1e3
    z2[1, :, 3:] = -1e3
    zs2 = z_single.clone()
    zs2[1, 3:] = 7.0
    loss2, _ = obj.combine(module, out, {"pair": z2, "single": zs2}, step=0)
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-5)
    loss.backward()
    assert module.projectors["pair"].net[0].weight.grad.abs().sum() > 0


def test_epoch_curriculum_changes_once_per_epoch():
    terms = [AlignTerm("s", 3, "nodes")]
    cur = Curriculum(gen_start=0, gen_warmup=50, align_decay="cosine", align_steps=200, total=200, steps_per_unit=7)
    obj = Objective(_Process(), terms, method="reed", proj_coeff=0.2, curriculum=cur)
    assert obj.weights(0) == (0.0, 1.0)
    assert obj.weights(6) == (0.0, 1.0)  # still epoch 0: alignment only
    w_gen, w_align = obj.weights(7 * 10 + 3)  # epoch 10
    assert w_gen == pytest.approx(10 / 50)
    assert w_align == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi * 10 / 200)).item()))
    assert obj.weights(7 * 60)[0] == 1.0
    assert obj.weights(7 * 100)[1] == pytest.approx(0.5)
