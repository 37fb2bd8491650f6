"""The shipped recipes load, resolve and carry the paper's numbers (spec image.md §9)."""

from pathlib import Path

import pytest

from reed.cli import main
from reed.config import load_config
from reed.models.sit import SIT_PRESETS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads(path, capsys):
    cfg = load_config(path)
    assert cfg.model.preset in SIT_PRESETS
    depth = SIT_PRESETS[cfg.model.preset]["depth"]
    assert all(1 <= t.depth <= depth for t in cfg.targets)
    assert main(["show-config", str(path)]) == 0
    assert "preset" in capsys.readouterr().out


def test_headline_reed_recipe_matches_the_paper():
    cfg = load_config(CONFIGS / "imagenet256_sit_xl2_reed.yaml")
    assert cfg.model.preset == "SiT-XL/2" and cfg.data.name == "latents"
    dino, text = cfg.targets
    assert (dino.encoder, dino.kind, dino.depth, dino.coeff) == ("dinov2-vit-b", "tokens", 8, 1.0)
    assert (text.source, text.layer, text.kind, text.depth, text.coeff) == ("vlm", 15, "pooled", 16, 0.5)
    assert cfg.objective.method == "reed" and cfg.objective.proj_coeff == 0.5
    assert cfg.objective.curriculum.gen_warmup == 50_000 and cfg.objective.curriculum.align_decay == "constant"
    t = cfg.train
    assert (t.steps, t.batch_size, t.lr, t.ema_decay, t.grad_clip) == (1_000_000, 256, 1e-4, 0.9999, 1.0)
    repa = load_config(CONFIGS / "imagenet256_sit_xl2_repa.yaml")
    assert repa.objective.method == "repa" and [x.name for x in repa.targets] == ["dinov2"]
    assert (repa.sample.cfg_scale, repa.sample.guidance_high) == (1.8, 0.7)
    assert load_config(CONFIGS / "imagenet256_sit_xl2.yaml").objective.method == "sit"
