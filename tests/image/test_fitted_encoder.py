"""Tests of reed.image.targets.fitted_encoder: VICReg loss, augmentations, the CNN, fitting, save/load, probe."""

import json
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from safetensors.torch import save_file

from reed.image.digits import load_digits_arrays
from reed.image.targets.fitted_encoder import (
    ConvEncoder,
    augment,
    encode_images,
    encoder_fingerprint,
    fit_encoder,
    linear_probe_accuracy,
    load_encoder,
    save_encoder,
    vicreg_loss,
)


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits_arrays()
    return torch.from_numpy(x), torch.from_numpy(y)


def _seeded_encoder(seed: int = 0, **kw) -> ConvEncoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ConvEncoder(1, **kw).eval()


# --------------------------------------------------------------------------------------------- digits


def test_load_digits_arrays(digits):
    x, y = digits
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert x.min() == -1.0 and x.max() == 1.0
    assert set(y.tolist()) == set(range(10))


# --------------------------------------------------------------------------------------------- VICReg


def test_vicreg_identical_views_have_zero_invariance():
    z = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    loss, parts = vicreg_loss(z, z.clone())
    assert parts["invariance"] == 0.0
    expected = 25 * parts["variance"] + 1 * parts["covariance"]
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_vicreg_constant_embeddings_hit_the_variance_hinge():
    z = torch.full((16, 4), 3.0)
    loss, parts = vicreg_loss(z, z)
    # std = sqrt(0 + 1e-4) = 0.01 → hinge 1 - 0.01 = 0.99 for every feature; no covariance.
    assert parts["variance"] == pytest.approx(0.99, abs=1e-6)
    assert parts["covariance"] == pytest.approx(0.0, abs=1e-12)
    assert loss.item() == pytest.approx(25 * 0.99, abs=1e-5)
    loss_w, _ = vicreg_loss(z, z, var=2.0)
    assert loss_w.item() == pytest.approx(2 * 0.99, abs=1e-6)


def test_vicreg_hand_computed_terms():
    a = torch.tensor([2.0, -2.0, 2.0, -2.0])
    small = torch.tensor([0.5, -0.5, 0.5, -0.5])
    z1 = torch.stack([a, a], dim=1)  # two identical, perfectly correlated features, std > 1
    z2 = z1 + 1.0  # same covariance, invariance = mean(1^2) = 1
    _, parts = vicreg_loss(z1, z2)
    var_a = 16.0 / 3.0  # unbiased: sum(4 * 4) / (4 - 1)
    assert parts["invariance"] == pytest.approx(1.0)
    assert parts["variance"] == pytest.approx(0.0)
    # per branch: off-diagonal entries (var_a, var_a) squared, summed, / D=2 → var_a^2; two branches.
    assert parts["covariance"] == pytest.approx(2 * var_a**2, rel=1e-6)

    z3 = torch.stack([a, small], dim=1)
    loss, parts = vicreg_loss(z3, z3, sim=0.0, var=1.0, cov=0.0)
    hinge_small = 1.0 - math.sqrt(1.0 / 3.0 + 1e-4)  # var(small) = 4 * 0.25 / 3
    assert parts["variance"] == pytest.approx(hinge_small / 2, rel=1e-6)  # mean over the 2 features
    assert loss.item() == pytest.approx(hinge_small / 2, rel=1e-6)


def test_vicreg_rejects_bad_shapes():
    with pytest.raises(ValueError, match="equal shape"):
        vicreg_loss(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="at least 2"):
        vicreg_loss(torch.zeros(1, 3), torch.zeros(1, 3))


# --------------------------------------------------------------------------------------------- augment


def test_augment_deterministic_per_seed_and_shape_preserving(digits):
    x = digits[0][:64]
    a = augment(x, torch.Generator().manual_seed(3))
    b = augment(x, torch.Generator().manual_seed(3))
    c = augment(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, x)


def test_augment_identity_when_all_ranges_are_zero(digits):
    x = digits[0][:16]
    g = torch.Generator().manual_seed(0)
    y = augment(x, g, max_shift=0, max_rotation_deg=0.0, scale_range=(1.0, 1.0), noise_std=0.0)
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


def test_augment_fills_background_not_zero():
    # A blank (-1) image must stay blank under shift/rotation/zoom: padding is the background value.
    x = -torch.ones(8, 1, 8, 8)
    y = augment(x, torch.Generator().manual_seed(0), noise_std=0.0)
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


def test_augment_shift_only_is_a_one_pixel_translation(digits):
    x = digits[0][:32]
    y = augment(x, torch.Generator().manual_seed(1), max_rotation_deg=0.0, scale_range=(1.0, 1.0), noise_std=0.0)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), value=-1.0)
    for i in range(x.shape[0]):
        crops = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(3) for dx in range(3)]
        assert any(torch.allclose(y[i], c, atol=1e-5) for c in crops), f"example {i} is not a 1-px shift"


# --------------------------------------------------------------------------------------------- model


def test_conv_encoder_shapes():
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    enc = _seeded_encoder(dim=32, width=16)
    tok = enc.tokens(x)
    assert tok.shape == (5, 16, 32)  # 4×4 grid
    torch.testing.assert_close(enc.pooled(x), tok.mean(1))
    torch.testing.assert_close(enc(x), enc.pooled(x))
    # row-major flattening of the feature map
    fmap = enc.feature_map(x)
    torch.testing.assert_close(tok[:, 1 * 4 + 2], fmap[:, :, 1, 2])
    assert _seeded_encoder(dim=8, width=8, downsample=0).tokens(x).shape == (5, 64, 8)
    assert _seeded_encoder(dim=8, width=8, downsample=2).tokens(x).shape == (5, 4, 8)
    assert enc.config == {"in_channels": 1, "dim": 32, "width": 16, "downsample": 1}
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        enc.tokens(torch.zeros(2, 3, 8, 8))


def test_fit_encoder_learns_something(digits):
    x, y = digits
    enc, losses = fit_encoder(x, dim=32, width=32, steps=120, batch_size=128, seed=0, progress=False)
    assert len(losses) == 120
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 1.0, (first, last)

    fitted = linear_probe_accuracy(encode_images(enc, x), y)
    random = linear_probe_accuracy(encode_images(_seeded_encoder(0, dim=32, width=32), x), y)
    assert fitted > random + 0.03, (fitted, random)
    assert fitted > 0.93, fitted

    # same seed → same encoder
    enc2, losses2 = fit_encoder(x[:300], dim=8, width=8, steps=3, batch_size=64, seed=5, progress=False)
    enc3, losses3 = fit_encoder(x[:300], dim=8, width=8, steps=3, batch_size=64, seed=5, progress=False)
    assert losses2 == losses3 and encoder_fingerprint(enc2) == encoder_fingerprint(enc3)


def test_linear_probe_accuracy_sanity():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 4
    separable = torch.nn.functional.one_hot(y, 4).float() * 5 + 0.1 * torch.randn(200, 4, generator=g)
    noise = torch.randn(200, 4, generator=g)
    assert linear_probe_accuracy(separable, y) == 1.0
    assert linear_probe_accuracy(noise, y) < 0.6


# --------------------------------------------------------------------------------------------- save/load


def test_save_load_round_trip(tmp_path):
    enc = _seeded_encoder(1, dim=16, width=16)
    out = save_encoder(enc, tmp_path / "enc")
    assert sorted(p.name for p in out.iterdir()) == ["encoder.json", "encoder.safetensors"]  # no temp files
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["kind"] == "reed.conv_encoder"
    assert meta["config"] == enc.config
    assert meta["fingerprint"] == encoder_fingerprint(enc)

    loaded = load_encoder(out)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    assert torch.equal(loaded.tokens(x), enc.tokens(x))
    assert encoder_fingerprint(loaded) == encoder_fingerprint(enc)
    assert encoder_fingerprint(_seeded_encoder(2, dim=16, width=16)) != encoder_fingerprint(enc)


def test_load_missing_directory_and_files(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_encoder(missing)
    d = save_encoder(_seeded_encoder(dim=8, width=8), tmp_path / "enc")
    (d / "encoder.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="encoder.safetensors"):
        load_encoder(d)
    d = save_encoder(_seeded_encoder(dim=8, width=8), tmp_path / "enc2")
    (d / "encoder.json").unlink()
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        load_encoder(d)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_load_corrupt_weights_names_the_file(tmp_path, damage):
    d = save_encoder(_seeded_encoder(dim=8, width=8), tmp_path / "enc")
    w = d / "encoder.safetensors"
    data = w.read_bytes()
    w.write_bytes(b"not a safetensors file at all" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ValueError, match="encoder.safetensors"):
        load_encoder(d)


def test_load_corrupt_json_and_mismatched_config(tmp_path):
    d = save_encoder(_seeded_encoder(dim=8, width=8), tmp_path / "enc")
    cfg = d / "encoder.json"
    good = cfg.read_text()
    cfg.write_text("{ not json")
    with pytest.raises(ValueError, match="encoder.json"):
        load_encoder(d)

    meta = json.loads(good)
    meta["config"]["dim"] = 16  # weights were saved with dim 8
    cfg.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="encoder.safetensors.*do not match"):
        load_encoder(d)


def test_load_detects_weights_not_matching_fingerprint(tmp_path):
    d = save_encoder(_seeded_encoder(0, dim=8, width=8), tmp_path / "enc")
    other = {k: v.contiguous() for k, v in _seeded_encoder(1, dim=8, width=8).state_dict().items()}
    save_file(other, str(d / "encoder.safetensors"))  # same shapes, different values
    with pytest.raises(ValueError, match="fingerprint"):
        load_encoder(d)
