import math

import pytest
import torch

from reed.processes.flow import FlowProcess


def test_linear_interpolant_and_velocity():
    fp = FlowProcess("linear")
    x0, eps = torch.tensor([[2.0, -1.0]]), torch.tensor([[0.5, 3.0]])
    t = torch.tensor([0.25])
    assert torch.allclose(fp.interpolate(x0, eps, t), 0.75 * x0 + 0.25 * eps)
    assert torch.allclose(fp.velocity(x0, eps, t), eps - x0)


def test_cosine_interpolant_and_velocity():
    fp = FlowProcess("cosine")
    x0, eps = torch.tensor([[1.0]]), torch.tensor([[2.0]])
    t = torch.tensor([1 / 3])
    a, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    assert fp.interpolate(x0, eps, t).item() == pytest.approx(a * 1 + s * 2)
    da, ds = -math.pi / 2 * s, math.pi / 2 * a
    assert fp.velocity(x0, eps, t).item() == pytest.approx(da * 1 + ds * 2)
    # the velocity is the time derivative of the path
    h = 1e-3
    num = (fp.interpolate(x0, eps, t + h) - fp.interpolate(x0, eps, t - h)) / (2 * h)
    assert num.item() == pytest.approx(fp.velocity(x0, eps, t).item(), rel=1e-3)


def test_time_sampling_ranges_and_lognormal_formula():
    g = torch.Generator().manual_seed(0)
    t = FlowProcess("linear").sample_time(10_000, generator=g)
    assert t.min() >= 0 and t.max() <= 1 and abs(t.mean().item() - 0.5) < 0.02
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    t_ln = FlowProcess("linear", "lognormal").sample_time(5, generator=g1)
    s = torch.exp(torch.randn(5, generator=g2))
    assert torch.allclose(t_ln, s / (1 + s))
    g1.manual_seed(2)
    g2.manual_seed(2)
    t_cos = FlowProcess("cosine", "lognormal").sample_time(5, generator=g1)
    assert torch.allclose(t_cos, (2 / math.pi) * torch.atan(torch.exp(torch.randn(5, generator=g2))))
    # lognormal with mean 0 puts the median at t = 0.5
    med = FlowProcess("linear", "lognormal").sample_time(20_001, generator=g1).median().item()
    assert abs(med - 0.5) < 0.02


def test_per_sample_loss_and_corrupt():
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])
    assert FlowProcess.loss(pred, target).tolist() == [1.0, 4.0]
    fp = FlowProcess()
    x0 = torch.randn(3, 1, 4, 4)
    c = fp.corrupt(x0, generator=torch.Generator().manual_seed(0))
    assert c.x_t.shape == x0.shape and c.t.shape == (3,)
    assert torch.allclose(c.x_t, fp.interpolate(x0, c.noise, c.t))
    assert torch.allclose(c.target, c.noise - x0)


def test_score_from_velocity_linear_closed_form():
    fp = FlowProcess("linear")
    v, x, t = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0.2, 0.4, 0.6, 0.9])
    expected = ((t[:, None] - 1) * v - x) / t[:, None]
    assert torch.allclose(fp.score_from_velocity(v, x, t), expected, atol=1e-6)
    # Gaussian data check: x0 ~ N(0, I) gives x_t ~ N(0, (1-t)^2 + t^2) with score -x / var
    x0, eps = torch.randn(200_000, 1), torch.randn(200_000, 1)
    tt = torch.full((200_000,), 0.3)
    xt = fp.interpolate(x0, eps, tt)
    var = 0.7**2 + 0.3**2
    # optimal velocity E[eps - x0 | x_t] = (0.3 - 0.7) x_t / var
    v_opt = (0.3 - 0.7) * xt / var
    assert torch.allclose(fp.score_from_velocity(v_opt, xt, tt), -xt / var, atol=1e-5)


def test_bad_names():
    with pytest.raises(ValueError, match="unknown path 'quadratic'"):
        FlowProcess("quadratic")
    with pytest.raises(ValueError, match="unknown time sampling"):
        FlowProcess("linear", "beta")
