"""The peer methods' loss formulas against the hand-computed cases of spec/methods.md (REG, iREPA, HASTE, SRA,
Dispersive Loss)."""

import math

import pytest
import torch

from reed.align import ConvProjector, negative_cosine, spatial_zscore
from reed.attention_align import attention_alignment, attention_cross_entropy
from reed.curriculum import alignment_weight
from reed.processes.flow import FlowProcess
from reed.regularizers import dispersive_loss
from reed.self_alignment import SelfAlignHead, legacy_epoch_weight, self_align_loss, teacher_time


# ------------------------------------------------------------------------------------------------ iREPA (§2.5)
@pytest.mark.parametrize("gamma, want", [(1.0, [-1.1618941, -0.3872980, 0.3872980, 1.1618941]),
                                         (0.6, [-0.3872980, 0.3872980, 1.1618941, 1.9364902])])
def test_spatial_zscore_hand_case(gamma, want):
    z = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 4, 1)  # T=4 tokens, d=1: mu 2.5, unbiased s sqrt(5/3)
    out = spatial_zscore(z, gamma=gamma)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.flatten(), torch.tensor(want), atol=1e-6, rtol=0)


def test_spatial_zscore_is_per_sample_and_channel():
    z = torch.randn(3, 16, 5) * torch.tensor([1.0, 10.0, 0.1, 3.0, 7.0]) + 4.0
    out = spatial_zscore(z)
    torch.testing.assert_close(out.mean(1), torch.zeros(3, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(1), torch.ones(3, 5), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"\(B, T>=2, D\)"):
        spatial_zscore(torch.randn(3, 5))


def _conv(kernel_weight: torch.Tensor) -> ConvProjector:
    proj = ConvProjector(1, 1, kernel=3)
    with torch.no_grad():
        proj.conv.weight.copy_(kernel_weight.reshape(1, 1, 3, 3))
        proj.conv.bias.zero_()
    return proj


def test_conv_projector_layout_hand_cases():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 4, 1)  # 2x2 grid, row-major
    torch.testing.assert_close(_conv(torch.ones(3, 3))(x).flatten(), torch.tensor([10.0, 10.0, 10.0, 10.0]))
    right = torch.zeros(3, 3)
    right[1, 2] = 1.0  # the right neighbour (cross-correlation, zero padding)
    torch.testing.assert_close(_conv(right)(x).flatten(), torch.tensor([2.0, 0.0, 4.0, 0.0]))


def test_conv_projector_identity_and_shape():
    proj = ConvProjector(6, 6, kernel=1)
    with torch.no_grad():
        proj.conv.weight.copy_(torch.eye(6).reshape(6, 6, 1, 1))
        proj.conv.bias.zero_()
    h = torch.randn(2, 9, 6)
    torch.testing.assert_close(proj(h), h)
    assert ConvProjector(6, 11)(h).shape == (2, 9, 11)
    with pytest.raises(ValueError, match="not a square grid"):
        ConvProjector(6, 11)(torch.randn(2, 8, 6))
    with pytest.raises(ValueError, match="odd"):
        ConvProjector(6, 11, kernel=2)


# ------------------------------------------------------------------------------------------------- REG (§1.6)
def test_reg_class_token_velocity_loss_hand_case():
    flow = FlowProcess("linear")
    c, eps, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([0.25])
    torch.testing.assert_close(flow.interpolate(c, eps, t), torch.tensor([[0.75, 0.5]]))
    v = flow.velocity(c, eps, t)
    torch.testing.assert_close(v, torch.tensor([[-1.0, 2.0]]))
    loss = flow.loss(torch.zeros_like(v), v)  # the zero-initialised class head
    torch.testing.assert_close(loss, torch.tensor([2.5]))
    torch.testing.assert_close(0.03 * loss, torch.tensor([0.075]))


def test_reg_cosine_path_keeps_the_class_target_per_sample():
    """The reference broadcasts (B,1,1,1) x (B,c) to (B,1,B,c) on the cosine path; ours stays (B,c)."""
    flow = FlowProcess("cosine")
    c, eps, t = torch.randn(4, 7), torch.randn(4, 7), torch.rand(4)
    v = flow.velocity(c, eps, t)
    assert v.shape == (4, 7)
    half = math.pi / 2
    want = -half * torch.sin(half * t)[:, None] * c + half * torch.cos(half * t)[:, None] * eps
    torch.testing.assert_close(v, want)


def test_reg_alignment_over_the_class_slot_hand_case():
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    p = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    torch.testing.assert_close(negative_cosine(p, z), torch.tensor([-0.5]))


# ----------------------------------------------------------------------------------------------- HASTE (§3.5)
def test_attention_cross_entropy_hand_case():
    teacher = torch.zeros(1, 1, 2, 2)
    student = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]]).reshape(1, 1, 2, 2)
    torch.testing.assert_close(attention_cross_entropy(student, teacher), torch.tensor([0.7650677]), atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(attention_cross_entropy(teacher, teacher), torch.tensor([math.log(2.0)]))
    # two block pairs average; the first `heads` heads only
    s2 = torch.cat([student, torch.full((1, 1, 2, 2), 5.0)], 1)
    out = attention_alignment([s2, teacher.repeat(1, 2, 1, 1)], [teacher.repeat(1, 2, 1, 1)] * 2, heads=1)
    torch.testing.assert_close(out, torch.tensor([(0.7650677 + math.log(2.0)) / 2]), atol=1e-6, rtol=0)


def test_attention_cross_entropy_is_finite_in_half_precision():
    """exp(-20) underflows in fp16: the reference's log(softmax) gives 0 * -inf = NaN; log_softmax in fp32 not."""
    s = torch.tensor([[0.0, -20.0], [0.0, 0.0]]).reshape(1, 1, 2, 2)
    naive = -(torch.softmax(s.half(), -1) * torch.log(torch.softmax(s.half(), -1))).sum(-1)
    assert torch.isnan(naive).any()  # the failure being fixed
    out = attention_cross_entropy(s.half(), s.half())
    torch.testing.assert_close(out, attention_cross_entropy(s, s), atol=1e-6, rtol=0)
    assert torch.isfinite(out).all()


def test_hard_stop_of_alignment():
    assert alignment_weight(249_999, stop=250_000) == 1.0
    assert alignment_weight(250_000, stop=250_000) == 0.0
    assert alignment_weight(10**7, stop=0) == 1.0  # 0: never stop
    assert alignment_weight(50, decay="linear", steps=100, stop=60) == 0.5
    assert alignment_weight(60, decay="linear", steps=100, stop=60) == 0.0


# ------------------------------------------------------------------------------------------------- SRA (§4.5)
def test_sra_teacher_time_and_schedule():
    torch.testing.assert_close(teacher_time(torch.tensor([0.5, 0.1]), torch.tensor([0.5, 1.0]), 0.2),
                               torch.tensor([0.4, 0.0]))
    assert legacy_epoch_weight(149) == 0.2
    assert legacy_epoch_weight(150) == pytest.approx(0.1995400, abs=1e-7)
    assert legacy_epoch_weight(800) == pytest.approx(0.0446714, abs=1e-7)


def test_sra_losses_hand_cases():
    a, b = torch.tensor([0.0, 0.02, 1.0]).reshape(1, 1, 3), torch.zeros(1, 1, 3)
    sl1 = self_align_loss(a, b, "smooth_l1")
    torch.testing.assert_close(sl1, torch.tensor([0.3263333]), atol=1e-7, rtol=0)
    torch.testing.assert_close(0.2 * sl1, torch.tensor([0.0652667]), atol=1e-7, rtol=0)
    p = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    z = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    torch.testing.assert_close(self_align_loss(p, z, "cos"), torch.tensor([0.5]))
    torch.testing.assert_close(self_align_loss(p, z, "cos_tokens"), torch.tensor([0.6464466]), atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="unknown self-alignment loss 'l2'"):
        self_align_loss(p, z, "l2")


def test_sra_head_shape_and_init():
    head = SelfAlignHead(8)
    assert head(torch.randn(2, 4, 8)).shape == (2, 4, 8)
    assert all(float(m.bias.detach().abs().max()) == 0.0 for m in head.net if isinstance(m, torch.nn.Linear))
    assert sum(p.numel() for p in head.parameters()) == 4 * 8 * 8 + 3 * 8


# ------------------------------------------------------------------------------------------ Dispersive (§5.4)
def test_dispersive_loss_hand_cases():
    two = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(dispersive_loss(two), torch.tensor(-0.3798855), atol=1e-6, rtol=0)
    three = torch.tensor([[0.0], [1.0], [2.0]])
    torch.testing.assert_close(dispersive_loss(three), torch.tensor(-0.6913379), atol=1e-6, rtol=0)
    # tau = 0.5 doubles every exponent
    want = math.log((2 + 2 * math.exp(-2.0)) / 4)
    torch.testing.assert_close(dispersive_loss(two, tau=0.5), torch.tensor(want, dtype=torch.float32))


def test_dispersive_loss_limits_and_gradient():
    same = torch.ones(5, 3, 4)
    torch.testing.assert_close(dispersive_loss(same), torch.tensor(0.0), atol=1e-6, rtol=0)
    far = torch.arange(5.0).reshape(5, 1, 1).expand(5, 3, 4) * 1e3
    torch.testing.assert_close(dispersive_loss(far), torch.tensor(-math.log(5)), atol=1e-5, rtol=0)
    h = torch.randn(6, 3, 4, requires_grad=True)
    dispersive_loss(h).backward()
    assert torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="tau=0"):
        dispersive_loss(h, tau=0)
