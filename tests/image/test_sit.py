"""Tests for reed.image.sit (CPU, small models)."""

from __future__ import annotations

import math

import pytest
import torch

from reed.image.sit import SIT_PRESETS, SiT, build_sit, drop_labels, sincos_pos_embed_2d, timestep_embedding


def _tiny(**kw) -> SiT:
    cfg = dict(
        input_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=3, num_heads=4, num_classes=10
    )
    cfg.update(kw)
    return SiT(**cfg)


def _inputs(model: SiT, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, model.num_classes + 1, (batch,), generator=g)
    return x, t, y


def _randomize(model: SiT, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# ---------------------------------------------------------------- shapes, init
@pytest.mark.parametrize("channels,input_size,patch", [(1, 8, 2), (3, 12, 4), (4, 8, 1)])
def test_shapes_and_taps(channels, input_size, patch):
    model = _tiny(in_channels=channels, input_size=input_size, patch_size=patch)
    x, t, y = _inputs(model, batch=3)
    out, hs = model(x, t, y, taps=(1, 3))
    assert out.shape == x.shape
    T = (input_size // patch) ** 2
    assert model.num_tokens == T and model.grid_size == input_size // patch
    assert set(hs) == {1, 3}
    for h in hs.values():
        assert h.shape == (3, T, 32)
    assert model(x, t, y)[1] == {}


def test_output_zero_at_init_and_blocks_identity():
    model = _tiny()
    x, t, y = _inputs(model)
    out, hs = model(x, t, y, taps=(1, 2, 3))
    assert torch.equal(out, torch.zeros_like(out))
    # adaLN-Zero: every block is the identity at init, so all taps equal the embedded input.
    h0 = model.x_embedder(x) + model.pos_embed
    for h in hs.values():
        torch.testing.assert_close(h, h0)


def test_null_class_and_attributes():
    model = _tiny(num_classes=7)
    assert model.null_class == 7
    assert model.y_embedder.embedding_table.num_embeddings == 8
    assert model.hidden_size == 32 and model.depth == 3 and model.in_channels == 3


# ---------------------------------------------------------------- fixed embeddings
def test_sincos_pos_embed_hand_values():
    pe = sincos_pos_embed_2d(8, 2)  # 4 tokens, D=8; 1-D halves of width 4 with omega = [1, 10000^-0.5 = 0.01]
    assert pe.shape == (4, 8)
    s1, s2, c1, c2 = math.sin(1.0), math.sin(0.01), math.cos(1.0), math.cos(0.01)
    origin = [0.0, 0.0, 1.0, 1.0]
    one = [s1, s2, c1, c2]
    expected = torch.tensor(
        [
            origin + origin,  # row 0, col 0
            one + origin,  # row 0, col 1: first half encodes the column
            origin + one,  # row 1, col 0: second half encodes the row
            one + one,  # row 1, col 1
        ]
    )
    torch.testing.assert_close(pe, expected)


def test_pos_embed_buffer():
    model = _tiny()
    assert "pos_embed" in dict(model.named_buffers())
    assert "pos_embed" in model.state_dict()
    assert "pos_embed" not in dict(model.named_parameters())
    assert model.pos_embed.shape == (1, model.num_tokens, model.hidden_size)
    torch.testing.assert_close(model.pos_embed[0], sincos_pos_embed_2d(32, 4))


def test_timestep_embedding_hand_formula():
    t = torch.tensor([0.0, 0.3, 1.0])
    emb = timestep_embedding(t, 256)
    assert emb.shape == (3, 256) and emb.dtype == torch.float32
    for i, tv in enumerate(t.tolist()):
        for k in (0, 1, 64, 127):
            f = math.exp(-math.log(10000.0) * k / 128)
            assert emb[i, k].item() == pytest.approx(math.cos(tv * f), abs=1e-6)  # cos first
            assert emb[i, 128 + k].item() == pytest.approx(math.sin(tv * f), abs=1e-6)
    # t is not scaled by 1000: at t=0.3 the first frequency (1.0) gives cos(0.3)
    assert emb[1, 0].item() == pytest.approx(math.cos(0.3), abs=1e-6)
    # The model's embedder = MLP(sinusoid)
    model = _tiny()
    torch.testing.assert_close(model.t_embedder(t), model.t_embedder.mlp(emb))


# ---------------------------------------------------------------- attention
@pytest.mark.parametrize("qk_norm", [False, True])
def test_fused_vs_explicit_attention(qk_norm):
    fused = _tiny(qk_norm=qk_norm, fused_attn=True)
    _randomize(fused)
    explicit = _tiny(qk_norm=qk_norm, fused_attn=False)
    explicit.load_state_dict(fused.state_dict())
    assert explicit.blocks[0].attn.fused_attn is False
    x, t, y = _inputs(fused)
    out_f, hs_f = fused(x, t, y, taps=(2,))
    out_e, hs_e = explicit(x, t, y, taps=(2,))
    assert out_f.abs().max() > 1e-3  # non-trivial after randomisation
    torch.testing.assert_close(out_f, out_e, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hs_f[2], hs_e[2], rtol=1e-4, atol=1e-4)


def test_qk_norm_params():
    model = _tiny(qk_norm=True)
    names = dict(model.named_parameters())
    assert "blocks.0.attn.q_norm.weight" in names and "blocks.2.attn.k_norm.bias" in names
    assert names["blocks.0.attn.q_norm.weight"].shape == (8,)  # head_dim = 32 / 4
    assert not any("q_norm" in n for n, _ in _tiny().named_parameters())
    x, t, y = _inputs(model)
    assert model(x, t, y)[0].shape == x.shape


# ---------------------------------------------------------------- presets and builder
def test_presets():
    assert SIT_PRESETS["SiT-XL/2"] == dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)
    assert SIT_PRESETS["SiT-L/4"] == dict(depth=24, hidden_size=1024, num_heads=16, patch_size=4)
    assert SIT_PRESETS["SiT-B/8"] == dict(depth=12, hidden_size=768, num_heads=12, patch_size=8)
    assert SIT_PRESETS["SiT-S/2"] == dict(depth=12, hidden_size=384, num_heads=6, patch_size=2)
    assert SIT_PRESETS["SiT-T/1"] == dict(depth=4, hidden_size=128, num_heads=4, patch_size=1)
    assert SIT_PRESETS["SiT-M/2"] == dict(depth=6, hidden_size=256, num_heads=4, patch_size=2)
    expected = {f"SiT-{s}/{p}" for s in ("XL", "L", "B", "S") for p in (2, 4, 8)}
    expected |= {"SiT-T/1", "SiT-T/2", "SiT-T/4", "SiT-M/2"}
    assert set(SIT_PRESETS) == expected


def test_sit_s_runs_with_hidden_384():
    # The reference SiT-S has a 768-wide final layer (crash); ours is hidden_size wide.
    model = build_sit("SiT-S/2", input_size=4, num_classes=5)
    assert model.final_layer.linear.in_features == 384
    assert model.final_layer.adaLN_modulation[1].weight.shape == (768, 384)
    x, t, y = _inputs(model)
    out, hs = model(x, t, y, taps=(12,))
    assert out.shape == x.shape and hs[12].shape == (2, 4, 384)


def test_build_sit_overrides_and_errors():
    m = build_sit("SiT-T/2", input_size=8, in_channels=1, num_classes=3, depth=2, qk_norm=True)
    assert m.depth == 2 and m.hidden_size == 128 and m.in_channels == 1 and m.patch_size == 2
    m2 = build_sit(input_size=4, depth=1, hidden_size=16, num_heads=2, patch_size=2, num_classes=2)
    assert m2.num_tokens == 4
    with pytest.raises(ValueError, match="SiT-XL/2"):
        build_sit("SiT-XXL/2")


def test_param_names_follow_reference():
    names = set(dict(_tiny(qk_norm=True).named_parameters())) | set(_tiny().state_dict())
    for n in [
        "x_embedder.proj.weight",
        "x_embedder.proj.bias",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.2.weight",
        "y_embedder.embedding_table.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.qkv.bias",
        "blocks.0.attn.proj.weight",
        "blocks.0.attn.proj.bias",
        "blocks.0.attn.q_norm.weight",
        "blocks.0.attn.k_norm.weight",
        "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc2.weight",
        "blocks.2.adaLN_modulation.1.weight",
        "final_layer.linear.weight",
        "final_layer.adaLN_modulation.1.weight",
        "pos_embed",
    ]:
        assert n in names, n


def test_init_statistics():
    model = _tiny()
    assert torch.count_nonzero(model.blocks[1].adaLN_modulation[1].weight) == 0
    assert torch.count_nonzero(model.blocks[1].attn.qkv.bias) == 0
    assert torch.count_nonzero(model.blocks[1].attn.qkv.weight) > 0
    assert model.y_embedder.embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert torch.count_nonzero(model.x_embedder.proj.bias) == 0


# ---------------------------------------------------------------- labels
def test_drop_labels():
    y = torch.arange(1000) % 10
    same = drop_labels(y, 0.0, 10)
    assert torch.equal(same, y) and same.data_ptr() != y.data_ptr()
    assert torch.equal(drop_labels(y, 1.0, 10), torch.full_like(y, 10))
    a = drop_labels(y, 0.3, 10, generator=torch.Generator().manual_seed(1))
    b = drop_labels(y, 0.3, 10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    dropped = a == 10
    assert 200 < dropped.sum().item() < 400
    assert torch.equal(a[~dropped], y[~dropped])
    assert torch.equal(y, torch.arange(1000) % 10)  # input untouched
    with pytest.raises(ValueError, match="prob"):
        drop_labels(y, 1.5, 10)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("bad", [0, 4])
def test_tap_out_of_range(bad):
    model = _tiny()
    x, t, y = _inputs(model)
    with pytest.raises(ValueError, match=rf"{bad}.*1\.\.3"):
        model(x, t, y, taps=(bad,))


def test_constructor_errors():
    with pytest.raises(ValueError, match="input_size=10"):
        _tiny(input_size=10, patch_size=4)
    with pytest.raises(ValueError, match="hidden_size=30"):
        _tiny(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="num_heads=7"):
        _tiny(hidden_size=32, num_heads=7)


def test_input_shape_errors():
    model = _tiny()
    x, t, y = _inputs(model)
    with pytest.raises(ValueError, match=r"\(B, 3, 8, 8\)"):
        model(x[:, :1], t, y)
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\)"):
        model(x[:, :, :4, :4], t, y)
    with pytest.raises(ValueError, match="t must"):
        model(x, t[:1], y)
    with pytest.raises(ValueError, match="y must"):
        model(x, t, y.float())


# ---------------------------------------------------------------- tap vs final layer
def test_last_tap_is_final_layer_input():
    model = _tiny()
    _randomize(model, seed=3)
    x, t, y = _inputs(model)
    seen = {}

    def hook(mod, args, out):
        seen["h"] = args[0]

    handle = model.final_layer.register_forward_hook(hook)
    try:
        out, hs = model(x, t, y, taps=(model.depth,))
    finally:
        handle.remove()
    assert torch.equal(hs[model.depth], seen["h"])
    # Recompute by hand too.
    c = model.t_embedder(t) + model.y_embedder(y)
    h = model.x_embedder(x) + model.pos_embed
    for blk in model.blocks:
        h = blk(h, c)
    torch.testing.assert_close(hs[model.depth], h)
    torch.testing.assert_close(out, model.unpatchify(model.final_layer(h, c)))


def test_unpatchify_inverts_patchify():
    model = _tiny(in_channels=2, patch_size=2, input_size=6)
    x = torch.randn(2, 2, 6, 6)
    p, g = 2, 3
    # patchify to (B, T, p*p*C) with channel last inside a patch, row-major tokens
    patches = x.reshape(2, 2, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(2, g * g, p * p * 2)
    assert torch.equal(model.unpatchify(patches), x)


def test_backward_and_bf16_autocast():
    model = _tiny()
    _randomize(model)
    x, t, y = _inputs(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, hs = model(x, t, y, taps=(1,))
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
    assert model.pos_embed.grad is None
