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
    path, ema, _ = official_file
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

    w = load_file(str(ck / "model.safetensors"))
    assert torch.equal(w["projectors.proj1.net.4.weight"], ema["projectors.1.4.weight"])


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
