import math

import pytest
import torch

from reed.curriculum import alignment_weight, generative_weight, time_weight


def test_generative_weight_phases_and_ramp():
    kw = dict(start=10, warmup=20, total=100)
    assert generative_weight(0, **kw) == 0.0
    assert generative_weight(9, **kw) == 0.0
    assert generative_weight(10, **kw) == 0.0  # ramp starts at 0
    assert generative_weight(15, **kw) == pytest.approx(5 / 20)
    assert generative_weight(29, **kw) == pytest.approx(19 / 20)
    assert generative_weight(30, **kw) == 1.0
    assert generative_weight(10_000, **kw) == 1.0


def test_generative_weight_decays_reach_zero_at_total():
    kw = dict(start=0, warmup=10, total=110)
    assert generative_weight(10, decay="linear", **kw) == 1.0
    assert generative_weight(60, decay="linear", **kw) == pytest.approx(0.5)
    assert generative_weight(110, decay="linear", **kw) == pytest.approx(0.0)
    assert generative_weight(500, decay="linear", **kw) == pytest.approx(0.0)
    # cosine with the intended parentheses: 0.5 (1 + cos(pi (s-top)/(total-top)))
    assert generative_weight(10, decay="cosine", **kw) == pytest.approx(1.0)
    assert generative_weight(35, decay="cosine", **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert generative_weight(60, decay="cosine", **kw) == pytest.approx(0.5)
    assert generative_weight(110, decay="cosine", **kw) == pytest.approx(0.0)
    assert generative_weight(1000, decay="cosine", **kw) == pytest.approx(0.0)


def test_reference_precedence_bug_is_not_reproduced():
    # the reference computed 0.5(1+cos(pi (s-top)/total - top)) which at s=top is 0.5(1+cos(-top)) != 1
    top, total = 50_000, 1_000_000
    buggy = 0.5 * (1 + math.cos(math.pi * 0 / total - top))
    ours = generative_weight(top, warmup=top, decay="cosine", total=total)
    assert ours == pytest.approx(1.0) and abs(buggy - 1.0) > 1e-3


def test_alignment_weight_clamped_and_monotone():
    assert alignment_weight(123, decay="constant") == 1.0
    assert alignment_weight(0, decay="linear", steps=100) == 1.0
    assert alignment_weight(25, decay="linear", steps=100) == pytest.approx(0.75)
    assert alignment_weight(150, decay="linear", steps=100) == 0.0
    assert alignment_weight(50, decay="cosine", steps=100) == pytest.approx(0.5)
    assert alignment_weight(100, decay="cosine", steps=100) == pytest.approx(0.0)
    # the reference's unclamped cosine returns to 1 at 2*steps; ours stays at 0
    assert alignment_weight(200, decay="cosine", steps=100) == pytest.approx(0.0)
    ws = [alignment_weight(s, decay="cosine", steps=100) for s in range(0, 400)]
    assert all(a >= b - 1e-12 for a, b in zip(ws, ws[1:]))


def test_bad_decay_names():
    with pytest.raises(ValueError, match="unknown decay 'cosin'"):
        generative_weight(0, decay="cosin")
    with pytest.raises(ValueError, match="steps must be > 0"):
        alignment_weight(3, decay="linear", steps=0)


def test_time_weights_per_sample():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(time_weight(t, "constant"), torch.ones(4))
    assert torch.allclose(time_weight(t, "linear"), torch.tensor([1.0, 0.75, 0.5, 0.0]))
    assert torch.allclose(time_weight(t, "cosine"), torch.tensor([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.0]))
    sig = torch.tensor([1 / (1 + math.exp(10 * (v - 0.5))) for v in t.tolist()])
    assert torch.allclose(time_weight(t, "sigmoid"), sig)
    assert torch.allclose(time_weight(t, "loglinear"), torch.tensor([1 - math.log(1 + v) for v in t.tolist()]))
    assert time_weight(t, "cutoff", (0.2, 0.6)).tolist() == [0.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="schedule 'nope'"):
        time_weight(t, "nope")
