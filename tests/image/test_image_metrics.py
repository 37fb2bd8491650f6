"""Image metrics (reed.image.metrics.adm / .inception): formulas on closed-form cases, the Inception port's
loading path and output layout with random weights, reference-statistics caching, ADM reference batches, FD_DINOv2
with a tiny random DINOv2, and the JSON result of ``evaluate``. CPU only, no downloads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reed.errors import CheckpointError, ConfigError, DataError
from reed.image.metrics import adm as im
from reed.image.metrics.frechet import frechet_distance
from reed.image.metrics.inception import (
    INCEPTION_ENV,
    INCEPTION_FILENAMES,
    INCEPTION_SHA256,
    FIDInceptionV3,
    InceptionWeightsNotFoundError,
    load_inception,
    resize_bilinear_tf1,
)

# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny networks on a shared CPU: one intra-op thread (see conftest)."""


def _random_inception_state(num_classes: int = 1008, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the published file's layout (no ``num_batches_tracked``, like an old-torch export)."""
    torch.manual_seed(seed)
    net = FIDInceptionV3(num_classes=num_classes)
    with torch.no_grad():
        net.fc.bias.normal_()  # a non-zero bias, so "logits carry no bias" is checkable
    return {k: v.clone() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILENAMES[0]
    torch.save(_random_inception_state(), path)
    return path


@pytest.fixture(scope="module")
def inception(inception_file):
    return load_inception(inception_file)


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64)
    d = tmp_path_factory.mktemp("dinov2")
    Dinov2Model(cfg).save_pretrained(str(d))
    return d


def _images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _spd(d: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(d, d))
    return a @ a.T / d + np.eye(d)


# ------------------------------------------------------------------------------------------------ Fréchet distance


def test_frechet_closed_form_diagonal():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    # fid / sfid read ADM-layout statistics dicts
    assert im.fid({"mu": mu1, "sigma": np.diag(a)}, {"mu": mu2, "sigma": np.diag(b)}) == pytest.approx(expected)
    assert im.sfid({"mu_s": mu1, "sigma_s": np.diag(a)}, {"mu_s": mu2, "sigma_s": np.diag(b)}) == pytest.approx(
        expected)
    assert im.fid({"mu": mu1, "sigma": np.diag(a)}, {"mu": mu1, "sigma": np.diag(a)}) == pytest.approx(0, abs=1e-9)


def test_frechet_of_sampled_gaussians_converges_to_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 0.0, -1.0])
    a, b = np.array([1.0, 2.0, 0.5]), np.array([0.25, 2.0, 1.5])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    errors = []
    for n in (1_000, 100_000):
        x = mu1 + rng.normal(size=(n, 3)) * np.sqrt(a)
        y = mu2 + rng.normal(size=(n, 3)) * np.sqrt(b)
        errors.append(abs(im.fid(x, y) - expected))  # feature matrices → fitted Gaussians
    assert errors[1] < 0.02
    assert errors[1] < errors[0] + 1e-3


# ------------------------------------------------------------------------------------------------ Inception Score


def test_inception_score_uniform_predictions_is_one():
    assert im.inception_score(np.zeros((100, 1008))) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("splits", [1, 10])
def test_inception_score_confident_even_classes_is_k(splits):
    k = 7
    labels = np.tile(np.arange(k), 30)  # every contiguous chunk of 21 holds each class 3 times
    logits = np.zeros((len(labels), 1008))
    logits[np.arange(len(labels)), labels * 100] = 80.0
    assert im.inception_score(logits, splits=splits) == pytest.approx(k, rel=1e-9)


def test_inception_score_rejects_too_few_rows():
    with pytest.raises(DataError):
        im.inception_score(np.zeros((5, 10)), splits=10)


# ------------------------------------------------------------------------------------------------ precision / recall


def test_precision_recall_identical_clouds():
    x = np.random.default_rng(0).normal(size=(400, 8))
    assert im.precision_recall(x, x.copy(), k=3) == (1.0, 1.0)


def test_precision_recall_disjoint_clouds():
    x = np.random.default_rng(0).normal(size=(400, 8))
    assert im.precision_recall(x, x + 1000.0, k=3) == (0.0, 0.0)


def test_precision_recall_half_support():
    rng = np.random.default_rng(0)
    real = rng.uniform(0, 1, (3000, 2))
    fake = rng.uniform(0, 1, (1500, 2)) * np.array([0.5, 1.0])  # covers the left half of the real support
    precision, recall = im.precision_recall(real, fake, k=3)
    assert precision > 0.95
    assert recall == pytest.approx(0.5, abs=0.05)
    # blocked distance computation gives the same answer
    assert im.precision_recall(real, fake, k=3, batch_size=37) == (precision, recall)


def test_precision_recall_bad_input():
    with pytest.raises(DataError):
        im.precision_recall(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(DataError):
        im.precision_recall(np.zeros((3, 3)), np.zeros((10, 3)), k=3)


# ------------------------------------------------------------------------------------------------ Inception network


def test_resize_bilinear_tf1_matches_hand_values():
    x = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]]]])
    # TF1 legacy: source = dst * in/out (no half-pixel offset), upper neighbour clamped at the edge
    expected = torch.tensor([[1, 2, 3, 3], [3, 4, 5, 5], [5, 6, 7, 7], [5, 6, 7, 7]], dtype=torch.float32)
    assert torch.equal(resize_bilinear_tf1(x, (4, 4))[0, 0], expected)
    y = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(resize_bilinear_tf1(y, (2, 2))[0, 0], torch.tensor([[0.0, 2.0], [8.0, 10.0]]))
    assert torch.equal(resize_bilinear_tf1(y, (4, 4)), y)


def test_inception_key_layout_matches_published_file():
    state = _random_inception_state()
    expected_shapes = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_1a_3x3.bn.running_var": (32,),
        "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6d.branch1x1.conv.weight": (192, 768, 1, 1),  # TF mixed_6/conv (sFID)
        "Mixed_6d.branch7x7_2.conv.weight": (160, 160, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert len(state) == 472  # 94 conv-bn units × 5 tensors + fc weight/bias
    assert not any("AuxLogits" in k or k.endswith(".conv.bias") for k in state)


def test_inception_loads_from_file_and_gives_adm_outputs(inception, inception_file, monkeypatch):
    assert inception.weights_path == str(inception_file.resolve())
    assert inception.file_sha256 != INCEPTION_SHA256 and not inception.official
    assert inception.fingerprint.startswith("fid-inception-v3:")
    assert not inception.training and not any(p.requires_grad for p in inception.parameters())
    captured = {}
    handle = inception.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.update(x=o))
    try:
        images = torch.from_numpy(_images(3, size=40)).permute(0, 3, 1, 2)
        out = inception(images)
    finally:
        handle.remove()
    assert out["pool"].shape == (3, 2048)
    assert out["spatial"].shape == (3, 2023)
    assert out["logits"].shape == (3, 1008)
    assert all(v.dtype == torch.float32 for v in out.values())
    # sFID features: the first 7 channels of Mixed_6d's 1x1 branch (17x17, after ReLU), flattened as TF's NHWC
    assert captured["x"].shape == (3, 192, 17, 17)
    assert torch.equal(out["spatial"], captured["x"][:, :7].permute(0, 2, 3, 1).reshape(3, -1))
    assert (out["spatial"] >= 0).all()
    # IS logits: pool_3 @ W without the bias, as ADM's softmax graph
    torch.testing.assert_close(out["logits"], out["pool"] @ inception.fc.weight.T)
    # the environment variable is the fallback path
    monkeypatch.setenv(INCEPTION_ENV, str(inception_file))
    assert load_inception().fingerprint == inception.fingerprint


def test_inception_with_1000_classes_and_bad_files(tmp_path):
    path = tmp_path / "inc1000.pth"
    torch.save({"state_dict": _random_inception_state(num_classes=1000, seed=1)}, path)  # wrapped state dict
    net = load_inception(path)
    assert net.num_classes == 1000
    assert net(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))["logits"].shape == (1, 1000)
    state = _random_inception_state()
    del state["Mixed_6d.branch1x1.conv.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="broken.pth"):
        load_inception(tmp_path / "broken.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_inception(tmp_path / "garbage.pth")


def test_missing_inception_weights_error_names_path(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "pt_inception.pth"
    with pytest.raises(InceptionWeightsNotFoundError) as err:
        load_inception(missing)
    assert isinstance(err.value, FileNotFoundError)
    assert str(missing) in str(err.value)
    assert INCEPTION_FILENAMES[0] in str(err.value) and INCEPTION_SHA256 in str(err.value)
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=INCEPTION_ENV):
        load_inception()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        im.evaluate(_images(4), _images(4), inception=missing, metrics=("is",), progress=False)


# ------------------------------------------------------------------------------------------------ image sources


def test_image_sources_read_the_same_images(tmp_path):
    from PIL import Image

    imgs = _images(5, size=16)
    np.savez(tmp_path / "s.npz", arr_0=imgs)
    np.savez_compressed(tmp_path / "c.npz", arr_0=imgs)
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(tmp_path / "dir" / ("sub" if i >= 3 else ".") / f"{i:02d}.png")
    for src in (imgs, tmp_path / "s.npz", tmp_path / "c.npz", tmp_path / "dir"):
        reader = im._ImageReader(src)
        assert len(reader) == 5
        got = np.concatenate([g for groups in reader.batches(2) for g in groups])
        np.testing.assert_array_equal(got, imgs)
    assert im.source_fingerprint(tmp_path / "s.npz") != im.source_fingerprint(tmp_path / "c.npz")
    assert im.source_fingerprint(imgs) == im.source_fingerprint(imgs.copy())
    # images of different sizes in one directory are grouped by size within a batch
    Image.fromarray(_images(1, size=24)[0]).save(tmp_path / "dir" / "zz.png")
    shapes = [g.shape for groups in im._ImageReader(tmp_path / "dir").batches(8) for g in groups]
    assert shapes == [(5, 16, 16, 3), (1, 24, 24, 3)]


def test_bad_image_sources(tmp_path):
    with pytest.raises(DataError, match="uint8"):
        im._ImageReader(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(DataError, match="N, H, W, 3"):
        im._ImageReader(np.zeros((2, 3, 8, 8), np.uint8))
    np.savez(tmp_path / "x.npz", images=_images(2))
    with pytest.raises(DataError, match="arr_0"):
        im._ImageReader(tmp_path / "x.npz")
    with pytest.raises(DataError, match="does not exist"):
        im._ImageReader(tmp_path / "missing.npz")


# ------------------------------------------------------------------------------------------------ reference statistics


class _Counter:
    """Wraps ``compute_features`` and counts the calls (and the images they process)."""

    def __init__(self, fn):
        self.fn, self.calls, self.outputs = fn, 0, []

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.outputs.append(tuple(kwargs.get("outputs", ())))
        return self.fn(*args, **kwargs)


def test_reference_statistics_are_cached(inception, tmp_path, monkeypatch):
    counter = _Counter(im.compute_features)
    monkeypatch.setattr(im, "compute_features", counter)
    ref = _images(4, seed=3)
    first = im.reference_statistics(ref, cache_dir=tmp_path, inception=inception, progress=False)
    assert counter.calls == 1 and first["from_cache"] is False
    assert first["mu"].shape == (2048,) and first["sigma"].shape == (2048, 2048)
    assert first["mu_s"].shape == (2023,) and first["sigma_s"].shape == (2023, 2023)
    assert first["pool"].shape == (4, 2048) and first["num_images"] == 4
    second = im.reference_statistics(ref.copy(), cache_dir=tmp_path, inception=inception, progress=False)
    assert counter.calls == 1 and second["from_cache"] is True  # keyed by content, not object identity
    for key in ("mu", "sigma", "mu_s", "sigma_s", "pool"):
        np.testing.assert_array_equal(first[key], second[key])
    assert second["source_fingerprint"] == first["source_fingerprint"]
    im.reference_statistics(_images(4, seed=4), cache_dir=tmp_path, inception=inception, progress=False)
    assert counter.calls == 2  # other images, other key
    im.reference_statistics(ref, cache_dir=None, inception=inception, progress=False)
    assert counter.calls == 3  # caching off


def test_adm_reference_batch_layout(inception, tmp_path, monkeypatch):
    counter = _Counter(im.compute_features)
    monkeypatch.setattr(im, "compute_features", counter)
    stats = {"mu": np.linspace(0, 1, 2048), "sigma": np.eye(2048) * 2.0,
             "mu_s": np.linspace(1, 0, 2023), "sigma_s": np.eye(2023) * 3.0}
    path = tmp_path / "VIRTUAL_ref.npz"
    np.savez(path, arr_0=_images(4, seed=5), **stats)
    ref = im.reference_statistics(path, cache_dir=tmp_path / "cache", inception=inception, progress=False)
    for key, value in stats.items():
        np.testing.assert_array_equal(ref[key], value)  # ADM's precomputed statistics are used as they are
    assert "npz statistics" in ref["stats_origin"]
    assert ref["pool"].shape == (4, 2048) and ref["num_images"] == 4
    assert counter.calls == 1 and counter.outputs == [("pool",)]  # only the P/R features come from arr_0
    again = im.reference_statistics(path, cache_dir=tmp_path / "cache", inception=inception, progress=False)
    assert counter.calls == 1 and again["from_cache"] is True
    np.testing.assert_array_equal(again["pool"], ref["pool"])
    # statistics without images: read, nothing computed, no pool features
    np.savez(tmp_path / "stats_only.npz", **stats)
    only = im.reference_statistics(tmp_path / "stats_only.npz", cache_dir=tmp_path / "cache", inception=inception,
                                   progress=False)
    assert only["pool"] is None and counter.calls == 1
    np.testing.assert_array_equal(only["sigma_s"], stats["sigma_s"])


# ------------------------------------------------------------------------------------------------ FD_DINOv2


def test_fd_dinov2_with_tiny_local_dinov2(dinov2_dir, tmp_path):
    from reed.image.targets.encoders import load_image_encoder

    enc = load_image_encoder("dinov2-vit-s", path=dinov2_dir)
    a, b = _images(12, size=32, seed=6), _images(12, size=32, seed=7)
    feats = im.dinov2_features(a, enc, batch_size=5, progress=False)
    assert feats.shape == (12, 32) and feats.dtype == np.float32
    # EDM2 / dgm-eval feature: antialiased bicubic to 224, /255, ImageNet normalise, CLS after the final norm
    x = F.interpolate(torch.from_numpy(a).permute(0, 3, 1, 2).float(), size=(224, 224), mode="bicubic",
                      antialias=True) / 255.0
    x = (x - torch.tensor(enc.spec.mean).view(1, 3, 1, 1)) / torch.tensor(enc.spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        cls = enc.model(pixel_values=x).last_hidden_state[:, 0]
    np.testing.assert_allclose(feats, cls.numpy(), rtol=1e-4, atol=1e-5)
    d_ab = im.fd_dinov2(a, b, enc, progress=False)
    assert np.isfinite(d_ab) and d_ab > 0
    assert im.fd_dinov2(a, a.copy(), enc, progress=False) == pytest.approx(0.0, abs=1e-6)
    assert im.fd_dinov2(feats, b, enc, progress=False) == pytest.approx(d_ab, rel=1e-5)  # precomputed features
    # an encoder without a CLS token in its output: mean of the patch tokens
    generic = load_image_encoder(f"hf:{dinov2_dir}")
    assert im._dinov2_pooling(generic) == "mean"
    with torch.no_grad():
        mean_tokens = generic(torch.from_numpy(a).permute(0, 3, 1, 2)).mean(1).numpy()
    np.testing.assert_allclose(im.dinov2_features(a, generic, progress=False), mean_tokens, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ evaluate


def test_evaluate_returns_json_with_settings(inception_file, dinov2_dir, tmp_path, monkeypatch):
    seen = []

    def spy(mu1, s1, mu2, s2, eps=1e-6):  # full 2048-d sqrtm is too slow for a unit test: record and stub it
        seen.append(len(np.atleast_1d(mu1)))
        return frechet_distance(mu1, s1, mu2, s2, eps) if len(np.atleast_1d(mu1)) <= 64 else 1.25

    monkeypatch.setattr(im, "frechet_distance", spy)
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=_images(8, seed=8))
    ref = tmp_path / "VIRTUAL_ref.npz"
    np.savez(ref, arr_0=_images(8, seed=9), mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2023),
             sigma_s=np.eye(2023))
    out = im.evaluate(samples, ref, inception=str(inception_file), dinov2=str(dinov2_dir),
                      dinov2_name="dinov2-vit-s", metrics="fid,sfid,is,pr", cache_dir=tmp_path / "cache",
                      batch_size=4, is_splits=2, progress=False, extra={"sampler": "sde", "steps": 250})
    text = json.dumps(out)  # JSON-serialisable as it is
    assert json.loads(text)["metrics"] == out["metrics"]
    m = out["metrics"]
    assert set(m) == {"fid", "sfid", "inception_score", "inception_score_std", "precision", "recall", "fd_dinov2"}
    assert m["fid"] == 1.25 and m["sfid"] == 1.25 and seen[:2] == [2048, 2023] and seen[2] == 32
    assert 0.0 <= m["precision"] <= 1.0 and 0.0 <= m["recall"] <= 1.0
    assert m["inception_score"] >= 1.0 - 1e-9 and np.isfinite(m["fd_dinov2"])
    s = out["settings"]
    assert s["metrics"] == ["fid", "sfid", "is", "pr", "fd_dinov2"]
    assert s["inception"]["weights"] == str(inception_file.resolve()) and s["inception"]["official_weights"] is False
    assert len(s["inception"]["sha256"]) == 64 and "ResizeBilinear" in s["inception"]["preprocessing"]
    assert s["precision_recall"]["k"] == 3 and s["inception_score"]["splits"] == 2
    assert s["fd_dinov2"]["pooling"] == "cls" and s["fd_dinov2"]["feature_dim"] == 32
    assert out["samples"]["num_images"] == 8 and out["samples"]["fingerprint"].startswith("sha256:")
    assert out["reference"]["pr_num_images"] == 8 and "npz statistics" in out["reference"]["stats_origin"]
    assert out["extra"] == {"sampler": "sde", "steps": 250}
    assert any("50,000" in w for w in out["warnings"])
    assert any("not the published FID weights" in w for w in out["warnings"])
    assert out["versions"]["torch"] == torch.__version__


def test_evaluate_rejects_bad_metric_requests(inception, tmp_path):
    with pytest.raises(ConfigError, match="unknown metric"):
        im.evaluate(_images(4), _images(4), inception=inception, metrics=("fid", "kid"), progress=False)
    with pytest.raises(ConfigError, match="DINOv2"):
        im.evaluate(_images(4), _images(4), inception=inception, metrics=("fd_dinov2",), progress=False)
    np.savez(tmp_path / "stats_only.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(DataError, match="reference images"):
        im.evaluate(_images(4), tmp_path / "stats_only.npz", inception=inception, metrics=("pr",), cache_dir=None,
                    progress=False)
