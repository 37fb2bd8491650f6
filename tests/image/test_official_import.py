"""Official REPA/REED checkpoint layout -> reed SiT: outputs equal an independent forward from the same weights."""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from reed.cli import main
from reed.domains import load_denoiser
from reed.errors import CheckpointError
from reed.image.official import import_official

D, HEADS, DEPTH, P, SIZE, C, K = 32, 4, 2, 2, 8, 4, 10


def reference_state(seed=0, z_dims=(24, 16)):
    """A random state dict in the reference SiT layout (names and shapes written out by hand)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    T = (SIZE // P) ** 2
    sd = {"x_embedder.proj.weight": r(D, C, P, P), "x_embedder.proj.bias": r(D), "pos_embed": r(1, T, D),
          "t_embedder.mlp.0.weight": r(D, 256), "t_embedder.mlp.0.bias": r(D),
          "t_embedder.mlp.2.weight": r(D, D), "t_embedder.mlp.2.bias": r(D),
          "y_embedder.embedding_table.weight": r(K + 1, D),
          "final_layer.adaLN_modulation.1.weight": r(2 * D, D), "final_layer.adaLN_modulation.1.bias": r(2 * D),
          "final_layer.linear.weight": r(P * P * C, D), "final_layer.linear.bias": r(P * P * C)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd.update({b + "attn.qkv.weight": r(3 * D, D), b + "attn.qkv.bias": r(3 * D), b + "attn.proj.weight": r(D, D),
                   b + "attn.proj.bias": r(D), b + "mlp.fc1.weight": r(4 * D, D), b + "mlp.fc1.bias": r(4 * D),
                   b + "mlp.fc2.weight": r(D, 4 * D), b + "mlp.fc2.bias": r(D),
                   b + "adaLN_modulation.1.weight": r(6 * D, D), b + "adaLN_modulation.1.bias": r(6 * D)})
    for k, z in enumerate(z_dims):
        sd.update({f"projectors.{k}.0.weight": r(64, D), f"projectors.{k}.0.bias": r(64),
                   f"projectors.{k}.2.weight": r(64, 64), f"projectors.{k}.2.bias": r(64),
                   f"projectors.{k}.4.weight": r(z, 64), f"projectors.{k}.4.bias": r(z)})
    return sd


def reference_forward(sd, x, t, y):
    """SiT forward written directly from the spec (image.md §1), on raw tensors."""
    lin = lambda h, name: F.linear(h, sd[name + ".weight"], sd[name + ".bias"])  # noqa: E731
    ln = lambda h: F.layer_norm(h, (D,), eps=1e-6)  # noqa: E731
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=P).flatten(2).transpose(1, 2)
    h = h + sd["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    a = t[:, None] * freqs[None]
    temb = lin(F.silu(lin(torch.cat([torch.cos(a), torch.sin(a)], -1), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    B, T = h.shape[:2]
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sm, cm, gm, sf, cf, gf = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, -1)
        hn = ln(h) * (1 + cm[:, None]) + sm[:, None]
        q, k, v = lin(hn, b + "attn.qkv").reshape(B, T, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // HEADS), -1) @ v
        h = h + gm[:, None] * lin(att.transpose(1, 2).reshape(B, T, D), b + "attn.proj")
        hn = ln(h) * (1 + cf[:, None]) + sf[:, None]
        h = h + gf[:, None] * lin(F.gelu(lin(hn, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, -1)
    out = lin(ln(h) * (1 + scale[:, None]) + shift[:, None], "final_layer.linear")
    g = SIZE // P
    out = out.reshape(B, g, g, P, P, C)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(B, C, SIZE, SIZE)


@pytest.fixture()
def official_file(tmp_path):
    ema, model = reference_state(0), reference_state(1)
    path = tmp_path / "last.pt"
    torch.save({"model": model, "ema": ema, "opt": {}, "steps": 4000,
                "args": argparse.Namespace(encoder_depth=2, model="SiT-XL/2")}, path)
    return path, ema, model


def test_imported_model_equals_reference_forward(official_file, tmp_path):
    path, ema, raw = official_file
    ck = import_official(path, tmp_path / "imported", keep_projectors=True, num_heads=HEADS)
    assert ck.name == "step_0004000"
    model, cfg, _ = load_denoiser(tmp_path / "imported")
    m = cfg.image.model
    assert (m.depth, m.hidden_size, m.num_heads, m.patch_size) == (DEPTH, D, HEADS, P)
    assert m.num_classes == K and m.input_size == SIZE and m.in_channels == C
    assert [t.dim for t in cfg.targets] == [24, 16] and all(t.depth == 2 for t in cfg.targets)
    g = torch.Generator().manual_seed(3)
    x, t, y = torch.randn(3, C, SIZE, SIZE, generator=g), torch.rand(3, generator=g), torch.tensor([0, 5, K])
    with torch.no_grad():
        ours = model(x, t, y)[0]
        ref = reference_forward(ema, x, t, y)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
    from safetensors.torch import load_file

    w = load_file(str(ck / "model.safetensors"))  # training continues from the raw weights (the EMA samples)
    assert torch.equal(w["projectors.proj1.net.4.weight"], raw["projectors.1.4.weight"])
    assert torch.equal(w["denoiser.blocks.1.mlp.fc2.weight"], raw["blocks.1.mlp.fc2.weight"])


def test_raw_weights_and_dropped_projectors(official_file, tmp_path):
    path, _, model_sd = official_file
    assert main(["import", str(path), "--out", str(tmp_path / "raw"), "--which", "model", "--num-heads", "4"]) == 0
    model, cfg, _ = load_denoiser(tmp_path / "raw")
    assert cfg.targets == []
    x, t, y = torch.randn(2, C, SIZE, SIZE), torch.rand(2), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.allclose(model(x, t, y)[0], reference_forward(model_sd, x, t, y), atol=1e-5)


def test_bad_official_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        import_official(tmp_path / "none.pt", tmp_path / "o")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="junk.pt"):
        import_official(tmp_path / "junk.pt", tmp_path / "o")
    sd = reference_state()
    sd["blocks.1.attn.qkv.weight"] = torch.zeros(5, 5)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn\.qkv\.weight"):
        import_official(tmp_path / "bad.pt", tmp_path / "o", num_heads=HEADS)
    with pytest.raises(CheckpointError, match="number of heads for width 32"):
        import_official(tmp_path / "bad.pt", tmp_path / "o")


def tiny_latents(root):
    """12 images (16 px, 3 classes) -> prepared shards -> latents (4, 8, 8) through a tiny random VAE."""
    import numpy as np
    from PIL import Image

    from reed.image.prepare import prepare_images, prepare_latents

    rng = np.random.default_rng(0)
    for c in range(3):
        (root / "raw" / f"n0{c}").mkdir(parents=True)
        for i in range(4):
            img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / "raw" / f"n0{c}" / f"{i}.png")
    prepare_images(root / "raw", root / "images", resolution=16, progress=False)
    prepare_latents(root / "images", root / "latents", vae=tiny_vae(root / "vae"), batch_size=12, progress=False)
    return root / "latents"


def tiny_vae(path):
    """A random diffusers AutoencoderKL with C latent channels and a factor-2 decoder (8x8 latents -> 16 px)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=C,
                  norm_num_groups=4, sample_size=16, layers_per_block=1).save_pretrained(path)
    return path


def tiny_store(path, shape, seed):
    from reed.store import TargetStoreWriter

    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(12, *shape, generator=g)
    w = TargetStoreWriter(path, source="test", count=12, shape=shape, dtype="float32", shard_size=12)
    w.write(lambda idx: rows[[int(i) for i in idx]], progress=False)
    w.finalize()
    return path


def test_reed_checkpoint_keeps_its_targets_and_resumes(tmp_path):
    """A REED training file (one DINOv2 + one caption-embedding projector) imports with each projector's kind,
    depth, modality and coefficient from its args, and `reed train --resume` continues it for two steps."""
    import json

    from safetensors.torch import load_file

    ema, raw = reference_state(0, z_dims=(24, 16)), reference_state(1, z_dims=(24, 16))
    params = [torch.nn.Parameter(v.clone(), requires_grad=k != "pos_embed") for k, v in raw.items()]
    ref_opt = torch.optim.AdamW(params, lr=1e-4)  # the reference optimizer: model.parameters() in state-dict order
    for p in params:
        p.grad = torch.randn_like(p) if p.requires_grad else None
    ref_opt.step()
    text_w = list(raw).index("projectors.1.4.weight")
    args = argparse.Namespace(model="SiT-XL/2", enc_type="dinov2-vit-b", encoder_depth=1, encoder_depth_text=2,
                              text_embeds_dir="text_embeds_qwenvl_7b_layer_15", repa_coeff=[1.0, 0.5],
                              proj_coeff=0.25, diffusion_warm_up_steps=50000, time_schedule="constant",
                              path_type="linear", weighting="uniform", max_train_steps=1_000_000)
    torch.save({"model": raw, "ema": ema, "opt": ref_opt.state_dict(), "steps": 4000, "args": args},
               tmp_path / "reed.pt")
    lat = tiny_latents(tmp_path)
    img, txt = tiny_store(tmp_path / "st_img", (16, 24), 1), tiny_store(tmp_path / "st_txt", (16,), 2)
    out = tmp_path / "imported"
    assert main(["import", str(tmp_path / "reed.pt"), "--out", str(out), "--keep-projectors", "--num-heads", "4",
                 "--latents", str(lat), "--target-store", f"dinov2-vit-b={img}", "--target-store", f"text={txt}"]) == 0
    _, cfg, ck = load_denoiser(out)
    got = [(t.name, t.kind, t.modality, t.depth, t.coeff, t.dim, t.path) for t in cfg.targets]
    assert got == [("dinov2-vit-b", "tokens", "image", 1, 1.0, 24, str(img)),
                   ("text", "pooled", "text", 2, 0.5, 16, str(txt))]
    o = cfg.objective
    assert (o.method, o.proj_coeff, o.curriculum.gen_warmup) == ("reed", 0.25, 50000)
    w = load_file(str(ck / "model.safetensors"))
    assert torch.equal(w["projectors.text.net.4.weight"], raw["projectors.1.4.weight"])
    # the reference AdamW moments moved to reed's parameter order (pos_embed, a buffer in reed, has none)
    from reed.checkpoint import load_optimizer_state, read_state

    st = read_state(ck)
    assert st["extra"]["optimizer"] == "reference"
    opt_state, _ = load_optimizer_state(ck, st)
    assert len(opt_state["state"]) == len(params) - 1
    ref_avg = ref_opt.state_dict()["state"][text_w]["exp_avg"]
    assert sum(torch.equal(s["exp_avg"], ref_avg) for s in opt_state["state"].values()) == 1
    run = ["train", str(out / "config.yaml"), "train.steps=4002", "train.batch_size=4", "train.mixed_precision=no",
           "train.progress=false", "train.log_every=1", "train.sample_every=0", "train.checkpoint_every=1000",
           "image.sample.steps=2", f"train.cache_dir={tmp_path / 'cache'}", "--out", str(out), "--resume"]
    assert main(run) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [4000, 4001]
    assert all(torch.isfinite(torch.tensor([r["align/dinov2-vit-b"], r["align/text"]])).all() for r in recs)
    after = load_file(str(out / "checkpoints" / "step_0004002" / "model.safetensors"))
    moved = (after["projectors.text.net.4.weight"] - raw["projectors.1.4.weight"]).abs().max().item()
    assert 0 < moved < 1e-3  # two Adam steps (lr 1e-4) from the imported projector, not a fresh one


def test_imported_checkpoint_samples_by_protocol(official_file, tmp_path, refuses):
    """An import samples with the paper protocol by default, decoding with sd-vae-ft-ema (absent from the offline
    cache here, so the refusal names it) unless a VAE is named, at import or by --vae."""
    import json

    import numpy as np

    path, _, _ = official_file
    vae = tiny_vae(tmp_path / "vae")
    assert main(["import", str(path), "--out", str(tmp_path / "bare"), "--num-heads", "4"]) == 0
    bare = ["sample", str(tmp_path / "bare"), "--num", "3", "--steps", "2", "--sampler", "euler"]
    refuses([*bare, "--out", tmp_path / "x.npz"], "stabilityai/sd-vae-ft-ema")  # the paper's decoder
    refuses([*bare, "--protocol", "reed", "--out", tmp_path / "x.npz"], "--vae")  # reed: no VAE recorded
    assert main([*bare, "--vae", str(vae), "--out", str(tmp_path / "p.npz")]) == 0
    rec = json.loads((tmp_path / "p.json").read_text())
    assert (rec["protocol"], rec["uint8"], rec["labels"], rec["vae"]) == ("paper", "truncate", "random",
                                                                        str(vae.resolve()))
    assert np.load(tmp_path / "p.npz")["arr_0"].shape == (3, 16, 16, 3)
    assert main(["import", str(path), "--out", str(tmp_path / "imp"), "--num-heads", "4", "--vae", str(vae)]) == 0
    assert main(["sample", str(tmp_path / "imp"), "--num", "3", "--steps", "2", "--sampler", "euler",
                 "--protocol", "reed", "--out", str(tmp_path / "r.npz")]) == 0
    rec = json.loads((tmp_path / "r.json").read_text())
    assert (rec["protocol"], rec["uint8"], rec["labels"], rec["vae"]) == ("reed", "round", "balanced",
                                                                        str(vae.resolve()))


@pytest.mark.parametrize("args,extra,names", [
    (dict(enc_type="dinov2-vit-b", repa_coeff=[1.0]), [], ["1 alignment targets", "2 projectors", "dinov2-vit-b"]),
    (dict(enc_type="dinov2-vit-b", text_embeds_dir="t", repa_coeff=[1.0]), [], ["1 repa_coeff", "'text'"]),
    (dict(enc_type="dinov2-vit-b", text_embeds_dir="t", repa_coeff=[1.0, 0.5]), ["--target-store", "clip=/x"],
     ["--target-store", "'clip'", "dinov2-vit-b"]),
])
def test_import_refuses_args_that_do_not_fit_the_file(tmp_path, refuses, args, extra, names):
    sd = reference_state(0, z_dims=(24, 16))
    torch.save({"ema": sd, "args": argparse.Namespace(**args)}, tmp_path / "r.pt")
    refuses(["import", tmp_path / "r.pt", "--out", tmp_path / "o", "--keep-projectors", "--num-heads", "4", *extra],
            *names)
