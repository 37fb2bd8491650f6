"""The REED objective: generative loss + curriculum-weighted sum of alignment terms, with a logged breakdown.

    loss = w_gen(step) * mean_b L_gen(b) + proj_coeff * w_align(step) * sum_k mean_b[c_k s_k(t_b) l_k(b)]

``l_k(b)`` is the per-sample negative cosine between ``projector_k(h_{d_k})`` and the target ``z_k``; with a
token mask the mean over the batch counts every valid token once (samples weighted by their token count, the
protein reference's pooled mean; identical to the plain mean when every sample has the same number of tokens).
Methods (presets of one objective; :data:`METHOD_RULES`):
  * ``sit``  — generative loss only (``baseline`` is the same, a domain-neutral name).
  * ``repa`` — image targets only, *averaged* over targets, constant weights, no time weighting.
  * ``reed`` — all targets *summed* with coefficients c_k, per-sample time weights s_k(t), curriculum weights.
  * ``irepa`` — ``repa`` with a convolutional projector on the token grid and spatially z-scored token targets
    (the ``auto`` value of a target's ``projector`` / ``target_norm``).
  * ``haste`` — ``repa`` with a hard stop of the alignment at ``curriculum.align_stop`` (required).
  * ``sra`` / ``disp`` — no external target: self-alignment to the EMA model (:mod:`reed.self_alignment`) or
    the dispersive regulariser (:mod:`reed.regularizers`), whose ``auto`` coefficient they switch on.
  * ``reg`` — ``repa`` plus one *entangled* pooled target (``entangle``): noised with the image's time and
    independent noise, fed to the denoiser as an extra token and denoised with it (velocity loss weight
    ``entangle_coeff``, 0.03 in REG), generated from noise at sampling time.
Entanglement is a per-target option (any method that keeps the target, e.g. ``reed`` with its caption); the
entangled token's hidden state is aligned to the clean target: in REG's way, as one more token of a token target
of the same width and depth (``concat[c, z]`` through that target's projector), else through its own projector.
Encoder-free terms can be added to any method by giving them a coefficient (e.g. ``reed`` + dispersive).
``curriculum.align_stop`` > 0 stops every alignment term (self-alignment included) at that step for any method.
This module never imports a domain: the denoiser only has to return ``(prediction, {tap: hidden})``.
Kinds of term: ``tokens`` (B,T,D) against (B,T,Dz); ``pooled`` masked token mean against (B,Dz); ``edges``
pair features (B,L,K,D) on a kNN graph against dense pair targets (B,L,L,Dz) gathered on that graph;
``attention`` (HASTE) the denoiser's pre-softmax attention logits of some blocks (taps ``"attn:<block>"``) against a
teacher's (B, layers, heads, T, T), by the cross-entropy of :mod:`reed.attention_align`, weighted by its ``coeff``
beside the feature terms (``loss += w_align * coeff * L_attn``).
Images go through :meth:`Objective.__call__` (flow process); other domains run their own forward and hand a
:class:`DenoiserOutput` to :meth:`Objective.combine`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from reed.align import (
    ConvProjector,
    Projector,
    gather_edges,
    masked_mean,
    masked_standardize,
    negative_cosine,
    resample_tokens,
    spatial_zscore,
)
from reed.attention_align import attention_alignment
from reed.curriculum import alignment_weight, generative_weight, time_weight
from reed.regularizers import dispersive_loss
from reed.self_alignment import SelfAlignHead, self_align_loss, teacher_time


@dataclass(frozen=True)
class MethodRule:
    """What a method preset does with the configured terms.

    targets: which external targets it uses (``none`` | ``image`` | ``all``); average: average the alignment
    terms (True) or sum them with their coefficients and time weights (False); curriculum: use the REED
    curriculum weights (else constant 1); projector / target_norm: what ``auto`` means for a token target;
    dispersive / self_align: the coefficient ``auto`` (None) gives that encoder-free term (0 = off);
    needs_stop: ``curriculum.align_stop`` must be set.
    """

    targets: str = "image"
    average: bool = True
    curriculum: bool = False
    projector: str = "mlp"
    target_norm: str = "none"
    dispersive: float = 0.0
    self_align: float = 0.0
    needs_stop: bool = False
    needs_entangle: bool = False


METHOD_RULES: dict[str, MethodRule] = {
    "sit": MethodRule(targets="none"),
    "baseline": MethodRule(targets="none"),
    "repa": MethodRule(),
    "reed": MethodRule(targets="all", average=False, curriculum=True),
    "irepa": MethodRule(projector="conv", target_norm="spatial"),
    "reg": MethodRule(needs_entangle=True),
    "haste": MethodRule(needs_stop=True),
    "sra": MethodRule(targets="none", self_align=0.2),  # the paper's smooth-L1 weight (its schedule's first phase)
    "disp": MethodRule(targets="none", dispersive=0.25),  # the PyTorch code's lambda
}
METHODS = tuple(METHOD_RULES)


def method_rule(method: str) -> MethodRule:
    if method not in METHOD_RULES:
        raise ValueError(f"unknown method '{method}', expected one of {METHODS}")
    return METHOD_RULES[method]


@dataclass
class AlignTerm:
    """One alignment term: target ``name`` of width ``dim``, aligned at tap ``depth``."""

    name: str
    dim: int
    depth: int | str  # block index (SiT) or a named tap of the denoiser (e.g. "decoder.1.edges")
    kind: str = "tokens"  # "tokens" (B,T,D) | "pooled" (B,D) | "edges" (B,L,K,D)
    coeff: float = 1.0
    time_weight: str = "constant"
    cutoffs: tuple[float, float] = (0.0, 1.0)
    modality: str = "image"
    projector_dim: int = 2048
    projector_layers: int = 3
    standardize: bool = False  # per-channel standardisation of z with masked batch statistics
    projector: str = "auto"  # "mlp" | "conv" (iREPA, token grids) | "auto": the method's choice
    projector_kernel: int = 3
    target_norm: str = "auto"  # "none" | "spatial" (iREPA z-score over tokens) | "auto": the method's choice
    target_norm_gamma: float = 0.6  # iREPA's share of the mean removed (0.6 on SiT latents, 0.8 on pixels)
    entangle: bool = False  # REG: a pooled target generated jointly with the data (an extra token)
    entangle_coeff: float = 0.03  # REG's beta: weight of the entangled token's velocity loss
    # kind "attention" (HASTE): the denoiser blocks the teacher's maps are distilled into
    attention_blocks: Sequence[int] = field(default_factory=lambda: [5, 6, 7, 8])
    attention_heads: int | None = None  # heads kept (None: as many as student and teacher both have)


@dataclass
class DispersiveTerm:
    """Dispersive loss ``coeff * L_disp(h_depth)`` over the local batch (:func:`reed.regularizers.dispersive_loss`);
    ``depth`` None is the denoiser's last block."""

    coeff: float = 0.25
    tau: float = 1.0
    depth: int | str | None = None


@dataclass
class SelfAlignTerm:
    """SRA: ``coeff * w_align * mean_b l(head(h_student(x_t)), h_teacher(x_t'))`` with the EMA model as teacher
    (:mod:`reed.self_alignment`)."""

    coeff: float = 0.2
    student_depth: int = 4
    teacher_depth: int = 8
    t_max: float = 0.2
    loss: str = "smooth_l1"
    beta: float = 0.05


def active_terms(terms: Sequence[AlignTerm], method: str) -> list[AlignTerm]:
    """The terms a method uses (none for ``sit``/``sra``/``disp``, image targets for ``repa``-like presets, all
    for ``reed``), with ``auto`` projectors and target normalisations resolved: the method's choice for token
    targets, ``mlp`` / ``none`` for the others."""
    rule = method_rule(method)
    keep = [] if rule.targets == "none" else [t for t in terms if rule.targets == "all" or t.modality == "image"]
    out = []
    for t in keep:
        tokens = t.kind == "tokens"
        proj = t.projector if t.projector != "auto" else rule.projector if tokens else "mlp"
        norm = t.target_norm if t.target_norm != "auto" else rule.target_norm if tokens else "none"
        if not tokens and (proj == "conv" or norm == "spatial"):
            what = f"projector={proj!r}" if proj == "conv" else f"target_norm={norm!r}"
            raise ValueError(f"target '{t.name}': {what} needs a token grid (kind tokens), but it is kind {t.kind!r}")
        out.append(replace(t, projector=proj, target_norm=norm))
    return out


class ReedModule(nn.Module):
    """What the optimizer trains: the denoiser plus one projector per alignment term (``projectors[name]``).

    A projector's input width is ``denoiser.tap_dim(depth)`` when the denoiser has named taps of different
    widths, else ``hidden_size``.
    """

    def __init__(self, denoiser: nn.Module, terms: Sequence[AlignTerm], hidden_size: int,
                 heads: dict[str, nn.Module] | None = None):
        super().__init__()
        self.denoiser = denoiser
        tap_dim = getattr(denoiser, "tap_dim", None)

        def projector(t: AlignTerm) -> nn.Module:
            width = tap_dim(t.depth) if tap_dim else hidden_size
            if t.projector == "conv":
                return ConvProjector(width, t.dim, t.projector_kernel)
            return Projector(width, t.dim, t.projector_dim, t.projector_layers)

        self.projectors = nn.ModuleDict({t.name: projector(t) for t in terms})
        if heads:  # other trained heads of the objective (e.g. SRA's ``self_align``); absent otherwise
            self.heads = nn.ModuleDict(heads)

    def forward(self, *args, **kwargs):
        return self.denoiser(*args, **kwargs)


@dataclass
class Curriculum:
    """Curriculum settings; see :mod:`reed.curriculum`. ``align_steps`` <= 0 falls back to ``total``.

    All counts are in units of ``steps_per_unit`` optimizer steps: 1 for step-based recipes, the number of
    steps per epoch for epoch-based ones (the weights then change once per epoch, as in the protein reference).
    """

    gen_start: int = 0
    gen_warmup: int = 0
    gen_decay: str = "constant"
    align_decay: str = "constant"
    align_steps: int = 0
    align_stop: int = 0  # > 0: every alignment weight is 0 from this step on (HASTE's termination)
    total: int = 1
    steps_per_unit: int = 1


@dataclass
class DenoiserOutput:
    """What a domain's forward hands to :meth:`Objective.combine`.

    loss_gen: scalar generative loss of the batch; t: (B,) noise levels (0 = data); hidden: {tap: (B,T,D) or
    (B,L,K,D)}; token_mask: (B,T) valid tokens (None = all); edge_index/edge_mask: (B,L,K) kNN graph and its
    valid edges, needed by ``edges`` terms.
    """

    loss_gen: torch.Tensor
    t: torch.Tensor
    hidden: dict
    token_mask: torch.Tensor | None = None
    edge_index: torch.Tensor | None = None
    edge_mask: torch.Tensor | None = None
    teacher_hidden: torch.Tensor | None = None  # SRA: the EMA model's hidden state at the less noisy time
    prefix: int = 0  # extra tokens before the data tokens in ``hidden`` (REG's entangled token)
    loss_entangled: torch.Tensor | None = None  # REG: the entangled token's velocity loss (scalar)


class Objective:
    """Combines a generative process, alignment terms, encoder-free terms and the curriculum into one scalar loss.

    ``process`` must provide ``corrupt(x0, generator=) -> Corrupted(x_t, t, target, noise)`` and
    ``loss(pred, target) -> (B,)`` (and ``interpolate(x0, noise, t)`` for self-alignment). ``dispersive`` /
    ``self_align``: the encoder-free terms (None = the method's choice: on with its coefficient for ``disp`` /
    ``sra``, off otherwise; a term with ``coeff`` 0 is off).
    """

    def __init__(self, process, terms: Sequence[AlignTerm], *, method: str = "reed", proj_coeff: float = 0.5,
                 curriculum: Curriculum | None = None, dispersive: DispersiveTerm | None = None,
                 self_align: SelfAlignTerm | None = None):
        self.process = process
        self.method = method
        self.rule = method_rule(method)
        self.terms = active_terms(terms, method)
        ent = [t for t in self.terms if t.entangle]
        if len(ent) > 1 or (ent and ent[0].kind != "pooled"):
            raise ValueError(f"at most one entangled target, of kind pooled, got {[(t.name, t.kind) for t in ent]}")
        if self.rule.needs_entangle and not ent:
            raise ValueError(f"method '{method}' generates a representation with the data: mark one pooled image "
                             "target with entangle: true")
        #: REG's entangled target (generated as an extra token), or None
        self.entangled: AlignTerm | None = ent[0] if ent else None
        #: the entangled target joins this token term as its first token (REG's concat[c, z]), if one fits
        self.joint: AlignTerm | None = None
        if self.entangled is not None:
            e = self.entangled
            self.joint = next((t for t in self.terms if t.kind == "tokens" and t.depth == e.depth and t.dim == e.dim
                               and t.target_norm == "none"), None)
        #: the feature terms with their own projector (not the entangled target once it joined a token term, not
        #: the attention terms)
        self.projected: list[AlignTerm] = [t for t in self.terms if t.kind != "attention"
                                           and not (t is self.entangled and self.joint is not None)]
        self.proj_coeff = proj_coeff
        self.curriculum = curriculum or Curriculum()
        if self.rule.needs_stop and self.curriculum.align_stop <= 0:
            raise ValueError(f"method '{method}' stops the alignment at a fixed step: set "
                             "objective.curriculum.align_stop > 0 (HASTE: 250000 of a 4M-step SiT-XL/2 run)")
        if dispersive is None and self.rule.dispersive:
            dispersive = DispersiveTerm(coeff=self.rule.dispersive)
        if self_align is None and self.rule.self_align:
            self_align = SelfAlignTerm(coeff=self.rule.self_align)
        self.dispersive = dispersive if dispersive is not None and dispersive.coeff else None
        self.self_align = self_align if self_align is not None and self_align.coeff else None
        if self.self_align is not None and self.entangled is not None:
            raise ValueError("self-alignment (sra) together with an entangled target (reg) is not supported")
        if self.self_align is not None and not self.self_align.student_depth < self.self_align.teacher_depth:
            raise ValueError(f"self-alignment: student_depth ({self.self_align.student_depth}) must be below "
                             f"teacher_depth ({self.self_align.teacher_depth})")
        #: SRA's teacher (the EMA denoiser), set by the trainer when :attr:`needs_teacher`
        self.teacher: nn.Module | None = None

    @property
    def needs_teacher(self) -> bool:
        return self.self_align is not None

    def bind(self, denoiser: nn.Module) -> None:
        """Resolve what depends on the denoiser (the dispersive term's default depth: its last block) and check
        the encoder-free terms' depths against it."""
        depth = getattr(denoiser, "depth", None)
        if self.dispersive is not None and self.dispersive.depth is None:
            last = getattr(denoiser, "last_tap", depth)  # a denoiser with named taps says which is its last block
            if last is None:
                raise ValueError("the dispersive term needs objective.dispersive.depth (one of the denoiser's taps): "
                                 "this denoiser has no numbered blocks to default to the last one")
            self.dispersive = replace(self.dispersive, depth=last)
        if self.self_align is not None:
            if not isinstance(depth, int):
                raise ValueError("self-alignment (sra) needs a denoiser with numbered blocks (SiT)")
            if self.self_align.teacher_depth > depth:
                raise ValueError(f"self-alignment: teacher_depth {self.self_align.teacher_depth} is beyond the "
                                 f"denoiser's {depth} blocks (set objective.self_align.teacher_depth)")

    def build_module(self, denoiser: nn.Module) -> ReedModule:
        """What the optimizer trains: the denoiser, one projector per term and the objective's heads."""
        self.bind(denoiser)
        heads = {}
        if self.self_align is not None:
            tap_dim = getattr(denoiser, "tap_dim", None)
            d = self.self_align.student_depth
            heads["self_align"] = SelfAlignHead(tap_dim(d) if tap_dim else denoiser.hidden_size)
        if self.entangled is not None and getattr(denoiser, "cls_dim", 0) != self.entangled.dim:
            raise ValueError(f"the entangled target '{self.entangled.name}' is {self.entangled.dim}-d but the "
                             f"denoiser's representation token is {getattr(denoiser, 'cls_dim', 0)}-d")
        return ReedModule(denoiser, self.projected, denoiser.hidden_size, heads=heads)

    @property
    def taps(self) -> list:
        taps = {t.depth for t in self.terms if t.kind != "attention"}
        taps |= {f"attn:{b}" for t in self.terms if t.kind == "attention" for b in t.attention_blocks}
        if self.dispersive is not None and self.dispersive.depth is not None:
            taps.add(self.dispersive.depth)
        if self.self_align is not None:
            taps.add(self.self_align.student_depth)
        return sorted(taps, key=str)

    def weights(self, step: int) -> tuple[float, float]:
        """(w_gen, w_align) at ``step``: the curriculum's for ``reed``, constant (1, 1) otherwise; w_align is 0
        without alignment terms and from ``curriculum.align_stop`` on."""
        c = self.curriculum
        step = step // max(c.steps_per_unit, 1)
        aligned = bool(self.terms) or self.self_align is not None
        if not self.rule.curriculum:
            return 1.0, (alignment_weight(step, stop=c.align_stop) if aligned else 0.0)
        w_gen = generative_weight(step, start=c.gen_start, warmup=c.gen_warmup, decay=c.gen_decay, total=c.total)
        steps = c.align_steps if c.align_steps > 0 else c.total
        w_align = alignment_weight(step, decay=c.align_decay, steps=steps, stop=c.align_stop) if aligned else 0.0
        return w_gen, w_align

    def __call__(self, module: ReedModule, x0: torch.Tensor, cond: torch.Tensor, targets: dict[str, torch.Tensor],
                 step: int, *, generator: torch.Generator | None = None,
                 token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss for one (micro-)batch of a continuous process (images).

        x0 (B,...) clean data, cond (B,) conditioning (after label dropout: SRA's teacher sees the same labels),
        targets {name: (B,T,Dz) or (B,Dz)}, token_mask optional (B,T) of real tokens for pooling/token losses.
        See :meth:`combine` for the outputs.
        """
        c = self.process.corrupt(x0, generator=generator)
        extra, loss_ent, prefix = {}, None, 0
        if self.entangled is not None:  # REG: the same t and interpolant, independent noise
            vec = self._target(targets, self.entangled.name).float()  # (B, Dc)
            eps = torch.randn(vec.shape, generator=generator, device=vec.device, dtype=vec.dtype)
            extra["cls"], v_vec = self.process.interpolate(vec, eps, c.t), self.process.velocity(vec, eps, c.t)
        pred, hidden = module(c.x_t, c.t, cond, taps=self.taps, **extra)
        if self.entangled is not None:
            pred, pred_vec = pred
            loss_ent, prefix = self.process.loss(pred_vec, v_vec).mean(), 1
        loss_gen = self.process.loss(pred, c.target).mean()
        teacher = None
        if self.self_align is not None and self.weights(step)[1] > 0:
            teacher = self.teacher_hidden(x0, c.noise, c.t, cond, generator=generator)
        out = DenoiserOutput(loss_gen, c.t, hidden, token_mask, teacher_hidden=teacher, prefix=prefix,
                             loss_entangled=loss_ent)
        return self.combine(module, out, targets, step)

    @staticmethod
    def _attention_term(term: AlignTerm, out: DenoiserOutput, teacher: torch.Tensor) -> torch.Tensor:
        """Per-sample HASTE loss (B,) of the denoiser's attention logits at ``term.attention_blocks`` (the entangled
        token's rows and columns dropped) against the teacher's ``(B, layers, heads, T, T)``."""
        p = out.prefix
        student = [out.hidden[f"attn:{b}"][:, :, p:, p:] for b in term.attention_blocks]
        if teacher.dim() != 5 or teacher.shape[1] != len(student):
            raise ValueError(f"target '{term.name}': teacher attention must be (B, {len(student)} layers, heads, "
                             f"T, T), got {tuple(teacher.shape)}")
        if teacher.shape[-1] != student[0].shape[-1]:
            raise ValueError(f"target '{term.name}': the teacher attends over {teacher.shape[-1]} patch tokens but "
                             f"the denoiser over {student[0].shape[-1]}: attention maps need the same token grid")
        heads = term.attention_heads or min(teacher.shape[2], student[0].shape[1])
        return attention_alignment(student, list(teacher.unbind(1)), heads)

    @staticmethod
    def _target(targets: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        if name not in targets:
            raise KeyError(f"batch has no target '{name}' (has: {sorted(targets)})")
        return targets[name]

    @torch.no_grad()
    def teacher_hidden(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, *,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """SRA's target: the EMA teacher's hidden state (B,T,D) at block ``teacher_depth`` of the same x0 and noise
        at the less noisy time t' = clamp(t - t_max u, 0, 1), u ~ U(0,1) per sample."""
        if self.teacher is None:
            raise RuntimeError("self-alignment needs objective.teacher (the EMA denoiser); the trainer sets it")
        sa = self.self_align
        u = torch.rand(t.shape, generator=generator, device=t.device)
        t2 = teacher_time(t, u, sa.t_max)
        x_t2 = self.process.interpolate(x0, noise, t2)
        run = getattr(self.teacher, "hidden_states", None)
        if run is not None:  # stops after the tap block
            return run(x_t2, t2, cond, taps=[sa.teacher_depth])[sa.teacher_depth]
        return self.teacher(x_t2, t2, cond, taps=[sa.teacher_depth])[1][sa.teacher_depth]

    def combine(self, module: ReedModule, out: DenoiserOutput, targets: dict[str, torch.Tensor], step: int
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weight the generative loss, the alignment terms and the encoder-free terms at ``step``.

        Returns the scalar loss and a breakdown of detached scalars: ``loss``, ``loss_gen``, ``loss_align``
        (the weighted sum over alignment terms, before ``proj_coeff * w_align``), ``w_gen``, ``w_align``,
        ``align/<name>`` (unweighted mean negative cosine per term), ``self_align`` (the unweighted SRA loss) and
        ``dispersive`` (the unweighted dispersive loss). From ``curriculum.align_stop`` on the alignment terms
        are not computed at all and the loss is the generative loss (plus the dispersive term).
        """
        w_gen, w_align = self.weights(step)
        # the forward goes through ``module`` (a DDP wrapper under multi-process training keeps gradient sync);
        # the projectors are reached on the wrapped module
        inner = module if hasattr(module, "projectors") else module.module
        parts: dict[str, torch.Tensor] = {}
        align = out.loss_gen.new_zeros((), dtype=torch.float32)
        stopped = self.curriculum.align_stop > 0 and w_align == 0.0
        aligned = self.projected
        attention = out.loss_gen.new_zeros((), dtype=torch.float32)
        for term in [] if stopped else [t for t in self.terms if t.kind == "attention"]:
            per_sample = self._attention_term(term, out, self._target(targets, term.name))
            parts[f"align/{term.name}"] = per_sample.mean().detach()
            attention = attention + term.coeff * per_sample.mean()
        for term in [] if stopped else aligned:
            z = self._target(targets, term.name)
            h = out.hidden[term.depth]
            slot, h = h[:, : out.prefix], h[:, out.prefix :]  # REG's entangled token, the data tokens
            mask = out.token_mask
            if term is self.entangled:  # its own projector: the entangled token's hidden state against the target
                h, mask = slot[:, 0], None
            elif term.kind == "pooled":
                h, mask = masked_mean(h, mask), None
            elif term.kind == "edges":
                if out.edge_index is None:
                    raise ValueError(f"target '{term.name}' is an edge target but the denoiser gave no edge_index")
                z = gather_edges(z, out.edge_index)
                mask = out.edge_mask
                h, z = h.flatten(1, 2), z.flatten(1, 2)  # (B,L*K,D): edges are tokens from here on
                mask = mask.flatten(1, 2) if mask is not None else None
            if term.standardize:
                z = masked_standardize(z, mask)
            joint = term is self.joint
            if joint:  # REG: the entangled token is one more token of this target, concat[c, z]
                h = torch.cat([slot, h], dim=1)
            zhat = inner.projectors[term.name](h)
            if term.kind == "tokens" and z.shape[1] != zhat.shape[1] - joint:
                z = resample_tokens(z, zhat.shape[1] - joint)
            if term.target_norm == "spatial":
                z = spatial_zscore(z, term.target_norm_gamma)
            if joint:
                z = torch.cat([self._target(targets, self.entangled.name).to(z.dtype).unsqueeze(1), z], dim=1)
                if mask is not None:
                    mask = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)
            per_sample = negative_cosine(zhat, z, mask)  # (B,)
            # samples weighted by their number of valid tokens: the mean counts every valid token once
            count = mask.float().flatten(1).sum(1) if mask is not None else torch.ones_like(per_sample)
            count = count / count.sum().clamp_min(1.0)
            parts[f"align/{term.name}"] = (per_sample * count).sum().detach()
            if not self.rule.average:
                w = term.coeff * time_weight(out.t, term.time_weight, tuple(term.cutoffs))
                align = align + (per_sample * w * count).sum()
            else:
                align = align + (per_sample * count).sum() / len(aligned)
        gen = out.loss_gen
        if out.loss_entangled is not None:  # REG: part of the generative loss (the curriculum phases it in too)
            parts["loss_entangled"] = out.loss_entangled.detach()
            gen = gen + self.entangled.entangle_coeff * out.loss_entangled
        loss = w_gen * gen + self.proj_coeff * w_align * align + w_align * attention
        if self.self_align is not None and w_align > 0:
            if out.teacher_hidden is None:
                raise ValueError("self-alignment (sra) needs the EMA teacher's hidden state: this domain's forward "
                                 "does not provide one (only the image flow objective does)")
            sa = self.self_align
            pred = inner.heads["self_align"](out.hidden[sa.student_depth])
            l_sa = self_align_loss(pred, out.teacher_hidden, sa.loss, sa.beta).mean()
            parts["self_align"] = l_sa.detach()
            loss = loss + sa.coeff * w_align * l_sa
        if self.dispersive is not None:
            h = out.hidden[self.dispersive.depth]
            if out.token_mask is not None and h.shape[:2] == out.token_mask.shape:  # padding counts as zeros
                h = h * out.token_mask.to(h.dtype).unsqueeze(-1)
            l_disp = dispersive_loss(h, self.dispersive.tau)
            parts["dispersive"] = l_disp.detach()
            loss = loss + self.dispersive.coeff * l_disp
        parts_out = {"loss": loss.detach(), "loss_gen": out.loss_gen.detach(), "loss_align": align.detach(),
                     # filled on the loss's device (a CPU tensor here would cost a blocking copy per step)
                     "w_gen": loss.new_full((), w_gen).detach(), "w_align": loss.new_full((), w_align).detach()}
        parts_out.update(parts)
        return loss, parts_out
