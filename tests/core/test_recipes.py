"""The shipped recipes load, resolve and carry the paper's numbers (spec image.md §9)."""

from pathlib import Path

import pytest

from reed.cli import main
from reed.config import load_config
from reed.image.sit import SIT_PRESETS

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads(path, capsys):
    cfg = load_config(path)
    if cfg.domain == "molecule":
        from reed.molecule.nets import MOLECULE_PRESETS

        layers = MOLECULE_PRESETS[cfg.molecule.model.preset]["layers"]
        assert all(1 <= t.depth <= layers and t.kind == "pooled" for t in cfg.targets)
    elif cfg.domain == "protein":
        from reed.protein.task import build_mpnn_denoiser

        taps = set(build_mpnn_denoiser(cfg).tap_names())
        assert all(t.depth in taps for t in cfg.targets)
    else:
        assert cfg.image.model.preset in SIT_PRESETS
        depth = SIT_PRESETS[cfg.image.model.preset]["depth"]
        assert all(1 <= t.depth <= depth for t in cfg.targets)
    assert main(["show-config", str(path)]) == 0
    assert "preset" in capsys.readouterr().out


def test_headline_reed_recipe_matches_the_paper():
    cfg = load_config(CONFIGS / "imagenet256_sit_xl2_reed.yaml")
    assert cfg.image.model.preset == "SiT-XL/2" and cfg.image.data.name == "latents"
    dino, text = cfg.targets
    assert (dino.encoder, dino.kind, dino.depth, dino.coeff) == ("dinov2-vit-b", "tokens", 8, 1.0)
    assert (text.source, text.layer, text.kind, text.depth, text.coeff) == ("vlm", 15, "pooled", 16, 0.5)
    assert cfg.objective.method == "reed" and cfg.objective.proj_coeff == 0.5
    assert cfg.objective.curriculum.gen_warmup == 50_000 and cfg.objective.curriculum.align_decay == "constant"
    t = cfg.train
    assert (t.steps, t.batch_size, t.lr, t.ema_decay, t.grad_clip) == (1_000_000, 256, 1e-4, 0.9999, 1.0)
    repa = load_config(CONFIGS / "imagenet256_sit_xl2_repa.yaml")
    assert repa.objective.method == "repa" and [x.name for x in repa.targets] == ["dinov2"]
    assert (repa.image.sample.cfg_scale, repa.image.sample.guidance_high) == (1.8, 0.7)
    assert load_config(CONFIGS / "imagenet256_sit_xl2.yaml").objective.method == "sit"
    # the papers' numbers are sampled as the reference generate.py does (random labels, ft-ema, truncation)
    assert {load_config(p).image.sample.protocol for p in CONFIGS.glob("imagenet256_*.yaml")} == {"paper"}


def test_peer_method_recipes_carry_their_papers_settings():
    """spec methods.md: iREPA (conv k3, spatial z-score 0.6, coeff 1.0), HASTE (stop at 250K), SRA (8 -> 20,
    t_max 0.2, smooth-L1 0.2, no target), Dispersive (0.25, tau 1, last block, fp32, no clipping)."""
    irepa = load_config(CONFIGS / "imagenet256_sit_xl2_irepa.yaml")
    (t,) = irepa.targets
    assert (irepa.objective.method, irepa.objective.proj_coeff) == ("irepa", 1.0)
    assert (t.projector, t.projector_kernel, t.target_norm, t.target_norm_gamma, t.depth) == ("conv", 3, "spatial",
                                                                                                0.6, 8)
    haste = load_config(CONFIGS / "imagenet256_sit_xl2_haste.yaml")
    assert (haste.objective.method, haste.objective.curriculum.align_stop, haste.objective.proj_coeff) == (
        "haste", 250_000, 0.5)
    assert (haste.image.sample.cfg_scale, haste.image.sample.guidance_high) == (1.65, 0.72)
    feat, att = haste.targets
    assert (att.kind, att.attention_layers, att.attention_blocks, att.attention_heads, att.coeff) == (
        "attention", [9, 10, 11, 12], [5, 6, 7, 8], 12, 0.5) and att.store is None and feat.depth == 8
    sra = load_config(CONFIGS / "imagenet256_sit_xl2_sra.yaml")
    sa = sra.objective.self_align
    assert sra.targets == [] and (sa.student_depth, sa.teacher_depth, sa.t_max, sa.loss, sa.coeff) == (
        8, 20, 0.2, "smooth_l1", 0.2)
    disp = load_config(CONFIGS / "imagenet256_sit_xl2_disp.yaml")
    d = disp.objective.dispersive
    assert disp.targets == [] and (d.coeff, d.tau, d.depth) == (0.25, 1.0, None)
    assert (disp.train.grad_clip, disp.train.mixed_precision, disp.train.steps) == (0.0, "no", 400_000)
    reg = load_config(CONFIGS / "imagenet256_sit_xl2_reg.yaml")
    tok, vec = reg.targets
    assert reg.objective.method == "reg" and (vec.kind, vec.entangle, vec.entangle_coeff, vec.depth) == (
        "pooled", True, 0.03, tok.depth)
    assert (reg.image.sample.cfg_scale, reg.image.sample.guidance_high) == (2.3, 0.85)
    for cfg in (reg, irepa, haste, sra, disp):
        assert cfg.image.model.preset == "SiT-XL/2" and cfg.train.batch_size == 256 and cfg.train.lr == 1e-4


def test_protein_recipe_matches_the_paper():
    """spec protein.md section 4: README command of the reference."""
    cfg = load_config(CONFIGS / "protein_reed.yaml")
    assert cfg.domain == "protein" and cfg.protein.data.format == "pdb_2021aug02"
    m = cfg.protein.model
    assert (m.preset, m.learnable_node, m.update_edge, m.dropout, m.backbone_noise) == ("mpnn", True, True, 0.1, 0.1)
    single, pair, structure = cfg.targets
    assert [(t.depth, t.kind, t.coeff, t.standardize) for t in cfg.targets] == [
        ("decoder.1.nodes", "tokens", 0.5, True), ("decoder.1.edges", "edges", 2.0, True),
        ("encoder", "tokens", 1.0, True)]
    assert [(t.projector_dim, t.projector_layers) for t in cfg.targets] == [(768, 2), (256, 2), (1536, 2)]
    c = cfg.objective.curriculum
    assert cfg.objective.proj_coeff == 0.2 and cfg.objective.method == "reed"
    assert (c.unit, c.gen_start, c.gen_warmup, c.gen_decay, c.align_decay, c.align_steps) == (
        "epoch", 0, 50, "constant", "cosine", 200)
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.grad_clip) == (200, 1e-3, 0.0)
    assert (cfg.protein.data.token_budget, cfg.protein.data.max_length, cfg.protein.sample.steps,
            cfg.protein.sample.temperature) == (20000, 256, 500, 0.1)
    base = load_config(CONFIGS / "protein_baseline.yaml")
    assert base.objective.method == "baseline" and base.targets == []


def test_molecule_recipe_matches_the_paper():
    """spec molecule.md sections 1.7, 1.8, 2: loss weights, Beta(2,1), 0.2 coord noise, alignment after layer index 4
    (our tap 5), weight 0.2, generative loss ramped over 30 epochs, EMA 0.999, lr 3e-4 with a 10k-step warm-up."""
    cfg = load_config(CONFIGS / "molecule_qm9_reed.yaml")
    p = cfg.molecule.process
    assert (p.w_coords, p.w_types, p.w_bonds, p.w_charges) == (1.0, 0.2, 1.0, 1.0)
    assert (p.time_alpha, p.time_beta, p.coord_noise, p.ot) == (2.0, 1.0, 0.2, "equivariant")
    (t,) = cfg.targets
    assert (t.kind, t.depth, cfg.objective.proj_coeff) == ("pooled", 5, 0.2)
    c = cfg.objective.curriculum
    assert (c.unit, c.gen_warmup, c.align_decay) == ("epoch", 30, "constant")
    assert (cfg.train.lr, cfg.train.lr_warmup, cfg.train.ema_decay, cfg.train.grad_clip) == (3e-4, 10000, 0.999, 1.0)
    assert cfg.molecule.sample.steps == 100 and cfg.molecule.sample.grid == "log"
    assert load_config(CONFIGS / "molecule_qm9_baseline.yaml").objective.method == "baseline"
