"""The ImageNet recipe end to end on tiny local data, through the CLI:
ImageFolder -> prepare images -> prepare latents (tiny VAE) -> fit encoder -> embed into a store -> caption
(tiny VLM, optional) -> train SiT on latents with store targets -> resume -> sample decoded through the VAE."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reed.cli import main

ROOT = Path(__file__).resolve().parents[2]


def make_image_folder(root: Path, per_class: int = 8) -> Path:
    rng = np.random.default_rng(0)
    colours = {"n01_red": (200, 30, 30), "n02_green": (30, 200, 30), "n03_blue": (30, 30, 200)}
    for name, col in colours.items():
        d = root / name
        d.mkdir(parents=True)
        for i in range(per_class):
            h, w = int(rng.integers(40, 70)), int(rng.integers(40, 70))
            img = np.full((h, w, 3), 20, np.uint8)
            y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
            img[y0 : y0 + h // 2, x0 : x0 + w // 2] = col
            Image.fromarray(img).save(d / f"img{i}.png")
    (root / "n01_red" / "broken.png").write_bytes(b"\x89PNG not really")
    return root


def tiny_vae(path: Path) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=32, layers_per_block=1)
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgpipe")
    src = make_image_folder(d / "raw")
    assert main(["prepare", "images", str(src), str(d / "images"), "--resolution", "32", "--shard-size", "10"]) == 0
    man = json.loads((d / "images" / "manifest.json").read_text())
    assert man["count"] == 24 and len(man["skipped"]) == 1 and "broken.png" in man["skipped"][0]["file"]
    assert man["classes"] == ["n01_red", "n02_green", "n03_blue"]
    vae = tiny_vae(d / "vae")
    assert main(["prepare", "latents", str(d / "images"), str(d / "latents"), "--vae", str(vae),
                 "--batch-size", "8", "--device", "cpu"]) == 0
    return d


def overrides(d: Path, *extra):
    return ["image.data.name=latents", f"image.data.path={d / 'latents'}", "image.model.preset=SiT-T/4",
            "train.batch_size=8",
            "train.steps=6", "train.checkpoint_every=3", "train.log_every=1", "train.progress=false",
            "train.sample_every=0", "train.num_preview=6", "image.sample.steps=3", f"train.cache_dir={d / 'cache'}",
            "objective.curriculum.gen_warmup=2",
            f"targets=[{{name: ssl, source: fitted_encoder, path: {d / 'enc'}, kind: tokens, depth: 2, "
            f"projector_dim: 32, store: {d / 'store_ssl'}}}]", "image.fit.steps=5", "image.fit.batch_size=8",
                "image.fit.dim=16",
            "image.fit.width=16", "image.fit.downsample=3", *extra]


def test_latent_training_with_store_targets_end_to_end(prepared, tmp_path):
    d = prepared
    cfg = str(ROOT / "configs" / "demo.yaml")
    assert main(["fit-encoder", cfg, *overrides(d)]) == 0
    # before embedding, training explains what to run
    assert main(["train", cfg, *overrides(d), "--out", str(tmp_path / "early")]) == 2
    assert main(["embed", cfg, *overrides(d), "--target", "ssl", "--shard-size", "10"]) == 0
    store = json.loads((d / "store_ssl" / "manifest.json").read_text())
    assert store["count"] == 24 and store["shape"] == [16, 16]  # 32 px / 2^3 = 4x4 tokens, 16-d
    run = tmp_path / "run"
    assert main(["train", cfg, *overrides(d), "--out", str(run), "--stop-at", "4"]) == 0
    assert main(["train", cfg, *overrides(d), "--out", str(run), "--resume"]) == 0
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(6)) and all(np.isfinite(r["loss"]) for r in recs)
    assert "align/ssl" in recs[-1]
    out = tmp_path / "samples.npz"
    assert main(["sample", str(run), "--num", "5", "--out", str(out), "--steps", "2"]) == 0
    arr = np.load(out)["arr_0"]
    assert arr.shape == (5, 32, 32, 3) and arr.dtype == np.uint8  # decoded through the VAE to pixels
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["vae"] and rec["vae"].endswith("vae")

    # REG on the latents: the fitted encoder's pooled vector generated with the latent as one more token, batches
    # (posterior moments read by 2 data-loader workers, drawn on the device) resumed exactly; REG-guided sampling
    reg = [o for o in overrides(d) if not o.startswith("targets=")] + [
        f"targets=[{{name: ssl, source: fitted_encoder, path: {d / 'enc'}, kind: tokens, depth: 2, projector_dim: 32, "
        f"store: {d / 'store_ssl'}}}, {{name: ssl_vector, source: fitted_encoder, path: {d / 'enc'}, kind: pooled, "
        "depth: 2, entangle: true}]", "objective.method=reg", "train.workers=2"]
    full, part = tmp_path / "reg_full", tmp_path / "reg_part"
    assert main(["train", cfg, *reg, "--out", str(full)]) == 0
    assert main(["train", cfg, *reg, "--out", str(part), "--stop-at", "4"]) == 0
    assert main(["train", cfg, *reg, "--out", str(part), "--resume"]) == 0
    a, b = ([json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (full, part))
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and all(r["loss_entangled"] > 0 for r in a)
    out = tmp_path / "reg.npz"
    assert main(["sample", str(full), "--num", "3", "--steps", "2", "--cfg-scale", "1.5", "--cls-cfg-scale", "0",
                 "--out", str(out)]) == 0
    assert np.load(out)["arr_0"].shape == (3, 32, 32, 3)


def test_online_encoder_and_store_give_the_same_training(prepared, tmp_path):
    """A (tiny, random) DINOv2 run online every step vs embedded once into a store: same losses."""
    from transformers import Dinov2Config, Dinov2Model

    d = prepared
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=64)).save_pretrained(tmp_path / "dino")
    tgt = (f"{{name: dino, source: encoder, encoder: dinov2-vit-s, path: {tmp_path / 'dino'}, kind: tokens, "
           f"depth: 2, projector_dim: 16}}")
    base = ["image.data.name=images", f"image.data.path={d / 'images'}", "image.model.preset=SiT-T/4",
            "train.batch_size=8",
            "train.steps=3", "train.log_every=1", "train.progress=false", "train.sample_every=0",
            "objective.method=repa", f"train.cache_dir={tmp_path / 'cache'}"]
    cfg = str(ROOT / "configs" / "demo.yaml")
    assert main(["embed", cfg, *base, f"targets=[{tgt}]", "--target", "dino", "--out", str(tmp_path / "st"),
                 "--dtype", "float32"]) == 0
    assert json.loads((tmp_path / "st" / "manifest.json").read_text())["shape"] == [4, 32]  # 28 px / 14 -> 2x2
    assert main(["train", cfg, *base, f"targets=[{tgt}]", "--out", str(tmp_path / "online")]) == 0
    stored = tgt[:-1] + f", store: {tmp_path / 'st'}}}"
    assert main(["train", cfg, *base, f"targets=[{stored}]", "--out", str(tmp_path / "stored")]) == 0
    la, lb = ([json.loads(x)["loss"] for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
              for r in ("online", "stored"))
    assert la == pytest.approx(lb, abs=1e-4)
