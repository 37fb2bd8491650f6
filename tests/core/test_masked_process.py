"""Masking diffusion: forward corruption, both loss parameterisations, and the reverse sampler's step probabilities."""

import math

import pytest
import torch

from reed.processes.masked import NEG_INF, MaskedDiffusion
from reed.sampling.masked import masked_reverse_step, sample_masked, tempered_log_probs

V, MASK = 22, 21


def test_corrupt_masks_with_probability_t_and_always_masks_invalid():
    p = MaskedDiffusion()
    g = torch.Generator().manual_seed(0)
    S = torch.randint(0, 20, (4, 5000), generator=g)
    valid = torch.ones_like(S, dtype=torch.bool)
    valid[:, -100:] = False
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    c = p.corrupt(S, valid, generator=g, t=t)
    frac = c.is_masked[:, :-100].float().mean(1)
    torch.testing.assert_close(frac, t, atol=0.02, rtol=0)
    assert (c.S_t[:, -100:] == MASK).all() and not c.is_masked[:, -100:].any()
    keep = ~c.is_masked & valid
    assert (c.S_t[keep] == S[keep]).all()
    ts = p.sample_time(20000, generator=g)
    assert ts.min() >= 0.01 and ts.max() <= 0.99
    assert abs(ts.mean().item() - 0.5) < 0.01


def test_reference_loss_matches_hand_formula():
    """Smoothed CE over all 22 classes on every valid position, summed, divided by loss_norm."""
    p = MaskedDiffusion(loss_norm=2000.0, label_smoothing=0.1)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, V, generator=g)
    lp = logits.log_softmax(-1)
    S = torch.tensor([[0, 5, 19], [3, 3, 20]])
    valid = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    c = p.corrupt(S, valid, generator=g)
    total = 0.0
    for b in range(2):
        for i in range(3):
            if not valid[b, i]:
                continue
            target = [(0.1 / V + (1.0 if k == S[b, i] else 0.0)) / 1.1 for k in range(V)]
            total -= sum(target[k] * lp[b, i, k].item() for k in range(V))
    assert p.loss(lp, S, valid, c).item() == pytest.approx(total / 2000.0, rel=1e-5)
    mean = MaskedDiffusion(loss_norm=0.0).loss(lp, S, valid, c)
    assert mean.item() == pytest.approx(total / 5.0, rel=1e-5)


def test_mdlm_carry_over_and_weighting():
    p = MaskedDiffusion(parameterization="mdlm", label_smoothing=0.0, loss_norm=0.0)
    g = torch.Generator().manual_seed(2)
    lp = torch.randn(1, 4, V, generator=g).log_softmax(-1)
    S = torch.tensor([[1, 2, 3, 4]])
    valid = torch.ones_like(S, dtype=torch.bool)
    c = p.corrupt(S, valid, t=torch.tensor([0.5]), generator=g)
    c.S_t = torch.tensor([[MASK, 2, MASK, 4]])
    c.is_masked = c.S_t == MASK
    out = p.log_probs(lp, c.S_t)
    assert (out[..., MASK] <= NEG_INF / 2).all()
    assert out[0, 1, 2].item() == 0.0 and out[0, 3, 4].item() == 0.0  # carried over
    torch.testing.assert_close(out[0, 0].exp().sum(), torch.tensor(1.0))
    # loss = sum over masked positions of -log p(true) / t, averaged over the 4 valid positions
    renorm = lp[0, :, :MASK].log_softmax(-1)
    expect = (-(renorm[0, 1] + renorm[2, 3]) / 0.5) / 4
    assert p.loss(lp, S, valid, c).item() == pytest.approx(expect.item(), rel=1e-5)
    # visible positions do not contribute, whatever the model says there
    lp2 = lp.clone()
    lp2[0, 1] = torch.randn(V).log_softmax(-1)
    assert p.loss(lp2, S, valid, c).item() == pytest.approx(expect.item(), rel=1e-5)


def test_reverse_step_probabilities():
    """From s1 to s2 a masked position unmasks with probability (s1-s2)/s1 and takes token c with the tempered
    probability; committed tokens never change."""
    B, L = 1, 40000
    probs = torch.zeros(V)
    probs[[0, 7, 12]] = torch.tensor([0.5, 0.3, 0.2])
    lp = probs.clamp_min(1e-30).log().expand(B, L, V).clone()
    S = torch.full((B, L), MASK)
    S[0, :1000] = 4  # already decoded
    valid = torch.ones(B, L, dtype=torch.bool)
    g = torch.Generator().manual_seed(3)
    s1, s2 = 0.8, 0.6
    out = masked_reverse_step(S, lp, valid, s1, s2, mask_id=MASK, temperature=1.0, generator=g)
    assert (out[0, :1000] == 4).all()
    new = out[0, 1000:]
    unmasked = new != MASK
    assert unmasked.float().mean().item() == pytest.approx((s1 - s2) / s1, abs=0.01)
    counts = torch.bincount(new[unmasked], minlength=V).float() / unmasked.sum()
    torch.testing.assert_close(counts[[0, 7, 12]], probs[[0, 7, 12]], atol=0.015, rtol=0)
    # temperature 0.5 squares the probabilities (renormalised)
    out_t = masked_reverse_step(S, lp, valid, s1, 0.0, mask_id=MASK, temperature=0.5, generator=g)
    sharp = probs[[0, 7, 12]] ** 2 / (probs[[0, 7, 12]] ** 2).sum()
    new = out_t[0, 1000:]
    assert (new != MASK).all()  # s2 = 0 unmasks everything
    counts = torch.bincount(new, minlength=V).float() / new.numel()
    torch.testing.assert_close(counts[[0, 7, 12]], sharp, atol=0.015, rtol=0)


def test_tempered_log_probs_never_choose_mask():
    lp = torch.full((1, 2, V), -10.0)
    lp[..., MASK] = 0.0
    out = tempered_log_probs(lp, MASK, 0.1)
    assert out.argmax(-1).ne(MASK).all()
    torch.testing.assert_close(out[..., :MASK].exp().sum(-1), torch.ones(1, 2))


def test_sample_masked_returns_final_sampled_state():
    """With a model that always predicts token 3 everywhere, every designed position is 3 and invalid ones are X;
    the number of model calls follows the grid, and the positions unmasked per step follow the exact reverse."""
    L = 50
    valid = torch.ones(2, L, dtype=torch.bool)
    valid[1, 40:] = False
    calls = []

    def denoise(S_t):
        calls.append((S_t == MASK).sum().item())
        lp = torch.full((*S_t.shape, V), -30.0)
        lp[..., 3] = 0.0
        return lp

    out = sample_masked(denoise, valid, steps=20, temperature=0.1, generator=torch.Generator().manual_seed(0))
    assert (out[valid] == 3).all() and (out[~valid] == 20).all()
    assert calls[0] == 2 * L and all(a >= b for a, b in zip(calls, calls[1:]))
    assert len(calls) <= 19


def test_sample_masked_keeps_fixed_tokens_and_confidence_order():
    L = 30
    valid = torch.ones(1, L, dtype=torch.bool)
    init = torch.full((1, L), MASK)
    init[0, :5] = 7

    conf = torch.linspace(0.5, 0.99, L)  # later positions more confident (max-prob = conf)

    def denoise(S_t):
        lp = torch.full((*S_t.shape, V), -30.0)
        lp[..., 1] = conf.log()
        lp[..., 2] = (1 - conf).log()
        return lp

    seen = []

    def recording(S_t):
        seen.append(S_t.clone())
        return denoise(S_t)

    out = sample_masked(recording, valid, steps=10, temperature=1.0, order="confidence", init=init,
                        generator=torch.Generator().manual_seed(0))
    assert (out[0, :5] == 7).all() and (out != MASK).all()
    # in every intermediate state the unmasked (non-fixed) positions are the most confident ones
    for S in seen[1:]:
        dec = (S[0, 5:] != MASK).nonzero().flatten()
        if 0 < len(dec) < L - 5:
            assert dec.min() >= (L - 5) - len(dec)
    assert math.isfinite(float(out.float().mean()))
