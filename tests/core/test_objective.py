import pytest
import torch
from torch import nn

from reed.objective import AlignTerm, Curriculum, Objective, ReedModule, active_terms
from reed.processes.flow import Corrupted


class FixedProcess:
    """Corruption with fixed t so the loss can be computed by hand."""

    def __init__(self, t):
        self.t = t

    def corrupt(self, x0, generator=None):
        return Corrupted(x0, self.t, torch.zeros_like(x0), torch.zeros_like(x0))

    @staticmethod
    def loss(pred, target):
        return (pred - target).pow(2).flatten(1).mean(1)


class ToyDenoiser(nn.Module):
    """Returns its input as prediction and fixed hidden states at every tap."""

    def __init__(self, hidden):
        super().__init__()
        self.hidden = hidden
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x, t, y, taps=()):
        return x * self.w, {d: self.hidden[d] for d in taps}


class IdentityProjector(nn.Module):
    def forward(self, h):
        return h


def make(method, terms, hidden, t, curriculum=None, proj_coeff=0.5):
    mod = ReedModule(ToyDenoiser(hidden), active_terms(terms, method), hidden_size=2)
    for name in mod.projectors:
        mod.projectors[name] = IdentityProjector()
    obj = Objective(FixedProcess(t), terms, method=method, proj_coeff=proj_coeff, curriculum=curriculum)
    return mod, obj


def setup_case():
    # two samples, two tokens, dim 2
    h_img = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
    z_img = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]])
    # per-sample token loss: sample0 -(1+0)/2 = -0.5, sample1 -1
    h_txt = torch.tensor([[[0.0, 1.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
    z_txt = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # pooled loss: sample0 0, sample1 -1
    terms = [AlignTerm("img", 2, 1, "tokens", coeff=1.0, time_weight="linear"),
             AlignTerm("txt", 2, 2, "pooled", coeff=0.5, modality="text")]
    x0 = torch.ones(2, 1, 2, 2) * torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)  # gen loss per sample 1, 4 -> 2.5
    return terms, {1: h_img, 2: h_txt}, {"img": z_img, "txt": z_txt}, x0


def test_reed_loss_hand_computed():
    terms, hidden, targets, x0 = setup_case()
    t = torch.tensor([0.2, 0.6])
    cur = Curriculum(gen_warmup=10, total=100)
    mod, obj = make("reed", terms, hidden, t, cur)
    loss, parts = obj(mod, x0, torch.zeros(2, dtype=torch.long), targets, step=4)
    w_gen = 4 / 10
    img = ((-0.5) * 0.8 + (-1.0) * 0.4) / 2  # per-sample linear time weight 1 - t
    txt = 0.5 * (0.0 + -1.0) / 2
    assert parts["w_gen"].item() == pytest.approx(w_gen)
    assert parts["loss_gen"].item() == pytest.approx(2.5)
    assert parts["loss_align"].item() == pytest.approx(img + txt)
    assert parts["align/img"].item() == pytest.approx(-0.75)
    assert parts["align/txt"].item() == pytest.approx(-0.5)
    assert loss.item() == pytest.approx(w_gen * 2.5 + 0.5 * 1.0 * (img + txt))


def test_reference_broadcast_bug_not_reproduced():
    terms, hidden, targets, x0 = setup_case()
    t = torch.tensor([0.2, 0.6])
    mod, obj = make("reed", terms[:1], hidden, t)
    _, parts = obj(mod, x0, torch.zeros(2, dtype=torch.long), targets, step=0)
    buggy = (1 - t).mean() * torch.tensor([-0.5, -1.0]).mean()  # mean(w) * mean(l)
    assert parts["loss_align"].item() == pytest.approx(-0.4)
    assert abs(parts["loss_align"].item() - buggy.item()) > 1e-3


def test_repa_averages_image_targets_with_constant_weights():
    terms, hidden, targets, x0 = setup_case()
    terms = terms + [AlignTerm("img2", 2, 1, "tokens", coeff=7.0, time_weight="cutoff", cutoffs=(0.9, 1.0))]
    targets = {**targets, "img2": targets["img"]}
    mod, obj = make("repa", terms, hidden, torch.tensor([0.2, 0.6]), Curriculum(gen_warmup=10, total=100))
    assert [t.name for t in obj.terms] == ["img", "img2"]  # text target dropped
    loss, parts = obj(mod, x0, torch.zeros(2, dtype=torch.long), targets, step=0)
    assert parts["w_gen"].item() == 1.0 and parts["w_align"].item() == 1.0  # no curriculum
    assert parts["loss_align"].item() == pytest.approx(-0.75)  # average, no coeff, no time weight
    assert loss.item() == pytest.approx(2.5 + 0.5 * -0.75)


def test_sit_has_no_alignment():
    terms, hidden, targets, x0 = setup_case()
    mod, obj = make("sit", terms, hidden, torch.tensor([0.2, 0.6]))
    loss, parts = obj(mod, x0, torch.zeros(2, dtype=torch.long), {}, step=0)
    assert len(mod.projectors) == 0 and obj.taps == []
    assert loss.item() == pytest.approx(2.5) and parts["w_align"].item() == 0.0


def test_missing_target_is_named():
    terms, hidden, targets, x0 = setup_case()
    mod, obj = make("reed", terms, hidden, torch.tensor([0.2, 0.6]))
    with pytest.raises(KeyError, match="txt"):
        obj(mod, x0, torch.zeros(2, dtype=torch.long), {"img": targets["img"]}, step=0)


def test_token_target_resampled_to_model_grid():
    # model has 4 tokens (2x2) but the target has 16 (4x4): the target is area-pooled to 2x2
    h = torch.randn(1, 4, 3)
    z = h.repeat_interleave(1, dim=1)
    z16 = z.reshape(1, 2, 2, 3).repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(1, 16, 3)
    mod, obj = make("reed", [AlignTerm("img", 3, 1, "tokens")], {1: h}, torch.tensor([0.5]))
    _, parts = obj(mod, torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long), {"img": z16}, step=0)
    assert parts["align/img"].item() == pytest.approx(-1.0, abs=1e-6)
