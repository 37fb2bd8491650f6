"""The FID Inception-v3: a PyTorch port of TensorFlow's 2015-12-05 ImageNet graph, as used by the ADM evaluator.

The OpenAI ADM evaluation suite (``guided-diffusion/evaluations/evaluator.py``) runs TF1 on the frozen graph
``classify_image_graph_def.pb`` from ``inception-2015-12-05.tgz``. This module re-implements that graph in PyTorch
(the same network pytorch-fid and torch-fidelity port) and returns, per batch of uint8 images ``(B, 3, H, W)``:

* ``pool`` ``(B, 2048)`` — TF ``pool_3:0`` (FID, precision/recall): the global average of ``Mixed_7c``.
* ``spatial`` ``(B, 2023)`` — TF ``mixed_6/conv:0[..., :7]`` (sFID): ``Mixed_6d.branch1x1`` after BN + ReLU,
  channels ``[:7]`` of its 17×17 map, flattened in TF's NHWC order (h, w, c): 17·17·7 = 2023.
* ``logits`` ``(B, K)`` — ADM's Inception-Score input ``pool_3 @ softmax/weights``: ADM takes the weights of the
  graph's ``softmax/logits/MatMul`` and drops the bias, so this is ``pool @ fc.weight.T`` **without** ``fc.bias``;
  K = 1008 for the TF weights (1000 ImageNet classes + 8 unused).

sFID mapping. TF names the mixed blocks ``mixed, mixed_1, …, mixed_10``; torchvision/pytorch-fid names them
``Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e, 7a, 7b, 7c``. So ``mixed_6`` is the 7th mixed block = ``Mixed_6d`` (the third
17×17 "InceptionC" block, 7×7 channels 160), and ``mixed_6/conv`` is its 1×1 branch (768 → 192 channels), whose
``conv2d_params`` / ``batchnorm`` constants torch-fidelity's converter maps to ``Mixed_6d.branch1x1.{conv,bn}``.
In the 2015 graph every ``<scope>/conv`` op is the ReLU that follows ``<scope>/conv/Conv2D`` and
``<scope>/conv/batchnorm``, so ``mixed_6/conv:0`` is taken *after* BN + ReLU (the features are ≥ 0).
Uncertainty: the graph itself was not inspected here (no TF / ``.pb`` available); the mapping relies on torch-fidelity's
converter table and the graph's naming convention (a community PyTorch port of the ADM evaluator also takes
``Mixed_6d.branch1x1``, though its comments say ``Mixed_6e``, which is ``mixed_7``). The NHWC flattening order
matters only when comparing against ADM's precomputed ``mu_s`` / ``sigma_s``; it is matched here.

Preprocessing. ADM feeds float images in 0..255 at the graph's ``ExpandDims:0``, after which the graph resizes to
299×299 and maps to ``[-1, 1)`` (``ResizeBilinear → Sub(128) → Mul(1/128)``, per torch-fidelity's port):
uint8 → float32 in 0..255 → TF1 ``ResizeBilinear`` to 299×299 with ``align_corners=False`` and *no* half-pixel
centres (source coordinate ``= dst · in/out``, the legacy TF1 behaviour; :func:`resize_bilinear_tf1`, the same
computation as torch-fidelity's ``interpolate_bilinear_2d_like_tensorflow1x(method="slow")``) → ``(x − 128) / 128``.
PyTorch's ``F.interpolate(mode="bilinear")`` (half-pixel centres, used by pytorch-fid) does *not* match it.
The network always runs in float32 with TF32 disabled for its convolutions and matmuls (:func:`full_fp32`).

Architecture quirks of the TF graph (kept): average pools inside the blocks ignore padding
(``count_include_pad=False``), and the last block (``Mixed_7c``/``mixed_10``) max-pools its pool branch.
Batch-norm ε = 0.001.

Weights — never downloaded. Pass a local file (``--inception PATH``, or ``path=`` here, or the environment variable
``REED_INCEPTION_WEIGHTS``). The expected file is the TF 2015-12-05 graph converted to a PyTorch state dict, published
byte-identically under two names:

* ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid):
  https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
* ``weights-inception-2015-12-05-6726825d.pth`` (torch-fidelity):
  https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth

sha256 ``6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2``, 95,628,359 bytes (pinned by several
third-party projects for both names; not re-hashed here). A file with another hash is loaded if its keys fit, with
:attr:`FIDInceptionV3.official` ``False`` (results are then not comparable to published numbers).

Key layout (a flat ``{name: tensor}`` dict, torchvision ``Inception3`` names without ``AuxLogits``; ``.pth`` or
``.safetensors``; a ``state_dict`` wrapper and ``module.`` prefixes are accepted)::

    Conv2d_1a_3x3.conv.weight (32, 3, 3, 3)    Conv2d_1a_3x3.bn.{weight,bias,running_mean,running_var} (32,)
    Conv2d_2a_3x3 / Conv2d_2b_3x3 / Conv2d_3b_1x1 / Conv2d_4a_3x3                    .conv.weight, .bn.*
    Mixed_5b, Mixed_5c, Mixed_5d:  branch1x1, branch5x5_{1,2}, branch3x3dbl_{1,2,3}, branch_pool       .conv / .bn
    Mixed_6a:                      branch3x3, branch3x3dbl_{1,2,3}
    Mixed_6b … Mixed_6e:           branch1x1, branch7x7_{1,2,3}, branch7x7dbl_{1..5}, branch_pool
    Mixed_7a:                      branch3x3_{1,2}, branch7x7x3_{1,2,3,4}
    Mixed_7b, Mixed_7c:            branch1x1, branch3x3_1, branch3x3_2{a,b}, branch3x3dbl_{1,2}, branch3x3dbl_3{a,b},
                                   branch_pool
    fc.weight (1008, 2048), fc.bias (1008,)

Convolutions have no bias; ``bn.num_batches_tracked`` may be present or absent. Every other key must be present
with the right shape (a mismatch raises :class:`~reed.errors.CheckpointError` naming the file). ``fc`` may have
1000 rows instead of 1008 (then ``logits`` is ``(B, 1000)``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reed.errors import CheckpointError, ReedError
from reed.io import file_sha256

__all__ = [
    "INCEPTION_ENV",
    "INCEPTION_FILENAMES",
    "INCEPTION_SHA256",
    "INCEPTION_URLS",
    "PREPROCESSING",
    "FIDInceptionV3",
    "InceptionWeightsNotFoundError",
    "full_fp32",
    "load_inception",
    "resize_bilinear_tf1",
    "resolve_inception_path",
]

#: Environment variable naming the local weights file when no path is passed.
INCEPTION_ENV = "REED_INCEPTION_WEIGHTS"
#: The two published names of the (byte-identical) converted TF 2015-12-05 weights.
INCEPTION_FILENAMES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
#: sha256 of that file (95,628,359 bytes).
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
#: Where the file can be fetched on a machine with internet (reed itself never downloads it).
INCEPTION_URLS = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
)
#: Input size of the network.
INPUT_SIZE = 299
#: Preprocessing description recorded with results and part of every cache key.
PREPROCESSING = "uint8->float32; TF1 ResizeBilinear 299x299 (align_corners=False, no half-pixel centres); (x-128)/128"


class InceptionWeightsNotFoundError(ReedError, FileNotFoundError):
    """No local FID Inception weights file (reed never downloads it)."""


# ------------------------------------------------------------------------------------------------ preprocessing


def resize_bilinear_tf1(x: Tensor, size: tuple[int, int]) -> Tensor:
    """TensorFlow 1.x ``ResizeBilinear`` (``align_corners=False``, ``half_pixel_centers=False``) of ``x``.

    Args:
        x: float tensor ``(B, C, H, W)``.
        size: output ``(h, w)``.

    Returns:
        ``(B, C, h, w)`` in ``x.dtype``. For each axis, scale ``= in / out`` (float32), source coordinate
        ``s = i · scale``, ``lo = floor(s)``, ``hi = min(lo + 1, in − 1)``, weight ``s − lo``; rows are interpolated
        along x first (``top``/``bottom``), then along y, in TF's operation order.
    """
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"resize_bilinear_tf1 expects a float (B, C, H, W) tensor, got {x.dtype} {tuple(x.shape)}")
    (h_in, w_in), (h_out, w_out) = x.shape[-2:], size
    if (h_in, w_in) == (h_out, w_out):
        return x

    def axis(n_in: int, n_out: int) -> tuple[Tensor, Tensor, Tensor]:
        scale = torch.tensor(n_in, dtype=torch.float32) / n_out  # float32 division, as TF's CalculateResizeScale
        src = torch.arange(n_out, dtype=torch.float32) * scale
        lo = src.floor()
        frac = (src - lo).to(device=x.device, dtype=x.dtype)
        lo = lo.long()
        hi = (lo + 1).clamp_max(n_in - 1)
        return lo.to(x.device), hi.to(x.device), frac

    ylo, yhi, yw = axis(h_in, h_out)
    xlo, xhi, xw = axis(w_in, w_out)
    xw = xw.view(1, 1, 1, w_out)
    yw = yw.view(1, 1, h_out, 1)
    rows_lo, rows_hi = x.index_select(2, ylo), x.index_select(2, yhi)
    tl, tr = rows_lo.index_select(3, xlo), rows_lo.index_select(3, xhi)
    bl, br = rows_hi.index_select(3, xlo), rows_hi.index_select(3, xhi)
    top = tl + (tr - tl) * xw
    bottom = bl + (br - bl) * xw
    return top + (bottom - top) * yw


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """Disable TF32 for cuBLAS matmuls and cuDNN convolutions inside the block; restore the previous settings after.

    PyTorch enables TF32 for cuDNN convolutions by default (and ``reed generate`` enables it for matmuls); metric
    networks must run in true float32. Uses the legacy ``allow_tf32`` flags unless the process already uses the new
    ``fp32_precision`` API (PyTorch refuses to mix the two).
    """
    try:
        old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    except RuntimeError:  # the new API is in use: stay with it
        matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
        old_new = (matmul.fp32_precision, conv.fp32_precision)
        matmul.fp32_precision, conv.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = old_new
        return
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# ------------------------------------------------------------------------------------------------------ network


class _ConvBN(nn.Module):
    """Conv (no bias) → BatchNorm (ε = 1e-3) → ReLU; one TF ``<scope>/conv`` op."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: Tensor) -> Tensor:
    """TF's 3×3 / stride-1 SAME average pool: padded positions are not counted."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _Block35(nn.Module):
    """35×35 block (``mixed``, ``mixed_1``, ``mixed_2`` = ``Mixed_5b/5c/5d``): 64 + 64 + 96 + pool_features."""

    def __init__(self, c_in: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = _ConvBN(c_in, 64, 1)
        self.branch5x5_1 = _ConvBN(c_in, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(c_in, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg3(x))], 1)


class _Reduce35(nn.Module):
    """35→17 reduction (``mixed_3`` = ``Mixed_6a``): 384 + 96 + c_in."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = _ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class _Block17(nn.Module):
    """17×17 block (``mixed_4..mixed_7`` = ``Mixed_6b..6e``), factorised 7×7 convolutions; 4 × 192 channels."""

    def __init__(self, c_in: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = _ConvBN(c_in, 192, 1)
        self.branch7x7_1 = _ConvBN(c_in, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _ConvBN(c_in, 192, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``(block output (B, 768, 17, 17), 1×1 branch (B, 192, 17, 17))``."""
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            bd = layer(bd)
        return torch.cat([b1, b7, bd, self.branch_pool(_avg3(x))], 1), b1


class _Reduce17(nn.Module):
    """17→8 reduction (``mixed_8`` = ``Mixed_7a``): 320 + 192 + c_in."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = _ConvBN(c_in, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class _Block8(nn.Module):
    """8×8 block (``mixed_9`` / ``mixed_10`` = ``Mixed_7b`` / ``Mixed_7c``): 320 + 768 + 768 + 192 = 2048.

    ``max_pool=True`` for ``Mixed_7c``: the TF graph max-pools that block's pool branch.
    """

    def __init__(self, c_in: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _ConvBN(c_in, 320, 1)
        self.branch3x3_1 = _ConvBN(c_in, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        t = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(t), self.branch3x3_2b(t)], 1)
        t = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(t), self.branch3x3dbl_3b(t)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """The TF 2015-12-05 Inception-v3 used for FID / sFID / IS / precision-recall (see the module docstring).

    Build it with :func:`load_inception` (which loads the weights); a bare ``FIDInceptionV3()`` has random weights.

    Attributes:
        num_classes: rows of ``fc`` (1008 for the TF weights).
        weights_path: the file the weights came from (``None`` if not loaded from a file).
        file_sha256: sha256 of that file; ``official`` is ``file_sha256 == INCEPTION_SHA256``.
        fingerprint: ``"fid-inception-v3:<sha256 over the loaded state dict>"`` (identifies the network in caches).
    """

    def __init__(self, num_classes: int = 1008) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _Block35(192, 32)
        self.Mixed_5c = _Block35(256, 64)
        self.Mixed_5d = _Block35(288, 64)
        self.Mixed_6a = _Reduce35(288)
        self.Mixed_6b = _Block17(768, 128)
        self.Mixed_6c = _Block17(768, 160)
        self.Mixed_6d = _Block17(768, 160)
        self.Mixed_6e = _Block17(768, 192)
        self.Mixed_7a = _Reduce17(768)
        self.Mixed_7b = _Block8(1280, max_pool=False)
        self.Mixed_7c = _Block8(2048, max_pool=True)
        self.fc = nn.Linear(2048, self.num_classes)
        self.weights_path: str | None = None
        self.file_sha256: str | None = None
        self.fingerprint: str = ""
        self.eval().requires_grad_(False)

    @property
    def official(self) -> bool:
        """Whether the weights file is the published FID Inception file (by sha256)."""
        return self.file_sha256 == INCEPTION_SHA256

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    def train(self, mode: bool = True) -> FIDInceptionV3:
        """Always stays in eval mode (batch norm uses the stored statistics)."""
        return super().train(False)

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 (or float 0..255) ``(B, 3, H, W)`` → float32 ``(B, 3, 299, 299)`` in ``[-1, 1)`` (TF graph order)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"FID Inception expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
        x = images.to(device=self.device, dtype=torch.float32)
        x = resize_bilinear_tf1(x, (INPUT_SIZE, INPUT_SIZE))
        return (x - 128.0) / 128.0

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """uint8 images ``(B, 3, H, W)`` → ``{"pool": (B, 2048), "spatial": (B, 2023), "logits": (B, K)}`` float32.

        ``pool`` = ``pool_3``; ``spatial`` = ``mixed_6/conv[..., :7]`` flattened in (h, w, c) order;
        ``logits`` = ``pool @ fc.weight.T`` without the bias (ADM's Inception-Score input).
        """
        with full_fp32():
            x = self.preprocess(images)
            for layer in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3):
                x = layer(x)
            x = F.max_pool2d(x, 3, stride=2)
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
            x = F.max_pool2d(x, 3, stride=2)
            x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
            x, _ = self.Mixed_6b(x)
            x, _ = self.Mixed_6c(x)
            x, mixed_6_conv = self.Mixed_6d(x)
            x, _ = self.Mixed_6e(x)
            x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
            pool = x.mean(dim=(2, 3))
            spatial = mixed_6_conv[:, :7].permute(0, 2, 3, 1).reshape(x.shape[0], -1)
            logits = pool @ self.fc.weight.T
        return {"pool": pool.float(), "spatial": spatial.float(), "logits": logits.float()}


# ------------------------------------------------------------------------------------------------------ loading


def _download_hint() -> str:
    return (
        f"download {INCEPTION_FILENAMES[0]} (pytorch-fid) or {INCEPTION_FILENAMES[1]} (torch-fidelity), the same "
        f"file, sha256 {INCEPTION_SHA256}, from {INCEPTION_URLS[0]} or {INCEPTION_URLS[1]} on a machine with "
        f"internet, then pass --inception PATH (or set {INCEPTION_ENV}=PATH); reed never downloads it"
    )


def resolve_inception_path(path: str | os.PathLike | None = None) -> Path:
    """The weights file: ``path``, else ``$REED_INCEPTION_WEIGHTS``.

    Raises:
        InceptionWeightsNotFoundError: (a ``FileNotFoundError``) neither is given, or the file does not exist; the
            message names the path tried and the file to download.
    """
    if path is None:
        env = os.environ.get(INCEPTION_ENV)
        if not env:
            raise InceptionWeightsNotFoundError(f"no FID Inception weights given (no path and ${INCEPTION_ENV} unset); "
                                                + _download_hint())
        path = env
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise InceptionWeightsNotFoundError(f"FID Inception weights file {p} {what}; " + _download_hint())
    return p


def _state_fingerprint(module: nn.Module) -> str:
    h = hashlib.sha256()
    for key, t in sorted(module.state_dict().items()):
        if key.endswith("num_batches_tracked"):
            continue
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{key}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _read_state(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # any parse failure: one message naming the file
        raise CheckpointError(f"cannot read FID Inception weights {path}: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"FID Inception weights {path} are not a flat state dict of tensors")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def load_inception(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """Load the FID Inception-v3 from a local weights file (see the module docstring for the expected file).

    Args:
        path: the ``.pth`` / ``.safetensors`` file; ``None`` reads ``$REED_INCEPTION_WEIGHTS``.
        device: where the network runs.

    Returns:
        A frozen :class:`FIDInceptionV3` in eval mode with ``weights_path``, ``file_sha256`` and ``fingerprint`` set.

    Raises:
        InceptionWeightsNotFoundError: no path / no such file (the message says what to download).
        CheckpointError: the file cannot be read, or its keys / shapes do not fit the network.
    """
    file = resolve_inception_path(path)
    state = _read_state(file)
    fc = state.get("fc.weight")
    model = FIDInceptionV3(num_classes=int(fc.shape[0]) if fc is not None and fc.ndim == 2 else 1008)
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    given = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(set(own) - set(given)), sorted(set(given) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"FID Inception weights {file} do not fit the TF Inception-v3 layout: missing keys {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''} ({len(missing)}), unexpected keys {unexpected[:6]}"
            f"{' ...' if len(unexpected) > 6 else ''} ({len(unexpected)}); expected e.g. {INCEPTION_FILENAMES[0]}"
        )
    bad = [f"{k}: {tuple(given[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if given[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"FID Inception weights {file} have wrong shapes (file vs network): {bad[:6]}")
    model.load_state_dict(given, strict=False)  # only num_batches_tracked may be left out
    model = model.float().to(device)
    model.weights_path = str(file.resolve())
    model.file_sha256 = file_sha256(file)
    model.fingerprint = f"fid-inception-v3:{_state_fingerprint(model)}"
    return model
