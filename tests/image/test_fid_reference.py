"""reed's FID Inception port against the two reference PyTorch implementations, without the real weights.

One random weights file is built here in the layout torch-fidelity's converter writes (a flat dict of
``<module>.conv.weight`` / ``<module>.bn.{weight,bias,running_mean,running_var}`` / ``fc.{weight,bias}``, no
``num_batches_tracked``; the key set is torchvision's ``Inception3`` without ``AuxLogits``, which is what
pytorch-fid loads). All three networks load that file, so any change to reed's port (layer order, pooling quirks,
the TF1 resize, the sFID layer, the logits) that moves a single bit shows up here.

* torch-fidelity ``FeatureExtractorInceptionV3``: the 2048-d pool, the bias-free 1008 logits, the sFID
  ``Mixed_6d.branch1x1`` map and the TF1 resize are bit-identical; FID from the same images agrees to 1e-8 relative
  (to 1e-6 through torch-fidelity's own statistics, which average the features in float32).
* pytorch-fid ``InceptionV3``: bit-identical on the same preprocessed input; its user path differs from reed's only
  by its preprocessing (half-pixel ``F.interpolate`` of ``x/255``, then ``2x - 1``). Its Fréchet distance agrees to
  1e-8 relative (checked on 256 of the pool dimensions, to keep it cheap).

Nothing is downloaded: torch-fidelity gets the local path, pytorch-fid's URL loader is replaced. CPU only, one thread.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from pytorch_fid import inception as pfid_inception
from pytorch_fid.fid_score import calculate_frechet_distance
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

from reed.image.metrics import adm as im
from reed.image.metrics.inception import INCEPTION_FILENAMES, load_inception, resize_bilinear_tf1

#: Images per set for the FID comparison (each set costs one Inception forward per image and per implementation).
N = 16
#: Side of the test images (upsampled to 299 by the TF1 resize; the cost does not depend on it).
SIZE = 32

pytestmark = [
    pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning"),  # N < 2048: singular covariances
    pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning"),  # pytorch-fid's sqrtm
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny networks on a shared CPU: one intra-op thread (see conftest)."""


def _converter_layout_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random Inception-v3 weights, keyed and shaped as the converted TF 2015-12-05 file.

    The keys come from torchvision (not from reed). Values keep activations O(1) through the 94 conv-BN-ReLU units
    (He-normal convolutions, batch-norm statistics near identity), so pool features and FID are not degenerate; the
    ``fc`` bias is non-zero so "logits without the bias" is checked.
    """
    g = torch.Generator().manual_seed(seed)
    layout = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, init_weights=False, weights=None)
    state = {}
    for key, ref in layout.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue  # the converter writes none (torch fills them in on load)
        if key.endswith("conv.weight"):
            t = torch.randn(ref.shape, generator=g) * (2.0 / ref[0].numel()) ** 0.5
        elif key.endswith(("bn.weight", "bn.running_var")):
            t = 0.8 + 0.4 * torch.rand(ref.shape, generator=g)
        elif key.endswith(("bn.bias", "bn.running_mean")) or key == "fc.bias":
            t = 0.1 * torch.randn(ref.shape, generator=g)
        elif key == "fc.weight":
            t = torch.randn(ref.shape, generator=g) / ref.shape[1] ** 0.5
        else:
            raise AssertionError(f"unexpected key in the Inception layout: {key}")
        state[key] = t.contiguous()
    return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    state = _converter_layout_state()
    path = tmp_path_factory.mktemp("fid_reference") / INCEPTION_FILENAMES[1]  # torch-fidelity's file name
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def images() -> dict[str, np.ndarray]:
    """Two sets of N uint8 (N, SIZE, SIZE, 3) images from different distributions (uniform noise vs a shared
    pattern plus half-strength noise), so their FID is far from 0."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (N, SIZE, SIZE, 3), dtype=np.uint8)
    pattern = rng.integers(0, 256, (1, SIZE, SIZE, 3))
    b = np.clip(0.5 * pattern + 0.5 * rng.integers(0, 256, (N, SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    return {"a": a, "b": b}


@pytest.fixture(scope="module")
def reed_net(weights):
    return load_inception(weights[0])


@pytest.fixture(scope="module")
def reed_features(reed_net, images) -> dict[str, dict[str, np.ndarray]]:
    """reed's user path: :func:`compute_features` on the uint8 NHWC arrays (pool, spatial, logits)."""
    return {k: im.compute_features(x, inception=reed_net, batch_size=N, device="cpu", progress=False)
            for k, x in images.items()}


@pytest.fixture(scope="module")
def fidelity_features(weights, images) -> dict[str, dict[str, torch.Tensor]]:
    """torch-fidelity's extractor (local weights path) on the same uint8 images: "2048", "logits_unbiased", and the
    ``Mixed_6d.branch1x1`` map (B, 192, 17, 17) from a forward hook."""
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                      feature_extractor_weights_path=str(weights[0]))
    captured: list[torch.Tensor] = []
    handle = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.append(o.clone()))
    out = {}
    try:
        for k, x in images.items():
            pool, logits = net(torch.from_numpy(x).permute(0, 3, 1, 2))
            out[k] = {"pool": pool, "logits": logits, "mixed_6_conv": captured.pop()}
    finally:
        handle.remove()
    return out


@pytest.fixture(scope="module")
def pytorch_fid_net(weights):
    """pytorch-fid's ``InceptionV3`` (pool_3 output), its URL loader replaced by the random state dict."""
    state = weights[1]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pfid_inception, "load_state_dict_from_url", lambda *a, **k: {n: t.clone() for n, t in state.items()})
        net = pfid_inception.InceptionV3([pfid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    return net.eval()


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# --------------------------------------------------------------------------------------------------- torch-fidelity


@pytest.mark.parametrize("size", [(32, 32), (17, 40), (64, 64), (256, 256), (300, 311)])
def test_tf1_resize_is_bit_identical_to_torch_fidelity(size):
    x = torch.from_numpy(np.random.default_rng(size[0]).integers(0, 256, (2, 3, *size))).float()
    ours = resize_bilinear_tf1(x, (299, 299))
    ref = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False, method="slow")
    assert torch.equal(ours, ref)


def test_network_outputs_are_bit_identical_to_torch_fidelity(reed_features, fidelity_features):
    for k in ("a", "b"):
        ours, ref = reed_features[k], fidelity_features[k]
        assert ours["pool"].std() > 0.05 and ours["pool"].shape == (N, 2048)  # O(1), image-dependent features
        assert np.array_equal(ours["pool"], ref["pool"].numpy())  # pool_3 (FID, precision/recall)
        assert np.array_equal(ours["logits"], ref["logits"].numpy())  # IS logits: pool_3 @ W, no bias
        # sFID: mixed_6/conv = Mixed_6d.branch1x1 after BN + ReLU, channels [:7], flattened in TF's (h, w, c) order
        spatial = ref["mixed_6_conv"][:, :7].permute(0, 2, 3, 1).reshape(N, -1)
        assert np.array_equal(ours["spatial"], spatial.numpy())


def test_fid_agrees_with_torch_fidelity(reed_features, fidelity_features):
    """reed's FID (scipy ``sqrtm``) vs torch-fidelity's (eigenvalues of S1 S2) on the two libraries' own features.

    One 2048-d matrix function each (the slow part of this module on one core); sFID uses the same
    :func:`frechet_distance` on the ``spatial`` features, which are bit-identical above.
    """
    ours = im.fid(reed_features["a"], reed_features["b"])
    assert ours > 1.0  # two different image distributions: the agreement below is not about zeros
    fa, fb = fidelity_features["a"]["pool"], fidelity_features["b"]["pool"]
    s64 = [fid_features_to_statistics(t.double()) for t in (fa, fb)]
    ref = fid_statistics_to_metric(*s64, verbose=False)["frechet_inception_distance"]
    assert _rel(ours, ref) < 1e-8
    # torch-fidelity's own statistics of its float32 features: the same covariances (np.cov works in float64), the
    # mean in float32. That changes only the |mu1 - mu2|^2 term of its FID, by less than 1e-6 relative.
    s32 = [fid_features_to_statistics(t) for t in (fa, fb)]
    assert all(np.array_equal(a["sigma"], b["sigma"]) for a, b in zip(s32, s64))
    d32, d64 = s32[0]["mu"] - s32[1]["mu"], s64[0]["mu"] - s64[1]["mu"]
    assert d32.dtype == np.float32
    assert 0 < abs(float(d32.dot(d32)) - float(d64.dot(d64))) / ours < 1e-6


# ------------------------------------------------------------------------------------------------------ pytorch-fid


def test_pytorch_fid_network_is_bit_identical_on_the_same_input(reed_net, pytorch_fid_net, images):
    x = torch.from_numpy(images["a"][:4]).permute(0, 3, 1, 2)
    ours = reed_net(x)  # the same batch as below: CPU convolutions may round differently for another batch size
    net = pytorch_fid_net
    captured: list[torch.Tensor] = []
    handle = net.blocks[2][6].branch1x1.register_forward_hook(lambda m, i, o: captured.append(o.clone()))
    try:
        net.resize_input, net.normalize_input = False, False
        with torch.no_grad():
            pool = net(reed_net.preprocess(x))[0].flatten(1)  # reed's TF1 resize and (x - 128) / 128
        # blocks[2] = Mixed_5b..Mixed_6e: [6] is Mixed_6d (7x7 channels 160; Mixed_6e after it has 192)
        assert [b.branch7x7_1.conv.out_channels for b in net.blocks[2][4:]] == [128, 160, 160, 192]
        assert captured[0].shape == (4, 192, 17, 17)
        assert torch.equal(pool, ours["pool"])
        assert torch.equal(captured[0][:, :7].permute(0, 2, 3, 1).reshape(4, -1), ours["spatial"])

        # pytorch-fid's user path: ToTensor (x / 255) -> half-pixel F.interpolate -> 2x - 1. reed's network fed that
        # same preprocessing gives its output exactly; reed's own preprocessing gives measurably different features.
        net.resize_input, net.normalize_input = True, True
        with torch.no_grad():
            user = net(x.float() / 255)[0].flatten(1)
    finally:
        net.resize_input, net.normalize_input = True, True
        handle.remove()

    def half_pixel(images: torch.Tensor) -> torch.Tensor:
        return 2 * F.interpolate(images.float() / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reed_net, "preprocess", half_pixel)
        swapped = reed_net(x)["pool"]
    assert torch.equal(swapped, user)
    assert (user - pool).abs().max() > 1e-3 * pool.abs().max()


def test_pytorch_fid_frechet_distance_agrees(reed_features):
    """pytorch-fid's formula (scipy ``sqrtm``, the same eps fallback) on 256 of the pool dimensions (cheap; still
    rank-deficient covariances, N = 16 < 256)."""
    feats = [reed_features[k]["pool"][:, :256].astype(np.float64) for k in ("a", "b")]
    mu, sigma = [f.mean(0) for f in feats], [np.cov(f, rowvar=False) for f in feats]
    ours = im.fid(*feats)
    assert ours > 0.1
    assert _rel(ours, calculate_frechet_distance(mu[0], sigma[0], mu[1], sigma[1])) < 1e-8
