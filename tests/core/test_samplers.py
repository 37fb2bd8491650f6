import math

import pytest
import torch

from reed.processes.flow import FlowProcess
from reed.sampling import euler_maruyama_sde, ode_sample, sample


def const_model(value: float):
    return lambda x, t, y: torch.full_like(x, value)


def test_euler_one_step():
    x = torch.tensor([[1.0, 2.0]])
    y = torch.zeros(1, dtype=torch.long)
    out = ode_sample(const_model(0.5), x, y, steps=1, null_class=10)
    assert torch.allclose(out, x - 0.5)  # x + (0 - 1) v


def test_heun_two_steps_hand_computed():
    # v(x, t) = t * x; times 1 -> 0.5 -> 0; Heun corrects the first step only
    model = lambda x, t, y: t.view(-1, 1) * x
    x = torch.tensor([[2.0]])
    y = torch.zeros(1, dtype=torch.long)
    v0 = 1.0 * 2.0
    x_e = 2.0 - 0.5 * v0  # Euler predictor = 1.0
    v1 = 0.5 * x_e
    x1 = 2.0 - 0.5 * 0.5 * (v0 + v1)  # = 1.375
    x2 = x1 - 0.5 * (0.5 * x1)  # plain Euler last step
    out = ode_sample(model, x, y, steps=2, heun=True, null_class=1)
    assert out.item() == pytest.approx(x2)


def test_cfg_and_guidance_interval():
    # conditional velocity 1, unconditional 0 -> guided u + w (c - u) = w inside the interval
    model = lambda x, t, y: (y != 7).float().view(-1, 1) * torch.ones_like(x)
    x = torch.zeros(1, 1)
    y = torch.zeros(1, dtype=torch.long)
    out = ode_sample(model, x, y, steps=4, null_class=7, cfg_scale=3.0)
    assert out.item() == pytest.approx(-3.0)
    # guidance only for t in [0, 0.5]: times 1, .75 | .5, .25 -> two unguided steps (v=1), two guided (v=3)
    out = ode_sample(model, x, y, steps=4, null_class=7, cfg_scale=3.0, guidance=(0.0, 0.5))
    assert out.item() == pytest.approx(-(0.25 * 1 + 0.25 * 1 + 0.25 * 3 + 0.25 * 3))


@pytest.mark.parametrize("interval,expected,batches", [
    # times 1 -> 0.5 -> 0; cond v = 1, uncond v = 0, w = 3 (guided v = 3); Heun corrects step 1 only.
    # (0, 0.5): step 1 starts at t=1, outside -> predictor and corrector unguided although t_next=0.5 is inside:
    #   x1 = 0 - 0.5 * (1 + 1)/2 = -0.5; step 2 at t=0.5 guided: x2 = -0.5 - 0.5 * 3 = -2.0 (t_next rule: -2.5)
    ((0.0, 0.5), -2.0, [1, 1, 2]),
    # (0.6, 1): step 1 guided in both evaluations although t_next=0.5 is outside:
    #   x1 = -0.5 * (3 + 3)/2 = -1.5; step 2 unguided: x2 = -1.5 - 0.5 = -2.0 (t_next rule: -1.5)
    ((0.6, 1.0), -2.0, [2, 2, 1]),
])
def test_heun_corrector_guidance_decided_at_t_cur(interval, expected, batches):
    seen = []

    def model(x, t, y):
        seen.append(x.shape[0])
        return (y != 7).float().view(-1, 1) * torch.ones_like(x)

    x, y = torch.zeros(1, 1), torch.zeros(1, dtype=torch.long)
    out = ode_sample(model, x, y, steps=2, heun=True, null_class=7, cfg_scale=3.0, guidance=interval)
    assert out.item() == pytest.approx(expected)
    assert seen == batches  # batch doubled exactly when guided: [predictor 1, corrector 1, step 2]


def test_sde_two_steps_hand_computed():
    fp = FlowProcess("linear")
    v = 0.3
    model = const_model(v)
    x = torch.tensor([[0.7]])
    y = torch.zeros(1, dtype=torch.long)
    out = euler_maruyama_sde(model, x, y, steps=2, null_class=1, generator=torch.Generator().manual_seed(5))
    xi = torch.randn(1, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64).item()
    # step 1: t=1 -> 0.04, drift d = v - 0.5 * 2t * s, s = ((t-1) v - x)/t
    t0, t1 = 1.0, 0.04
    s0 = ((t0 - 1) * v - 0.7) / t0
    d0 = v - 0.5 * 2 * t0 * s0
    x1 = 0.7 + d0 * (t1 - t0) + math.sqrt(2 * t0) * math.sqrt(t0 - t1) * xi
    s1 = ((t1 - 1) * v - x1) / t1
    d1 = v - 0.5 * 2 * t1 * s1
    x2 = x1 + d1 * (0 - t1)  # last step deterministic
    assert out.item() == pytest.approx(x2, rel=1e-5)
    assert fp.path == "linear"


def gaussian_velocity(m: float, s: float):
    """Exact velocity E[eps - x0 | x_t] for x0 ~ N(m, s^2) on the linear path."""

    def fn(x, t, y):
        tt = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        var = (1 - tt) ** 2 * s**2 + tt**2
        return -m + (tt - (1 - tt) * s**2) / var * (x - (1 - tt) * m)

    return fn


@pytest.mark.parametrize("sampler,steps", [("euler", 200), ("heun", 50), ("sde", 400)])
def test_samplers_transport_noise_to_gaussian_data(sampler, steps):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(20_000, 1, generator=g)
    y = torch.zeros(20_000, dtype=torch.long)
    out = sample(gaussian_velocity(2.0, 0.5), noise, y, sampler=sampler, steps=steps, null_class=1,
                 generator=torch.Generator().manual_seed(1))
    assert out.mean().item() == pytest.approx(2.0, abs=0.03)
    assert out.std().item() == pytest.approx(0.5, abs=0.03)


def test_bad_sampler_args():
    with pytest.raises(ValueError, match="unknown sampler 'ddim'"):
        sample(const_model(0), torch.zeros(1, 1), torch.zeros(1, dtype=torch.long), sampler="ddim", null_class=1)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        ode_sample(const_model(0), torch.zeros(1, 1), torch.zeros(1, dtype=torch.long), steps=0, null_class=1)


def test_per_element_guidance_scale_guides_each_part_of_a_packed_state_with_its_own_weight():
    """REG's packed (image, token) state: one Euler step from t=1 with v = u + w (c - u) per element, where the model
    returns c = 3 for real labels and u = 1 for the null label; image elements w = 2, token elements w = 1 (its
    conditional drift alone), so x0 = x1 - v = x1 - (1 + 2 * 2) and x1 - (1 + 1 * 2) respectively."""
    from reed.image.sit import build_sit
    from reed.sampling.samplers import ode_sample

    def model_fn(x, t, y):
        return torch.where((y == 10)[:, None], 1.0, 3.0).expand_as(x).to(x.dtype)

    sit = build_sit("SiT-T/4", input_size=8, in_channels=1, num_classes=10, cls_dim=3)
    w = sit.guidance_scale(2.0, 0.0)
    assert w.shape == (64 + 3,) and w[:64].eq(2.0).all() and w[64:].eq(1.0).all()
    assert sit.guidance_scale(1.0, 5.0) == 1.0  # no guidance of either while the image is not guided
    assert sit.guidance_scale(2.0, None)[64:].eq(2.0).all() and sit.guidance_scale(2.0, 4.0)[64:].eq(4.0).all()
    assert build_sit("SiT-T/4", input_size=8, in_channels=1, num_classes=10).guidance_scale(2.0, 4.0) == 2.0
    x1 = torch.zeros(2, 67)
    x0 = ode_sample(model_fn, x1, torch.tensor([0, 1]), steps=1, null_class=10, cfg_scale=w)
    assert torch.equal(x0[:, :64], torch.full((2, 64), -5.0)) and torch.equal(x0[:, 64:], torch.full((2, 3), -3.0))
