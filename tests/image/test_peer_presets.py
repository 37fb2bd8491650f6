"""The peer methods' presets (reg, irepa, haste, sra, disp) end to end on the embedded digits: train through the CLI,
resume bit-exactly across a checkpoint (for haste across its alignment stop, for sra with its EMA teacher
restored), sample and evaluate."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reed.cli import main
from reed.config import load_config
from reed.train import train

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"
PRESETS = {  # "{enc}": the fitted encoder; REG entangles its pooled vector, joining the same-width token target
    "reg": ["targets=[{name: ssl, source: fitted_encoder, path: '{enc}', kind: tokens, depth: 2, projector_dim: 256}, "
            "{name: ssl_cls, source: fitted_encoder, path: '{enc}', kind: pooled, depth: 2, entangle: true}]"],
    "irepa": [],
    "haste": ["objective.curriculum.align_stop=5"],
    "sra": ["objective.self_align.student_depth=2", "objective.self_align.teacher_depth=4"],
    "disp": [],
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, digits_cache):
    d = tmp_path_factory.mktemp("presets")
    enc = d / "encoder"
    assert main(["fit-encoder", str(DEMO), f"targets.0.path={enc}", "image.fit.steps=20", "train.progress=false"]) == 0
    (d / "cache").symlink_to(digits_cache)  # the session's digits evaluator
    return d


def args(d: Path, method: str) -> list[str]:
    return [f"targets.0.path={d / 'encoder'}", f"train.cache_dir={d / 'cache'}", "train.batch_size=32",
            "train.progress=false", "train.sample_every=0", "train.log_every=1", "train.steps=8",
            "train.checkpoint_every=4", "train.lr=0.002", f"objective.method={method}",
            *[a.replace("{enc}", str(d / "encoder")) for a in PRESETS[method]]]


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.mark.parametrize("method", list(PRESETS))
def test_preset_trains_resumes_samples_and_evaluates(workdir, method, capsys):
    full, part = workdir / f"{method}_full", workdir / f"{method}_part"
    assert main(["train", str(DEMO), *args(workdir, method), "--out", str(full)]) == 0
    cfg = load_config(DEMO, args(workdir, method))
    train(cfg, part, stop_at=6)  # interrupted after step 6: resumes from the step-4 checkpoint
    assert main(["train", str(DEMO), *args(workdir, method), "--out", str(part), "--resume"]) == 0
    a, b = metrics(full), metrics(part)
    assert [r["step"] for r in b] == list(range(8))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    wa = load_file(str(full / "checkpoints" / "step_0000008" / "ema.safetensors"))
    wb = load_file(str(part / "checkpoints" / "step_0000008" / "ema.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    model = load_file(str(full / "checkpoints" / "step_0000008" / "model.safetensors"))
    if method == "reg":  # the entangled token: its embedder and zero-init velocity head; one shared projector
        assert model["denoiser.cls_embedder.0.weight"].shape == (128, 64)
        assert "projectors.ssl_cls.net.0.weight" not in model
        assert all(r["loss_entangled"] > 0 for r in a) and "align/ssl" in a[0]
    if method == "irepa":  # the conv projector on the token target, the MLP on the pooled caption (not used by repa)
        assert model["projectors.ssl.conv.weight"].shape == (64, 128, 3, 3)
        assert "align/ssl" in a[0] and "align/caption" not in a[0]
    if method == "haste":
        assert [r["w_align"] for r in a] == [1.0] * 5 + [0.0] * 3
        assert all(r["loss"] == r["loss_gen"] for r in a[5:]) and "align/ssl" not in a[5]
    if method == "sra":
        assert model["heads.self_align.net.0.weight"].shape == (256, 128)
        assert all(r["self_align"] > 0 for r in a) and not any(k.startswith("align/") for k in a[0])
    if method == "disp":
        assert all(-torch.log(torch.tensor(32.0)) <= r["dispersive"] <= 0 for r in a)
        assert not any(k.startswith("align/") for k in a[0])
    out = workdir / f"{method}.npz"
    assert main(["sample", str(full), "--num", "10", "--steps", "3", "--out", str(out)]) == 0
    assert main(["evaluate", str(out), "--run", str(full), "--out", str(workdir / f"{method}_eval.json")]) == 0
    res = json.loads((workdir / f"{method}_eval.json").read_text())
    assert res["in_domain"]["num_samples"] == 10 and 0.0 <= res["in_domain"]["accuracy"] <= 1.0
    if method == "reg":  # REG's guidance of its token: its own scale, or (0) its conditional drift alone
        for cls in ("2.5", "0"):
            assert main(["sample", str(full), "--num", "4", "--steps", "3", "--cfg-scale", "2", "--cls-cfg-scale",
                         cls, "--out", str(workdir / f"reg_cls{cls}.npz")]) == 0
            rec = json.loads((workdir / f"reg_cls{cls}.json").read_text())
            assert rec["cfg_scale"] == 2 and rec["cls_cfg_scale"] == float(cls)
        assert main(["sample", str(full), "--cls-cfg-scale", "-1"]) == 2
        assert "--cls-cfg-scale must be a finite number >= 0" in capsys.readouterr().err


def test_haste_with_attention_distillation_from_an_online_vit(tmp_path):
    """HASTE in full: REPA on a (tiny, random) DINOv2's patch tokens plus the cross-entropy of its attention rows
    distilled into SiT blocks, both stopped at align_stop; 4x4 token grids on both sides."""
    import numpy as np
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(image_size=28, patch_size=7, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64)).save_pretrained(tmp_path / "dino")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 255, (24, 32, 32, 3), dtype=np.uint8),
             labels=np.arange(24) % 3)
    common = f"source: encoder, encoder: dinov2-vit-s, path: '{tmp_path / 'dino'}'"
    targets = (f"targets=[{{name: dino, {common}, kind: tokens, depth: 2, projector_dim: 16}}, "
               f"{{name: dino_attn, {common}, kind: attention, attention_layers: [1, 2], attention_blocks: [1, 2], "
               f"coeff: 0.5}}]")
    argv = ["train", str(DEMO), "image.data.name=npz", f"image.data.path={tmp_path / 'd.npz'}",
            "image.model.preset=SiT-T/4", "image.model.patch_size=8", targets, "objective.method=haste",
            "objective.curriculum.align_stop=3", "train.steps=4", "train.batch_size=8", "train.log_every=1",
            "train.progress=false", "train.sample_every=0", f"train.cache_dir={tmp_path / 'c'}"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    recs = metrics(tmp_path / "run")
    assert all(0 < r["align/dino_attn"] < 10 for r in recs[:3])  # a cross-entropy of rows over 16 keys
    assert [("align/dino_attn" in r, r["w_align"]) for r in recs] == [(True, 1.0)] * 3 + [(False, 0.0)]
    assert recs[3]["loss"] == recs[3]["loss_gen"]


def test_every_preset_trains_on_the_yardstick_world(tmp_path):
    """The eight presets a few steps on the shapes world (the yardstick's config, shrunk): a VICReg encoder fitted on
    the world's own encoder range, the real MiniLM caption target; the loss is finite and each method's own terms
    are logged."""
    cfg_path = ROOT / "configs" / "yardstick_shapes.yaml"
    enc = tmp_path / "enc"
    small = ["image.data.size=64", "image.fit.world_size=256", "image.fit.steps=5", f"targets.0.path={enc}",
             f"train.cache_dir={tmp_path / 'c'}", "train.progress=false", "train.batch_size=16", "train.steps=3",
             "train.log_every=1", "train.checkpoint_every=0"]
    assert main(["fit-encoder", str(cfg_path), *small]) == 0
    entangled = (f"targets=[{{name: ssl, source: fitted_encoder, path: '{enc}', kind: tokens, depth: 2, "
                 f"projector_dim: 32}}, {{name: ssl_vector, source: fitted_encoder, path: '{enc}', kind: pooled, "
                 f"depth: 2, entangle: true}}]")
    extra = {"reg": [entangled], "haste": ["objective.curriculum.align_stop=2"],
             "sra": ["objective.self_align.student_depth=2", "objective.self_align.teacher_depth=3"]}
    logged = {"sit": "loss_gen", "repa": "align/ssl", "reed": "align/caption", "reg": "loss_entangled",
              "irepa": "align/ssl", "haste": "align/ssl", "sra": "self_align", "disp": "dispersive"}
    for method, key in logged.items():
        cfg = load_config(cfg_path, [*small, f"objective.method={method}", *extra.get(method, [])])
        train(cfg, tmp_path / method)
        recs = metrics(tmp_path / method)
        assert len(recs) == 3 and all(math.isfinite(r["loss"]) for r in recs), method
        assert key in recs[0], (method, sorted(recs[0]))
    # the yardstick's combination: REED's tokens + caption + curriculum, iREPA's conv projector and spatial z-score,
    # REG's entangled vector
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import yardstick

    method, _, more = yardstick.METHODS["reed+irepa+reg"]
    over = [yardstick.with_entangled(load_config(cfg_path, small), 0, str(enc)),
            *[o.replace("{enc}", "0") for o in more if o != "@entangle"]]
    cfg = load_config(cfg_path, [*small, f"objective.method={method}", *over])
    assert (cfg.targets[0].projector, cfg.targets[0].target_norm, cfg.targets[2].entangle) == ("conv", "spatial", True)
    train(cfg, tmp_path / "combo")
    recs = metrics(tmp_path / "combo")
    assert all(math.isfinite(r["loss"]) for r in recs)
    assert {"align/ssl", "align/caption", "loss_entangled"} <= set(recs[0])
    weights = load_file(str(tmp_path / "combo" / "checkpoints" / "step_0000003" / "model.safetensors"))
    assert "projectors.ssl.conv.weight" in weights and "denoiser.cls_embedder.0.weight" in weights
