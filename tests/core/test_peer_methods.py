"""The peer methods as presets of the one objective (REED's Objective): iREPA's conv projector and spatial target
normalisation, HASTE's hard stop, SRA's self-alignment to the EMA teacher, the dispersive regulariser, each against
hand-computed losses, and the config checks that go with them."""

import math

import pytest
import torch
from torch import nn

from reed.align import ConvProjector, Projector
from reed.objective import (
    AlignTerm,
    Curriculum,
    DispersiveTerm,
    Objective,
    SelfAlignTerm,
    active_terms,
)
from reed.processes.flow import Corrupted, FlowProcess


class FixedProcess(FlowProcess):
    """Linear flow with fixed t and zero noise: x_t = (1 - t) x0, target -x0."""

    def __init__(self, t):
        super().__init__("linear")
        self.t = t

    def corrupt(self, x0, generator=None):
        noise = torch.zeros_like(x0)
        return Corrupted(self.interpolate(x0, noise, self.t), self.t, self.velocity(x0, noise, self.t), noise)


class Toy(nn.Module):
    """Prediction 0; hidden state of every tap given (B,T,D); ``depth`` blocks; records its calls."""

    def __init__(self, hidden, depth=2, dim=2):
        super().__init__()
        self.hidden, self.depth, self.hidden_size = hidden, depth, dim
        self.w = nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, x, t, y, taps=()):
        self.calls.append((x.clone(), t.clone(), y.clone()))
        return x * self.w, {d: self.hidden[d] * (1 + self.w) for d in taps}


def identity_projectors(mod):
    for name in mod.projectors:
        mod.projectors[name] = nn.Identity()
    return mod


X0 = torch.ones(1, 1, 2, 2)  # generative loss of the zero prediction: mean((0 - (-1))^2) = 1
Y = torch.zeros(1, dtype=torch.long)


# ------------------------------------------------------------------------------------------------------ iREPA
def test_irepa_resolves_auto_projector_and_norm_for_token_targets_only():
    terms = [AlignTerm("tok", 4, 1, "tokens"), AlignTerm("pool", 4, 1, "pooled", modality="image"),
             AlignTerm("mine", 4, 1, "tokens", projector="mlp", target_norm="none")]
    got = {t.name: (t.projector, t.target_norm) for t in active_terms(terms, "irepa")}
    assert got == {"tok": ("conv", "spatial"), "pool": ("mlp", "none"), "mine": ("mlp", "none")}
    assert {t.projector for t in active_terms(terms, "repa")} == {"mlp"}
    combo = active_terms([AlignTerm("tok", 4, 1, projector="conv")], "reed")  # a combination: reed + conv
    assert combo[0].projector == "conv" and combo[0].target_norm == "none"
    with pytest.raises(ValueError, match="target 'pool': projector='conv' needs a token grid"):
        active_terms([AlignTerm("pool", 4, 1, "pooled", projector="conv")], "reed")
    obj = Objective(FixedProcess(torch.tensor([0.5])), terms, method="irepa")
    mod = obj.build_module(Toy({1: torch.zeros(1, 4, 2)}))
    assert isinstance(mod.projectors["tok"], ConvProjector) and isinstance(mod.projectors["pool"], Projector)


@pytest.mark.parametrize("norm, gamma, want", [("none", 0.6, -1.0), ("spatial", 1.0, 0.0), ("spatial", 0.6, -0.5)])
def test_spatial_normalisation_inside_the_loss(norm, gamma, want):
    """Targets [1,2,3,4] on 4 tokens (d=1) against a constant prediction: the cosine of 1-d vectors is the sign
    product; z-scored (gamma 1) the signs are [-,-,+,+] (mean 0), with gamma 0.6 [-,+,+,+] (mean 0.5)."""
    h = torch.ones(1, 4, 1)
    z = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 4, 1)
    terms = [AlignTerm("tok", 1, 1, "tokens", target_norm=norm, target_norm_gamma=gamma)]
    obj = Objective(FixedProcess(torch.tensor([0.5])), terms, method="repa", proj_coeff=1.0)
    mod = identity_projectors(obj.build_module(Toy({1: h}, dim=1)))
    loss, parts = obj(mod, X0, Y, {"tok": z}, step=0)
    assert parts["align/tok"].item() == pytest.approx(want, abs=1e-6)
    assert loss.item() == pytest.approx(1.0 + want, abs=1e-6)


# ------------------------------------------------------------------------------------------------------ HASTE
def test_haste_hard_stop_leaves_the_generative_loss_alone():
    h = torch.tensor([[[1.0, 0.0]]])
    terms = [AlignTerm("tok", 2, 1, "tokens")]
    with pytest.raises(ValueError, match="objective.curriculum.align_stop > 0"):
        Objective(FixedProcess(torch.tensor([0.5])), terms, method="haste")
    obj = Objective(FixedProcess(torch.tensor([0.5])), terms, method="haste", curriculum=Curriculum(align_stop=100))
    mod = identity_projectors(obj.build_module(Toy({1: h})))
    z = {"tok": torch.tensor([[[1.0, 0.0]]])}
    before, parts = obj(mod, X0, Y, z, step=99)
    assert (parts["w_align"].item(), parts["align/tok"].item()) == (1.0, -1.0)
    assert before.item() == pytest.approx(1.0 - 0.5)
    after, parts = obj(mod, X0, Y, {}, step=100)  # alignment no longer computed: no target needed
    assert parts["w_align"].item() == 0.0 and "align/tok" not in parts
    assert after.item() == parts["loss_gen"].item() == 1.0
    # the stop works for any method, the REED curriculum included
    reed = Objective(FixedProcess(torch.tensor([0.5])), terms, method="reed", curriculum=Curriculum(align_stop=10))
    assert reed.weights(9)[1] == 1.0 and reed.weights(10)[1] == 0.0


# ------------------------------------------------------------------------------------------------- Dispersive
def test_disp_preset_adds_the_dispersive_term_at_the_last_block():
    h = torch.tensor([[[0.0, 0.0]], [[1.0, 1.0]]])  # B=2, M=2: L_disp = -0.3798855
    obj = Objective(FixedProcess(torch.tensor([0.5, 0.5])), [AlignTerm("tok", 2, 1)], method="disp")
    assert obj.terms == [] and obj.dispersive.coeff == 0.25
    mod = obj.build_module(Toy({2: h}, depth=2))
    assert obj.taps == [2] and obj.dispersive.depth == 2
    loss, parts = obj(mod, torch.ones(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), {}, step=0)
    assert parts["dispersive"].item() == pytest.approx(-0.3798855, abs=1e-6)
    assert loss.item() == pytest.approx(1.0 + 0.25 * -0.3798855, abs=1e-6)


def test_dispersive_term_can_join_any_method_and_respects_padding():
    h = torch.tensor([[[0.0, 0.0], [5.0, 5.0]], [[1.0, 1.0], [7.0, 7.0]]])
    obj = Objective(FixedProcess(torch.tensor([0.5, 0.5])), [], method="reed",
                    dispersive=DispersiveTerm(coeff=1.0, depth=1))
    mod = obj.build_module(Toy({1: h}))
    mask = torch.tensor([[True, False], [True, False]])  # the second token is padding in both samples
    _, parts = obj(mod, torch.ones(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), {}, step=0, token_mask=mask)
    want = math.log((2 + 2 * math.exp(-2 / 4)) / 4)  # d12 = |[0,0,0,0] - [1,1,0,0]|^2 / 4
    assert parts["dispersive"].item() == pytest.approx(want, abs=1e-6)
    off = Objective(FixedProcess(torch.tensor([0.5])), [], method="disp", dispersive=DispersiveTerm(coeff=0.0))
    assert off.dispersive is None


def test_dispersive_default_depth_needs_numbered_blocks():
    obj = Objective(FixedProcess(torch.tensor([0.5])), [], method="disp")
    toy = Toy({})
    toy.depth = None
    with pytest.raises(ValueError, match="objective.dispersive.depth"):
        obj.build_module(toy)


# -------------------------------------------------------------------------------------------------------- SRA
def test_sra_aligns_the_student_head_to_the_ema_teacher_at_a_less_noisy_time():
    student_h = torch.tensor([[[0.0, 0.02, 1.0]]])  # smooth-L1 against 0: 0.3263333
    obj = Objective(FixedProcess(torch.tensor([0.5])), [AlignTerm("tok", 3, 1)], method="sra")
    assert obj.terms == [] and obj.self_align.coeff == 0.2
    obj.self_align = SelfAlignTerm(coeff=0.2, student_depth=1, teacher_depth=2, t_max=0.2)
    student = Toy({1: student_h}, depth=2, dim=3)
    teacher = Toy({2: torch.zeros(1, 1, 3)}, depth=2, dim=3).requires_grad_(False)
    mod = obj.build_module(student)
    mod.heads["self_align"] = nn.Identity()
    with pytest.raises(RuntimeError, match="objective.teacher"):
        obj(mod, X0, Y, {}, step=0)
    obj.teacher = teacher
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([7])  # e.g. the null class after label dropout: the teacher must see the same label
    loss, parts = obj(mod, X0, y, {}, step=0, generator=g)
    assert parts["self_align"].item() == pytest.approx(0.3263333, abs=1e-6)
    assert loss.item() == pytest.approx(1.0 + 0.2 * 0.3263333, abs=1e-6)
    u = torch.rand(1, generator=torch.Generator().manual_seed(0))  # the objective's one draw (FixedProcess draws none)
    x_t, t_teacher, y_teacher = teacher.calls[-1]
    torch.testing.assert_close(t_teacher, (0.5 - 0.2 * u).clamp(0, 1))
    torch.testing.assert_close(x_t, (1 - t_teacher) * X0)  # same x0, same (zero) noise, less noisy time
    assert y_teacher.tolist() == [7]
    loss.backward()
    assert student.w.grad is not None and teacher.w.grad is None  # nothing flows into the EMA teacher


def test_sra_checks_depths_and_stops_with_the_alignment():
    with pytest.raises(ValueError, match="student_depth .* must be below teacher_depth"):
        Objective(FixedProcess(torch.tensor([0.5])), [], method="sra",
                  self_align=SelfAlignTerm(student_depth=3, teacher_depth=3))
    obj = Objective(FixedProcess(torch.tensor([0.5])), [], method="sra")  # default depths 4 -> 8
    with pytest.raises(ValueError, match="teacher_depth 8 is beyond the denoiser's 2 blocks"):
        obj.build_module(Toy({}, depth=2))
    stop = Objective(FixedProcess(torch.tensor([0.5])), [], method="sra", curriculum=Curriculum(align_stop=5),
                     self_align=SelfAlignTerm(student_depth=1, teacher_depth=2))
    mod = stop.build_module(Toy({1: torch.ones(1, 1, 2)}))
    loss, parts = stop(mod, X0, Y, {}, step=5)  # no teacher needed after the stop
    assert "self_align" not in parts and loss.item() == 1.0


# -------------------------------------------------------------------------------------------------------- REG
class ToyReg(Toy):
    """A denoiser with one entangled token: zero velocities; hidden states (B, 1 + T, D), the slot first."""

    def __init__(self, hidden, cls_dim):
        super().__init__(hidden)
        self.cls_dim, self.num_prefix = cls_dim, 1

    def forward(self, x, t, y, taps=(), cls=None):
        assert cls is not None and cls.shape == (x.shape[0], self.cls_dim)
        self.calls.append((x.clone(), t.clone(), cls.clone()))
        return (x * self.w, cls * self.w), {d: self.hidden[d] for d in taps}


def test_reg_noises_the_entangled_target_with_the_image_time_and_weights_its_velocity_loss():
    c = torch.tensor([[1.0, 0.0]])
    terms = [AlignTerm("cls", 2, 1, "pooled", entangle=True, entangle_coeff=0.03)]
    obj = Objective(FixedProcess(torch.tensor([0.25])), terms, method="reg")
    assert obj.entangled.name == "cls" and obj.joint is None
    den = ToyReg({1: torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])}, cls_dim=2)
    mod = identity_projectors(obj.build_module(den))
    loss, parts = obj(mod, X0, Y, {"cls": c}, step=0, generator=torch.Generator().manual_seed(3))
    eps = torch.randn(1, 2, generator=torch.Generator().manual_seed(3))  # the objective's one draw
    torch.testing.assert_close(den.calls[-1][2], 0.75 * c + 0.25 * eps)  # c_t = (1 - t) c + t eps
    want_ent = float(((eps - c) ** 2).mean())  # zero prediction against v_c = eps - c
    assert parts["loss_entangled"].item() == pytest.approx(want_ent, rel=1e-6)
    # the slot's hidden state [1, 0] against c = [1, 0] through its own projector: cosine 1
    assert parts["align/cls"].item() == pytest.approx(-1.0)
    assert loss.item() == pytest.approx(1.0 + 0.03 * want_ent + 0.5 * -1.0, rel=1e-6)


def test_reg_joint_alignment_over_the_class_slot_hand_case():
    """spec §1.6: target tokens [c, z] = [[1,0],[0,1]], projections [[1,0],[1,0]]: cosines [1, 0], L = -0.5."""
    terms = [AlignTerm("tok", 2, 1, "tokens"), AlignTerm("cls", 2, 1, "pooled", entangle=True)]
    obj = Objective(FixedProcess(torch.tensor([0.5])), terms, method="reg", proj_coeff=1.0)
    assert obj.joint.name == "tok"
    mod = identity_projectors(obj.build_module(ToyReg({1: torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])}, cls_dim=2)))
    assert set(mod.projectors) == {"tok"}  # the entangled target shares the token target's projector
    _, parts = obj(mod, X0, Y, {"tok": torch.tensor([[[0.0, 1.0]]]), "cls": torch.tensor([[1.0, 0.0]])}, step=0)
    assert parts["align/tok"].item() == pytest.approx(-0.5)


def test_reg_needs_an_entangled_pooled_target_and_a_matching_token():
    with pytest.raises(ValueError, match="mark one pooled image target with entangle: true"):
        Objective(FixedProcess(torch.tensor([0.5])), [AlignTerm("tok", 2, 1)], method="reg")
    with pytest.raises(ValueError, match="of kind pooled"):
        Objective(FixedProcess(torch.tensor([0.5])), [AlignTerm("tok", 2, 1, entangle=True)], method="reg")
    obj = Objective(FixedProcess(torch.tensor([0.5])), [AlignTerm("cls", 3, 1, "pooled", entangle=True)],
                    method="reg")
    with pytest.raises(ValueError, match="'cls' is 3-d but the denoiser's representation token is 2-d"):
        obj.build_module(ToyReg({}, cls_dim=2))


def test_reg_sit_structure_and_packed_sampling_state():
    from reed.image.sit import build_sit

    torch.manual_seed(0)
    sit = build_sit("SiT-T/4", input_size=8, in_channels=3, num_classes=4, cls_dim=5)
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 4])
    with torch.no_grad():
        (v, v_cls), hid = sit(x, t, y, taps=[2], cls=torch.randn(2, 5))
    assert v.shape == (2, 3, 8, 8) and v_cls.shape == (2, 5) and hid[2].shape == (2, 1 + 4, 128)
    assert float(v.abs().max()) == 0.0 and float(v_cls.abs().max()) == 0.0  # zero-init heads
    with pytest.raises(ValueError, match=r"pass cls of shape \(2, 5\), got None"):
        sit(x, t, y)
    state = sit.initial_state(3, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    img, vec = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 5, generator=g)  # image noise first
    torch.testing.assert_close(state, torch.cat([img.flatten(1), vec], 1))
    torch.testing.assert_close(sit.image_of(state), img)
    assert sit.velocity(state, torch.rand(3), torch.tensor([0, 1, 2])).shape == state.shape
    plain = build_sit("SiT-T/4", input_size=8, in_channels=3, num_classes=4)
    torch.testing.assert_close(plain.initial_state(3, generator=torch.Generator().manual_seed(1)), img)
    with pytest.raises(ValueError, match="no representation token"):
        plain(x, t, y, cls=torch.randn(2, 5))


# -------------------------------------------------------------------------------------- HASTE attention term
def test_haste_attention_term_hand_case_and_its_weight():
    """spec §3.5: teacher logits 0 (p_T = [1/2, 1/2]); student rows [0, ln 3] and [0, 0]: L_attn = 0.7650677,
    added as coeff * L_attn beside the (averaged, proj_coeff-scaled) feature terms, stopped with them."""
    student = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]]).reshape(1, 1, 2, 2)
    teacher = torch.zeros(1, 1, 1, 2, 2)  # (B, layers, heads, T, T)
    terms = [AlignTerm("tok", 2, 1), AlignTerm("att", 1, 1, "attention", coeff=0.5, attention_blocks=(2,))]
    obj = Objective(FixedProcess(torch.tensor([0.5])), terms, method="haste", curriculum=Curriculum(align_stop=10))
    assert obj.taps == [1, "attn:2"]
    mod = identity_projectors(obj.build_module(Toy({1: torch.tensor([[[1.0, 0.0]]]), "attn:2": student})))
    assert set(mod.projectors) == {"tok"}
    loss, parts = obj(mod, X0, Y, {"tok": torch.tensor([[[1.0, 0.0]]]), "att": teacher}, step=0)
    assert parts["align/att"].item() == pytest.approx(0.7650677, abs=1e-6)
    assert loss.item() == pytest.approx(1.0 + 0.5 * -1.0 + 0.5 * 0.7650677, abs=1e-6)
    after, parts = obj(mod, X0, Y, {}, step=10)
    assert after.item() == 1.0 and "align/att" not in parts
    with pytest.raises(ValueError, match="attends over 3 patch tokens but the denoiser over 2"):
        obj(mod, X0, Y, {"tok": torch.tensor([[[1.0, 0.0]]]), "att": torch.zeros(1, 1, 1, 3, 3)}, step=0)


def test_sit_attention_taps_are_the_logits_of_the_block_and_change_nothing():
    from reed.image.sit import build_sit

    torch.manual_seed(0)
    sit = build_sit("SiT-T/4", input_size=8, in_channels=3, num_classes=4).eval()
    for b in sit.blocks:  # non-zero adaLN so the blocks do something
        torch.nn.init.normal_(b.adaLN_modulation[-1].weight, std=0.02)
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 1])
    with torch.no_grad():
        v0, _ = sit(x, t, y)
        v1, hid = sit(x, t, y, taps=[1, "attn:2"])
        inner = sit.hidden_states(x, t, y, taps=[1])[1]
        blk, c = sit.blocks[1], sit.t_embedder(t) + sit.y_embedder(y)
        a_in = blk.norm1(inner)
        shift, scale = blk.adaLN_modulation(c).chunk(6, -1)[:2]
        qkv = blk.attn.qkv(a_in * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)).reshape(2, 4, 3, 4, 32)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    torch.testing.assert_close(v0, v1)
    assert hid["attn:2"].shape == (2, 4, 4, 4)  # (B, heads, T, T)
    torch.testing.assert_close(hid["attn:2"], q @ k.transpose(-2, -1) / math.sqrt(32))
