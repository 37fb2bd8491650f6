"""Tests of reed.image.targets.encoders: tiny random-weight encoders saved locally, loaded through the real code paths.

Each check compares against an independent computation (the HF / timm model called directly on hand-built
inputs, or a manual forward), so a wrong token selection, preprocessing order or key mapping fails.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import dataclasses
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reed.errors import CheckpointError
from reed.image.targets import encoders as enc_mod
from reed.image.targets.encoders import (
    CLIP_MEAN,
    CLIP_STD,
    ENCODER_SPECS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageEncoder,
    list_encoders,
    load_image_encoder,
)

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _save(model: nn.Module, directory) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    return str(directory)


def _images(b: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, size, size), generator=g, dtype=torch.uint8)


def _norm(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _bicubic(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)


def _assert_frozen_fp32(enc: ImageEncoder, tokens: torch.Tensor) -> None:
    assert tokens.dtype == torch.float32
    assert not any(p.requires_grad for p in enc.parameters())
    assert not enc.model.training


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(image_size=56, patch_size=14, **TINY))
    return _save(model, tmp_path_factory.mktemp("dinov2"))


@pytest.fixture(scope="module")
def dinov2reg_dir(tmp_path_factory):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(1)
    model = Dinov2WithRegistersModel(
        Dinov2WithRegistersConfig(image_size=56, patch_size=14, num_register_tokens=4, **TINY)
    )
    return _save(model, tmp_path_factory.mktemp("dinov2reg"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A full CLIPModel checkpoint (vision + text towers), the layout of openai/clip-vit-large-patch14."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(2)
    config = CLIPConfig(
        vision_config=dict(image_size=56, patch_size=14, **TINY),
        text_config=dict(vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1, **TINY),
        projection_dim=16,
    )
    return _save(CLIPModel(config), tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def mae_dir(tmp_path_factory):
    from transformers import ViTMAEConfig, ViTMAEModel

    torch.manual_seed(3)
    # mask_ratio 0.75 as in the released checkpoints: the loader must switch masking off.
    model = ViTMAEModel(ViTMAEConfig(image_size=32, patch_size=8, mask_ratio=0.75, **TINY))
    return _save(model, tmp_path_factory.mktemp("mae"))


# ------------------------------------------------------------------------------------------------ registry


def test_registry_names_and_specs():
    names = list_encoders()
    expected = (
        [f"dinov2-vit-{c}" for c in "sblg"]
        + [f"dinov2reg-vit-{c}" for c in "sblg"]
        + ["clip-vit-L", "siglip-vit-b", "siglip-vit-l", "mae-vit-l", "jepa-vit-h"]
        + [f"mocov3-vit-{c}" for c in "sbl"]
    )
    assert sorted(names) == sorted(expected)
    assert ENCODER_SPECS["dinov2-vit-b"].hub_id == "facebook/dinov2-base"
    assert ENCODER_SPECS["dinov2-vit-b"].normalize_first and ENCODER_SPECS["dinov2-vit-b"].resize == 224
    assert not ENCODER_SPECS["clip-vit-L"].normalize_first and ENCODER_SPECS["clip-vit-L"].mean == CLIP_MEAN
    assert ENCODER_SPECS["mae-vit-l"].resize is None and ENCODER_SPECS["mocov3-vit-b"].resize is None
    assert ENCODER_SPECS["jepa-vit-h"].normalize_first and ENCODER_SPECS["jepa-vit-h"].resize == 224
    with pytest.raises(ValueError, match="unknown image encoder"):
        load_image_encoder("dinov3-vit-b")


# ------------------------------------------------------------------------------------------------ DINOv2


def test_dinov2_tokens_match_hf_patch_tokens(dinov2_dir):
    from transformers import Dinov2Model

    enc = load_image_encoder("dinov2-vit-s", path=dinov2_dir, resolution=64)
    ref = Dinov2Model.from_pretrained(dinov2_dir).eval()
    x = _images(2, 64)
    tokens = enc(x)
    assert tokens.shape == (2, 16, 32) and enc.dim == 32 and enc.num_tokens(64) == 16
    pixels = _bicubic(_norm(x.float() / 255, IMAGENET_MEAN, IMAGENET_STD), 56)  # 224·64/256 = 56: native grid
    with torch.no_grad():
        expected = ref(pixel_values=pixels).last_hidden_state[:, 1:]  # after the final LayerNorm, CLS dropped
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
    _assert_frozen_fp32(enc, tokens)


def test_dinov2_other_grid_uses_reference_antialiased_pos_resampling(dinov2_dir):
    from timm.layers import resample_abs_pos_embed
    from transformers import Dinov2Model

    enc = load_image_encoder("dinov2-vit-s", path=dinov2_dir, resolution=128)
    x = _images(1, 128, seed=3)
    tokens = enc(x)
    assert tokens.shape == (1, 64, 32) and enc.num_tokens(128) == 64  # resize 112 → 8×8
    ref = Dinov2Model.from_pretrained(dinov2_dir).eval()
    pos = ref.embeddings.position_embeddings
    pos.data = resample_abs_pos_embed(pos.data, [8, 8], num_prefix_tokens=1)  # what the reference does at load
    pixels = _bicubic(_norm(x.float() / 255, IMAGENET_MEAN, IMAGENET_STD), 112)
    with torch.no_grad():
        expected = ref(pixel_values=pixels).last_hidden_state[:, 1:]
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)


def test_dinov2_resize_scales_with_resolution(dinov2_dir):
    enc = load_image_encoder("dinov2-vit-b", path=dinov2_dir, resolution=256)
    assert enc.input_size(256) == (224, 224) and enc.input_size(512) == (448, 448)
    assert enc.num_tokens(256) == 256 and enc.num_tokens(512) == 1024  # REPA's 512 px path: 32×32
    assert enc.preprocess(_images(1, 256)).shape == (1, 3, 224, 224)
    assert enc(_images(1, 512)).shape == (1, 1024, 32)


def test_dinov2_registers_are_dropped(dinov2reg_dir):
    from transformers import Dinov2WithRegistersModel

    enc = load_image_encoder("dinov2reg-vit-b", path=dinov2reg_dir, resolution=64)
    ref = Dinov2WithRegistersModel.from_pretrained(dinov2reg_dir).eval()
    x = _images(2, 64, seed=1)
    tokens = enc(x)
    pixels = _bicubic(_norm(x.float() / 255, IMAGENET_MEAN, IMAGENET_STD), 56)
    with torch.no_grad():
        out = ref(pixel_values=pixels).last_hidden_state
    assert out.shape[1] == 1 + 4 + 16
    assert tokens.shape == (2, 16, 32)
    torch.testing.assert_close(tokens, out[:, 1 + 4 :], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ preprocessing


def _two_colour_image() -> torch.Tensor:
    """(1, 3, 64, 64) uint8: left half pure red, right half (0, 128, 255)."""
    x = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    x[:, 0, :, :32] = 255
    x[:, 1, :, 32:] = 128
    x[:, 2, :, 32:] = 255
    return x


def test_preprocessing_order_and_values(dinov2_dir, clip_dir):
    x = _two_colour_image()
    xf = x.float() / 255
    left, right = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 128 / 255, 1.0])

    dino = load_image_encoder("dinov2-vit-s", path=dinov2_dir, resolution=64)
    pd = dino.preprocess(x)
    assert pd.shape == (1, 3, 56, 56) and pd.dtype == torch.float32
    assert torch.equal(pd, _bicubic(_norm(xf, IMAGENET_MEAN, IMAGENET_STD), 56))  # normalise, then resize
    m, s = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(pd[0, :, 0, 0], (left - m) / s, rtol=0, atol=1e-5)
    torch.testing.assert_close(pd[0, :, -1, -1], (right - m) / s, rtol=0, atol=1e-5)

    clip = load_image_encoder("clip-vit-L", path=clip_dir, resolution=64)
    pc = clip.preprocess(x)
    assert torch.equal(pc, _norm(_bicubic(xf, 56), CLIP_MEAN, CLIP_STD))  # resize, then normalise
    m, s = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    torch.testing.assert_close(pc[0, :, 0, 0], (left - m) / s, rtol=0, atol=1e-5)
    torch.testing.assert_close(pc[0, :, -1, -1], (right - m) / s, rtol=0, atol=1e-5)

    # float 0..255 input is accepted and equals the uint8 path
    assert torch.equal(dino.preprocess(x.float()), pd)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        dino.preprocess(x[:, :1])


# ------------------------------------------------------------------------------------------------ CLIP / SigLIP / JEPA


def test_clip_tokens_are_pre_post_layernorm_without_cls(clip_dir):
    from transformers import CLIPVisionModel

    enc = load_image_encoder("clip-vit-L", path=clip_dir, resolution=64)
    ref = CLIPVisionModel.from_pretrained(clip_dir).eval()
    x = _images(2, 64, seed=2)
    tokens = enc(x)
    assert tokens.shape == (2, 16, 32) and enc.num_tokens(64) == 16
    pixels = _norm(_bicubic(x.float() / 255, 56), CLIP_MEAN, CLIP_STD)
    with torch.no_grad():
        out = ref(pixel_values=pixels, output_hidden_states=True)
        last_block = out.hidden_states[-1]  # transformer output, before post_layernorm
        post_ln = ref.post_layernorm(last_block)
    torch.testing.assert_close(tokens, last_block[:, 1:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tokens, post_ln[:, 1:], atol=1e-3)
    _assert_frozen_fp32(enc, tokens)


def test_siglip_and_jepa_keep_all_tokens(tmp_path):
    from transformers import IJepaConfig, IJepaModel, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(4)
    sig_dir = _save(SiglipVisionModel(SiglipVisionConfig(image_size=32, patch_size=16, **TINY)), tmp_path / "sig")
    jepa_dir = _save(IJepaModel(IJepaConfig(image_size=28, patch_size=14, **TINY)), tmp_path / "jepa")
    x = _images(2, 32, seed=5)

    sig = load_image_encoder("siglip-vit-b", path=sig_dir, resolution=32)
    ref = SiglipVisionModel.from_pretrained(sig_dir).eval()
    with torch.no_grad():
        expected = ref(pixel_values=_norm(x.float() / 255, (0.5,) * 3, (0.5,) * 3)).last_hidden_state
    tokens = sig(x)
    assert tokens.shape == (2, 4, 32) and sig.num_tokens(32) == 4
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)

    jepa = load_image_encoder("jepa-vit-h", path=jepa_dir, resolution=32)
    ref = IJepaModel.from_pretrained(jepa_dir).eval()
    with torch.no_grad():
        pixels = _bicubic(_norm(x.float() / 255, IMAGENET_MEAN, IMAGENET_STD), 28)
        expected = ref(pixel_values=pixels).last_hidden_state  # after the final norm; no CLS
    tokens = jepa(x)
    assert tokens.shape == (2, 4, 32) and jepa.num_tokens(32) == 4
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
    _assert_frozen_fp32(jepa, tokens)


# ------------------------------------------------------------------------------------------------ MAE


def _mae_manual(model, pixels: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Unmasked, unshuffled ViT forward of an HF ViTMAEModel, *without* the final layernorm; CLS dropped."""
    emb = model.embeddings
    h = emb.patch_embeddings.projection(pixels).flatten(2).transpose(1, 2) + pos[:, 1:]
    cls = (emb.cls_token + pos[:, :1]).expand(h.shape[0], -1, -1)
    h = torch.cat([cls, h], dim=1)
    layers = model.layers if hasattr(model, "layers") else model.encoder.layer
    for layer in layers:
        out = layer(h)
        h = out[0] if isinstance(out, tuple) else out
    return h[:, 1:]


def test_mae_tokens_unmasked_in_order_without_final_norm(mae_dir):
    from timm.layers import resample_abs_pos_embed
    from transformers import ViTMAEModel

    enc = load_image_encoder("mae-vit-l", path=mae_dir, resolution=32)
    ref = ViTMAEModel.from_pretrained(mae_dir).eval()
    x = _images(2, 32, seed=6)
    tokens = enc(x)
    assert tokens.shape == (2, 16, 32) and enc.num_tokens(32) == 16
    pixels = _norm(x.float() / 255, IMAGENET_MEAN, IMAGENET_STD)  # no resize
    with torch.no_grad():
        expected = _mae_manual(ref, pixels, ref.embeddings.position_embeddings)
        normed = ref.layernorm(torch.cat([expected[:, :1], expected], dim=1))[:, 1:]
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tokens, normed, atol=1e-3)
    torch.testing.assert_close(enc(x), tokens, rtol=0, atol=0)  # deterministic: no random shuffling

    # another grid: the pos table is resampled like the reference (timm, antialiased bicubic)
    x48 = _images(1, 48, seed=7)
    with torch.no_grad():
        pos = resample_abs_pos_embed(ref.embeddings.position_embeddings, [6, 6], num_prefix_tokens=1)
        expected = _mae_manual(ref, _norm(x48.float() / 255, IMAGENET_MEAN, IMAGENET_STD), pos)
    torch.testing.assert_close(enc(x48), expected, rtol=1e-5, atol=1e-5)
    _assert_frozen_fp32(enc, tokens)


# ------------------------------------------------------------------------------------------------ generic hf:


def test_hf_generic_uses_processor_stats_and_drops_prefix(dinov2reg_dir, clip_dir, tmp_path):
    import shutil

    from transformers import Dinov2WithRegistersModel, ViTImageProcessor

    d = tmp_path / "hfreg"
    shutil.copytree(dinov2reg_dir, d)
    mean, std = (0.1, 0.2, 0.3), (0.7, 0.6, 0.5)
    ViTImageProcessor(size={"height": 56, "width": 56}, image_mean=list(mean), image_std=list(std)).save_pretrained(d)
    enc = load_image_encoder(f"hf:{d}", resolution=64)
    assert enc.spec.family == "hf" and enc.spec.resize == 56 and not enc.spec.normalize_first
    torch.testing.assert_close(torch.tensor(enc.spec.mean), torch.tensor(mean))
    x = _images(2, 64, seed=8)
    ref = Dinov2WithRegistersModel.from_pretrained(d).eval()
    with torch.no_grad():
        out = ref(pixel_values=_norm(_bicubic(x.float() / 255, 56), mean, std)).last_hidden_state
    tokens = enc(x)
    torch.testing.assert_close(tokens, out[:, 5:], rtol=1e-5, atol=1e-5)  # CLS + 4 registers dropped
    assert enc.num_tokens(64) == 16

    clip = load_image_encoder("hf:some/id", path=clip_dir, resolution=56)  # a full CLIPModel: the vision tower
    assert clip.spec.mean == IMAGENET_MEAN and clip.spec.resize is None  # no processor saved → ImageNet, no resize
    assert clip(_images(1, 56)).shape == (1, 16, 32)


# ------------------------------------------------------------------------------------------------ timm


def test_timm_safetensors_drops_prefix_tokens(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(9)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True).eval()
    file = tmp_path / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(file))  # includes the 1000-class head

    enc = load_image_encoder("timm:vit_tiny_patch16_224", path=file, resolution=64)
    x = _images(2, 64, seed=10)
    tokens = enc(x)
    assert enc.dim == 192 and tokens.shape == (2, 16, 192) and enc.num_tokens(64) == 16
    cfg = ref.pretrained_cfg
    with torch.no_grad():
        expected = ref.forward_features(_norm(x.float() / 255, cfg["mean"], cfg["std"]))
    assert expected.shape[1] == 16 + ref.num_prefix_tokens
    torch.testing.assert_close(tokens, expected[:, ref.num_prefix_tokens :], rtol=1e-5, atol=1e-5)
    _assert_frozen_fp32(enc, tokens)


# ------------------------------------------------------------------------------------------------ MoCo v3


def _tiny_mocov3_reference(pos_grid: int = 16):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(11)
    model = VisionTransformer(
        img_size=256,
        patch_size=16,
        embed_dim=32,
        depth=15,  # blocks 13 and 14 exist, so the checkpoint's naming bug is exercised
        num_heads=2,
        mlp_ratio=4,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_classes=0,
        dynamic_img_size=True,
    ).eval()
    model.pos_embed.data = torch.randn(1, 1 + pos_grid * pos_grid, 32) * 0.1
    return model


def _rcg_checkpoint(model) -> dict:
    """A state dict in the RCG release layout: prefixed, norm13/fc13/norm14/fc14 bug, heads, momentum encoder."""
    sd = {}
    for k, v in model.state_dict().items():
        k = k.replace("blocks.13.norm1", "blocks.13.norm13").replace("blocks.13.mlp.fc1", "blocks.13.mlp.fc13")
        k = k.replace("blocks.14.norm2", "blocks.14.norm14").replace("blocks.14.mlp.fc2", "blocks.14.mlp.fc14")
        sd["module.base_encoder." + k] = v.clone()
        sd["module.momentum_encoder." + k] = v.clone() + 1
    sd["module.base_encoder.head.0.weight"] = torch.randn(8, 32)
    sd["module.predictor.0.weight"] = torch.randn(8, 8)
    return {"state_dict": sd, "epoch": 300}


@pytest.fixture
def tiny_mocov3_arch(monkeypatch):
    monkeypatch.setitem(enc_mod._MOCOV3_ARCH, "mocov3-vit-s", dict(embed_dim=32, depth=15, num_heads=2))


def test_mocov3_rcg_checkpoint_loads(tmp_path, tiny_mocov3_arch):
    from timm.layers import resample_abs_pos_embed

    ref = _tiny_mocov3_reference()
    file = tmp_path / "mocov3_vits.pth"
    torch.save(_rcg_checkpoint(ref), file)
    enc = load_image_encoder("mocov3-vit-s", path=file, resolution=256)
    x = _images(2, 256, seed=12)
    tokens = enc(x)
    assert tokens.shape == (2, 256, 32) and enc.num_tokens(256) == 256 and enc.dim == 32
    with torch.no_grad():
        expected = ref.forward_features(_norm(x.float() / 255, IMAGENET_MEAN, IMAGENET_STD))[:, 1:]  # final norm in
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
    _assert_frozen_fp32(enc, tokens)

    # a 224-px checkpoint (14×14 pos table) is resampled to 16×16 like the reference
    ref14 = _tiny_mocov3_reference(pos_grid=14)
    file14 = tmp_path / "mocov3_224.pth"
    torch.save(_rcg_checkpoint(ref14), file14)
    enc14 = load_image_encoder("mocov3-vit-s", path=file14)
    expected_pos = resample_abs_pos_embed(ref14.pos_embed.data, [16, 16], num_prefix_tokens=1)
    torch.testing.assert_close(enc14.model.pos_embed.data, expected_pos)


def test_mocov3_bad_keys_name_the_file(tmp_path, tiny_mocov3_arch):
    ckpt = _rcg_checkpoint(_tiny_mocov3_reference())
    del ckpt["state_dict"]["module.base_encoder.blocks.0.attn.qkv.weight"]
    ckpt["state_dict"]["module.base_encoder.blocks.0.extra.weight"] = torch.zeros(1)
    file = tmp_path / "broken_mocov3.pth"
    torch.save(ckpt, file)
    with pytest.raises(CheckpointError, match="broken_mocov3.pth") as info:
        load_image_encoder("mocov3-vit-s", path=file)
    assert "blocks.0.attn.qkv.weight" in str(info.value) and "blocks.0.extra.weight" in str(info.value)
    assert isinstance(info.value, ValueError)


# ------------------------------------------------------------------------------------------------ errors


def test_missing_weights_give_clear_errors(tmp_path, monkeypatch, mae_dir):
    with pytest.raises(FileNotFoundError) as info:
        load_image_encoder("dinov2-vit-b", path=tmp_path / "nowhere")
    msg = str(info.value)
    assert "dinov2-vit-b" in msg and "nowhere" in msg and "huggingface-cli download facebook/dinov2-base" in msg

    spec = dataclasses.replace(ENCODER_SPECS["clip-vit-L"], hub_id="reed-tests/not-in-any-cache")
    monkeypatch.setitem(ENCODER_SPECS, "clip-vit-L", spec)
    with pytest.raises(FileNotFoundError, match="clip-vit-L.*reed-tests/not-in-any-cache"):
        load_image_encoder("clip-vit-L")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="mae-vit-l"):
        load_image_encoder("mae-vit-l", path=empty)
    with pytest.raises(CheckpointError, match="dinov2-vit-s.*missing weights"):  # never a silent random init
        load_image_encoder("dinov2-vit-s", path=mae_dir)
    with pytest.raises(FileNotFoundError, match="mocov3-vit-b.*mocov3_vitb.pth"):
        load_image_encoder("mocov3-vit-b")
    with pytest.raises(FileNotFoundError, match="mocov3-vit-b"):
        load_image_encoder("mocov3-vit-b", path=tmp_path / "mocov3_vitb.pth")


# ------------------------------------------------------------------------------------------------ fingerprint / dtype


def test_fingerprint_is_stable_and_tracks_weights(dinov2_dir, tmp_path):
    from transformers import Dinov2Model

    a = load_image_encoder("dinov2-vit-s", path=dinov2_dir, resolution=64)
    b = load_image_encoder("dinov2-vit-s", path=dinov2_dir, resolution=128, dtype=torch.bfloat16)
    assert a.fingerprint == b.fingerprint and a.fingerprint.startswith("dinov2-vit-s:")
    assert len(a.fingerprint.split(":", 1)[1]) == 64

    model = Dinov2Model.from_pretrained(dinov2_dir)
    with torch.no_grad():
        model.encoder.layer[0].mlp.fc1.weight[0, 0] += 1e-3
    changed = _save(model, tmp_path / "changed")
    c = load_image_encoder("dinov2-vit-s", path=changed, resolution=64)
    assert c.fingerprint != a.fingerprint


def test_bf16_runs_and_returns_float32_and_stays_frozen(dinov2_dir):
    enc = load_image_encoder("dinov2-vit-s", path=dinov2_dir, resolution=64, dtype=torch.bfloat16)
    assert enc.dtype == torch.bfloat16
    enc.train()
    assert not enc.model.training and not enc.training
    tokens = enc(_images(2, 64))
    assert tokens.dtype == torch.float32 and tokens.shape == (2, 16, 32)
    ref = load_image_encoder("dinov2-vit-s", path=dinov2_dir, resolution=64)(_images(2, 64))
    torch.testing.assert_close(tokens, ref, rtol=0.1, atol=0.1)
    x = _images(1, 64).float().requires_grad_(True)
    assert not enc(x).requires_grad


def test_attention_logits_are_hf_attention_renormalised_over_patches(dinov2_dir):
    """HASTE's teacher maps: softmax of our logits over patch keys = HF's eager attention with the CLS row and
    column dropped and each row renormalised."""
    from transformers import Dinov2Model

    enc = load_image_encoder("dinov2-vit-s", path=dinov2_dir, resolution=64)
    x = _images(2, 64)
    logits = enc.attention_logits(x, [1, 2])
    assert logits.shape == (2, 2, 2, 16, 16) and logits.dtype == torch.float32  # (B, layers, heads, T, T)
    ref = Dinov2Model.from_pretrained(dinov2_dir, attn_implementation="eager").eval()
    pixels = _bicubic(_norm(x.float() / 255, IMAGENET_MEAN, IMAGENET_STD), 56)
    with torch.no_grad():
        att = ref(pixel_values=pixels, output_attentions=True).attentions  # per layer (B, heads, 17, 17)
    for i in range(2):
        patch = att[i][:, :, 1:, 1:]
        torch.testing.assert_close(logits[:, i].softmax(-1), patch / patch.sum(-1, keepdim=True), rtol=1e-4,
                                   atol=1e-5)
    with pytest.raises(ValueError, match=r"block\(s\) \[3\]"):
        enc.attention_logits(x, [3])
