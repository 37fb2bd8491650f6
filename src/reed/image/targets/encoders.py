"""Frozen pretrained image encoders whose patch tokens are REPA/REED alignment targets (spec ``image.md`` §4.1).

An :class:`ImageEncoder` maps raw images to patch tokens::

    uint8 (B, 3, H, W) --preprocess--> float (B, 3, h, w) --frozen ViT--> tokens (B, T, D) float32

Built-in encoders (:data:`ENCODER_SPECS`, see :func:`list_encoders`):

=====================  =============  ===========================================  ============================
name                   source         preprocessing (after ``x / 255``)            tokens
=====================  =============  ===========================================  ============================
dinov2-vit-{s,b,l,g}   HF Dinov2      ImageNet normalise, **then** bicubic 224      after final LayerNorm, no CLS
dinov2reg-vit-{s,..}   HF Dinov2Reg   same                                          no CLS, no register tokens
clip-vit-L             HF CLIPVision  bicubic 224, **then** CLIP normalise          *before* post-LN, no CLS
siglip-vit-{b,l}       HF SiglipVis.  SigLIP normalise (0.5/0.5), native 256        last_hidden_state (no CLS)
mae-vit-l              HF ViTMAE      ImageNet normalise, no resize                 last block, *no* final norm,
                                                                                    no CLS, no masking/shuffle
jepa-vit-h             HF IJepa       ImageNet normalise, then bicubic 224          all tokens after final norm
mocov3-vit-{s,b,l}     timm ViT/16    ImageNet normalise, no resize                 forward_features, no CLS
=====================  =============  ===========================================  ============================

Two open families: ``"hf:<hub-id-or-dir>"`` (any Hugging Face vision model through ``AutoModel``) and
``"timm:<model_name>"`` (any timm model, weights from a local file).

Resolution. The reference feeds the raw 256 px training image; resizes are ``F.interpolate(mode="bicubic",
align_corners=False)`` without antialiasing, to ``224 * res / 256`` (REPA's 512 px path resizes to 448), so a
``/14`` encoder gives the same ``(res/16)²`` grid as a ``/16`` encoder at full size: 256 tokens at 256 px, 1024 at
512 px. Positional embeddings are resampled to whatever grid the input has. For DINOv2, MAE and I-JEPA this uses
timm's ``resample_abs_pos_embed`` (bicubic, antialiased) exactly like the reference, which resamples the table once
with that function; Hugging Face's own interpolation (no antialias, for DINOv2 / MAE) would give slightly different
tokens. CLIP and SigLIP use Hugging Face's ``interpolate_pos_encoding`` (a no-op at their native grid).

Note: per-channel normalisation is affine and bicubic weights sum to one, so "normalise then resize" and
"resize then normalise" agree up to float rounding; both orders are implemented as the spec states them.

Weights are never downloaded: a hub id resolves from the local Hugging Face cache only
(``local_files_only=True``), otherwise pass ``path=`` to a local directory / file.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reed.errors import CheckpointError, ConfigError, ReedError

__all__ = [
    "ENCODER_SPECS",
    "EncoderSpec",
    "EncoderWeightsNotFoundError",
    "ImageEncoder",
    "list_encoders",
    "load_image_encoder",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

#: Resolution at which :attr:`EncoderSpec.resize` is stated; other resolutions scale it (224 → 448 at 512 px).
REFERENCE_RESOLUTION = 256


class EncoderWeightsNotFoundError(ReedError, FileNotFoundError):
    """No weights for an encoder: neither at the given path nor in the local Hugging Face cache."""


@dataclass(frozen=True)
class EncoderSpec:
    """How to load and feed one frozen image encoder.

    Attributes:
        name: registry name, e.g. ``"dinov2-vit-b"``.
        family: ``"dinov2" | "dinov2reg" | "clip" | "siglip" | "mae" | "jepa" | "mocov3" | "hf" | "timm"``.
        mean, std: per-channel normalisation applied to ``x / 255``.
        resize: square bicubic resize (``F.interpolate``, ``align_corners=False``, no antialias). For the built-in
            specs it is stated at the reference 256 px resolution and scales with the input (``resize * H / 256``,
            224 → 448 at 512 px, as REPA does); for ``hf:`` encoders it is the processor's fixed size.
            ``None`` keeps the input size.
        normalize_first: ``True`` normalises *then* resizes (DINOv2, I-JEPA); ``False`` resizes first (CLIP).
        hub_id: default Hugging Face id used when no local path is given (resolved from the local cache only).
    """

    name: str
    family: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int | None
    normalize_first: bool
    hub_id: str | None


def _build_specs() -> dict[str, EncoderSpec]:
    specs: dict[str, EncoderSpec] = {}
    sizes = {"s": "small", "b": "base", "l": "large", "g": "giant"}
    for c, size in sizes.items():
        specs[f"dinov2-vit-{c}"] = EncoderSpec(
            f"dinov2-vit-{c}", "dinov2", IMAGENET_MEAN, IMAGENET_STD, 224, True, f"facebook/dinov2-{size}"
        )
        specs[f"dinov2reg-vit-{c}"] = EncoderSpec(
            f"dinov2reg-vit-{c}",
            "dinov2reg",
            IMAGENET_MEAN,
            IMAGENET_STD,
            224,
            True,
            f"facebook/dinov2-with-registers-{size}",
        )
    specs["clip-vit-L"] = EncoderSpec(
        "clip-vit-L", "clip", CLIP_MEAN, CLIP_STD, 224, False, "openai/clip-vit-large-patch14"
    )
    for c, size in (("b", "base"), ("l", "large")):
        specs[f"siglip-vit-{c}"] = EncoderSpec(
            f"siglip-vit-{c}", "siglip", SIGLIP_MEAN, SIGLIP_STD, None, False, f"google/siglip-{size}-patch16-256"
        )
    specs["mae-vit-l"] = EncoderSpec(
        "mae-vit-l", "mae", IMAGENET_MEAN, IMAGENET_STD, None, True, "facebook/vit-mae-large"
    )
    specs["jepa-vit-h"] = EncoderSpec(
        "jepa-vit-h", "jepa", IMAGENET_MEAN, IMAGENET_STD, 224, True, "facebook/ijepa_vith14_1k"
    )
    for c in ("s", "b", "l"):
        specs[f"mocov3-vit-{c}"] = EncoderSpec(
            f"mocov3-vit-{c}", "mocov3", IMAGENET_MEAN, IMAGENET_STD, None, True, None
        )
    return specs


#: The built-in encoders, keyed by name (``dinov2-vit-b`` is the REED headline target).
ENCODER_SPECS: dict[str, EncoderSpec] = _build_specs()

# MoCo v3 ViTs as in the REPA/RCG release (``models/mocov3_vit.py``): img 256, patch 16, mlp 4, qkv bias, LN eps 1e-6.
# ViT-S uses 12 heads (MoCo v3's choice, not timm's 6).
_MOCOV3_ARCH: dict[str, dict[str, int]] = {
    "mocov3-vit-s": dict(embed_dim=384, depth=12, num_heads=12),
    "mocov3-vit-b": dict(embed_dim=768, depth=12, num_heads=12),
    "mocov3-vit-l": dict(embed_dim=1024, depth=24, num_heads=16),
}
_MOCOV3_PREFIX = "module.base_encoder."
# Naming bug in the RCG ViT-L checkpoint, fixed by the reference before a strict load.
_MOCOV3_RENAMES = (
    ("blocks.13.norm13", "norm13", "norm1"),
    ("blocks.13.mlp.fc13", "fc13", "fc1"),
    ("blocks.14.norm14", "norm14", "norm2"),
    ("blocks.14.mlp.fc14", "fc14", "fc2"),
)

_HF_CLASS_NAMES = {
    "dinov2": "Dinov2Model",
    "dinov2reg": "Dinov2WithRegistersModel",
    "clip": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "mae": "ViTMAEModel",
    "jepa": "IJepaModel",
}
# Families whose positional table is resampled with timm's antialiased bicubic, and its number of prefix rows.
_AA_POS_PREFIX = {"dinov2": 1, "dinov2reg": 1, "mae": 1, "jepa": 0}


def list_encoders() -> list[str]:
    """Names of the built-in encoders (``"hf:<id-or-dir>"`` and ``"timm:<model>"`` are accepted as well)."""
    return list(ENCODER_SPECS)


# --------------------------------------------------------------------------------------------------- the module


class ImageEncoder(nn.Module):
    """Frozen encoder: uint8 images ``(B, 3, H, W)`` → patch tokens ``(B, T, D)`` float32.

    Build it with :func:`load_image_encoder`. The wrapped network (``self.model``) stays in eval mode with
    ``requires_grad=False``; :meth:`forward` runs under ``torch.no_grad()`` and always returns float32.

    Attributes:
        name: encoder name (a key of :data:`ENCODER_SPECS`, or ``hf:...`` / ``timm:...``).
        dim: token width D.
        spec: the :class:`EncoderSpec` used for preprocessing.
        fingerprint: ``"<name>:<sha256>"``, the sha256 over the loaded weights (names, dtypes, shapes, bytes in
            fp32, sorted by name), computed once at load; identifies the target function for caches.
        resolution: the training resolution given at load (inputs of other sizes work as well).
    """

    def __init__(
        self,
        spec: EncoderSpec,
        model: nn.Module,
        *,
        kind: str,
        dim: int,
        num_prefix_tokens: int,
        patch_size: int | None,
        fingerprint: str,
        resolution: int,
        interpolate_pos_encoding: bool = False,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.name = spec.name
        self.model = model.eval().requires_grad_(False)
        self.dim = int(dim)
        self.fingerprint = fingerprint
        self.resolution = int(resolution)
        self._kind = kind  # "hf" | "mae" | "timm"
        self._num_prefix = int(num_prefix_tokens)
        self._patch = patch_size
        self._interp = interpolate_pos_encoding
        self._token_counts: dict[int, int] = {}
        super().train(False)

    def train(self, mode: bool = True) -> ImageEncoder:
        """Always stays in eval mode (a frozen target must not switch on dropout or drop-path)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def input_size(self, height: int, width: int | None = None) -> tuple[int, int]:
        """Spatial size ``(h, w)`` the network sees for an ``H × W`` image (``resize · H / 256`` or unchanged)."""
        width = height if width is None else width
        if self.spec.resize is None:
            return int(height), int(width)
        if self.spec.family == "hf":  # a processor's size is absolute
            return self.spec.resize, self.spec.resize
        scale = self.spec.resize / REFERENCE_RESOLUTION
        return round(scale * height), round(scale * width)

    def _normalisation(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The spec's mean and std (1, 3, 1, 1) on ``device``, copied there once (not once per batch)."""
        cache = self.__dict__.setdefault("_norm_cache", {})
        if device not in cache:
            cache[device] = tuple(torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1).to(device)
                                  for v in (self.spec.mean, self.spec.std))
        return cache[device]

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 or float ``0..255`` images ``(B, 3, H, W)`` → normalised / resized float32 ``(B, 3, h, w)``.

        ``x / 255``, then (per :attr:`EncoderSpec.normalize_first`) normalise→resize or resize→normalise, with
        ``F.interpolate(mode="bicubic", align_corners=False)`` (no antialias, no clamping), as in the reference.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        x = images.to(torch.float32) / 255.0
        mean, std = self._normalisation(x.device)
        size = self.input_size(x.shape[-2], x.shape[-1])
        needs_resize = size != tuple(x.shape[-2:])
        if self.spec.normalize_first:
            x = (x - mean) / std
            if needs_resize:
                x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        else:
            if needs_resize:
                x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
            x = (x - mean) / std
        return x

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """uint8 images ``(B, 3, H, W)`` (values 0..255) → patch tokens ``(B, T, D)`` float32.

        T = ``(h / patch)·(w / patch)`` for ViTs (256 at 256 px for every built-in encoder); CLS and register
        tokens are dropped, per spec §4.1.
        """
        x = self.preprocess(images.to(self.device)).to(self.dtype)
        if self._kind == "timm":
            feats = self.model.forward_features(x)
            if feats.ndim == 4:  # a CNN feature map (B, C, h, w) → (B, h·w, C)
                tokens = feats.flatten(2).transpose(1, 2)
            else:
                tokens = feats[:, self._num_prefix :]
        elif self._kind == "mae":
            # mask_ratio is 0 and a monotone noise makes the argsort the identity: no masking, original order.
            n = (x.shape[-2] // self._patch) * (x.shape[-1] // self._patch)
            noise = torch.arange(n, device=x.device, dtype=torch.float32).expand(x.shape[0], n)
            out = self.model(pixel_values=x, noise=noise, interpolate_pos_encoding=True)
            tokens = out.last_hidden_state[:, self._num_prefix :]  # final layernorm replaced by Identity at load
        else:
            kwargs = {"interpolate_pos_encoding": True} if self._interp else {}
            out = self.model(pixel_values=x, **kwargs)
            tokens = out.last_hidden_state[:, self._num_prefix :]
        return tokens.float()

    @torch.no_grad()
    def attention_logits(self, images: Tensor, layers: list[int]) -> Tensor:
        """Pre-softmax attention logits of blocks ``layers`` (1-based) over the patch tokens: uint8 images
        ``(B, 3, H, W)`` -> ``(B, len(layers), heads, T, T)`` float32 (HASTE's teacher maps).

        The logits ``q k^T / sqrt(d_head)`` are recomputed from each block's query and key projections (captured
        with forward hooks, so the network's own attention kernel is untouched); the rows and columns of the CLS
        and register tokens are dropped, so a softmax over the last axis is the attention renormalised over the
        patch keys, as HASTE does. Hugging Face ViTs with ``q_proj``/``k_proj`` (or ``query``/``key``) only.
        """
        if self._kind != "hf":
            raise ValueError(f"{self.name}: attention maps need a Hugging Face ViT encoder (e.g. dinov2-vit-b)")
        heads = int(self.model.config.num_attention_heads)
        blocks = {int(i): [] for i in layers}
        captured: dict[tuple[int, str], Tensor] = {}
        handles = []
        try:
            for name, mod in self.model.named_modules():
                parts = name.split(".")
                if len(parts) >= 2 and parts[-1] in ("q_proj", "k_proj", "query", "key") and "layer" in parts:
                    i = int(parts[parts.index("layer") + 1]) + 1
                    if i in blocks:
                        role = "q" if parts[-1] in ("q_proj", "query") else "k"
                        blocks[i].append(role)
                        handles.append(mod.register_forward_hook(
                            lambda _m, _a, out, key=(i, role): captured.__setitem__(key, out)))
            missing = [i for i, roles in blocks.items() if sorted(roles) != ["k", "q"]]
            if missing:
                raise ValueError(f"{self.name}: no query/key projections found for block(s) {missing} "
                                 f"(attention layers are 1-based, the encoder has "
                                 f"{self.model.config.num_hidden_layers})")
            self.forward(images)
        finally:
            for h in handles:
                h.remove()
        out = []
        for i in layers:
            q, k = captured[(int(i), "q")], captured[(int(i), "k")]
            b, n, d = q.shape
            q = q.float().view(b, n, heads, d // heads).transpose(1, 2)
            k = k.float().view(b, n, heads, d // heads).transpose(1, 2)
            logits = (q @ k.transpose(-2, -1)) * (d // heads) ** -0.5  # (B, heads, N, N)
            p = self._num_prefix
            out.append(logits[:, :, p:, p:])
        return torch.stack(out, dim=1)

    def num_tokens(self, resolution: int) -> int:
        """Number of tokens T produced for a square ``resolution × resolution`` input image."""
        resolution = int(resolution)
        if resolution not in self._token_counts:
            if self._patch:
                h, w = self.input_size(resolution)
                self._token_counts[resolution] = (h // self._patch) * (w // self._patch)
            else:  # unknown geometry (e.g. a CNN or hierarchical model): run one blank image
                probe = torch.zeros(1, 3, resolution, resolution, dtype=torch.uint8)
                self._token_counts[resolution] = int(self.forward(probe).shape[1])
        return self._token_counts[resolution]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, fingerprint={self.fingerprint!r}"


# ------------------------------------------------------------------------------------------------------ loading


def load_image_encoder(
    name: str,
    path: str | os.PathLike | None = None,
    *,
    resolution: int = 256,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ImageEncoder:
    """Load a frozen image encoder by name.

    Args:
        name: a key of :data:`ENCODER_SPECS` (case-insensitive), ``"hf:<hub-id-or-dir>"`` or
            ``"timm:<model_name>"``.
        path: local weights: a Hugging Face model directory (HF families, ``hf:``), or a checkpoint file
            (``mocov3-*``: the RCG ``.pth``; ``timm:``: ``.safetensors`` / ``.pth``). ``None`` uses the spec's hub
            id from the local Hugging Face cache (never the network).
        resolution: training image resolution; checked against the patch grid (tokens are ``(res/16)²`` for every
            built-in encoder). Inputs of any size are accepted by :meth:`ImageEncoder.forward`.
        device, dtype: where and in which precision the network runs (tokens are returned as float32).

    Raises:
        EncoderWeightsNotFoundError: (a ``FileNotFoundError``) nothing at ``path`` / the hub id is not cached.
        CheckpointError: a checkpoint's keys or shapes do not fit the architecture (names the file).
        ConfigError: unknown encoder name, or a resolution that does not give a whole patch grid.
    """
    spec = _lookup_spec(name)
    if spec.family == "mocov3":
        model, fp, dim, prefix, patch = _load_mocov3(spec, path)
        kind, interp = "timm", False
    elif spec.family == "timm":
        model, fp, dim, prefix, patch, spec = _load_timm(spec, path)
        kind, interp = "timm", False
    elif spec.family == "hf":
        model, fp, dim, prefix, patch, spec, interp = _load_hf_generic(spec, path)
        kind = "hf"
    else:
        model, fp, dim, prefix, patch, interp = _load_hf_family(spec, path)
        kind = "mae" if spec.family == "mae" else "hf"
    model = model.to(device=device, dtype=dtype)
    enc = ImageEncoder(
        spec,
        model,
        kind=kind,
        dim=dim,
        num_prefix_tokens=prefix,
        patch_size=patch,
        fingerprint=f"{spec.name}:{fp}",
        resolution=resolution,
        interpolate_pos_encoding=interp,
    )
    if patch is not None and spec.family not in ("hf", "timm"):
        h, _ = enc.input_size(resolution)
        if h % patch:
            raise ConfigError(
                f"encoder '{spec.name}': resolution {resolution} gives a {h} px input, not a multiple of the "
                f"patch size {patch}; use a resolution that is a multiple of 16"
            )
    return enc


def _lookup_spec(name: str) -> EncoderSpec:
    if name.startswith("hf:") and len(name) > 3:
        ident = name[3:]
        return EncoderSpec(name, "hf", IMAGENET_MEAN, IMAGENET_STD, None, False, ident)
    if name.startswith("timm:") and len(name) > 5:
        return EncoderSpec(name, "timm", IMAGENET_MEAN, IMAGENET_STD, None, False, None)
    if name in ENCODER_SPECS:
        return ENCODER_SPECS[name]
    folded = {k.lower(): v for k, v in ENCODER_SPECS.items()}
    if name.lower() in folded:
        return folded[name.lower()]
    raise ConfigError(
        f"unknown image encoder '{name}'; known: {', '.join(ENCODER_SPECS)}, or 'hf:<hub-id-or-dir>', "
        "'timm:<model_name>'"
    )


def _not_found(name: str, tried: str, hub_id: str | None, cause: str = "") -> EncoderWeightsNotFoundError:
    how = (
        f"download them on a machine with internet (`huggingface-cli download {hub_id}`) and copy the Hugging "
        "Face cache (~/.cache/huggingface/hub) here, or pass path=<local model directory>"
        if hub_id
        else "pass path=<local weights>"
    )
    detail = f" ({cause})" if cause else ""
    return EncoderWeightsNotFoundError(f"encoder '{name}': no weights found at {tried}{detail}; {how}")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports (e.g. the unused text tower of a full CLIP checkpoint)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _hf_source(spec: EncoderSpec, path: str | os.PathLike | None) -> str:
    """Where to load from: the given local path, else the hub id (which may itself name a local directory)."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise _not_found(spec.name, str(p), spec.hub_id)
        return str(p)
    if spec.hub_id is None:
        raise _not_found(spec.name, "<no path given>", None)
    p = Path(spec.hub_id).expanduser()
    if p.exists():
        return str(p)
    if spec.hub_id.startswith(("/", ".", "~")) or spec.hub_id.count("/") > 1:
        raise _not_found(spec.name, str(p), None, "no such directory")
    return spec.hub_id


def _hf_from_pretrained(loader: Callable[..., nn.Module], spec: EncoderSpec, src: str) -> nn.Module:
    """``loader(src)`` from local files only; weights the checkpoint lacks are an error, not a random init."""
    try:
        with _quiet_transformers():
            model, info = loader(src, local_files_only=True, output_loading_info=True)
    except OSError as e:
        raise _not_found(spec.name, src, spec.hub_id, str(e).splitlines()[0] if str(e) else "") from e
    missing = sorted(k for k in info.get("missing_keys", ()) if not _unused_weight(k))
    mismatched = [str(m) for m in info.get("mismatched_keys", ())]
    if missing or mismatched:
        raise CheckpointError(
            f"encoder '{spec.name}': {src} does not fit {type(model).__name__} (is it a {spec.family} checkpoint?): "
            f"missing weights {missing[:8]}{' ...' if len(missing) > 8 else ''}, wrong shapes {mismatched[:8]}"
        )
    return model.float()


def _unused_weight(key: str) -> bool:
    """Weights that may be absent from a checkpoint without changing the tokens (mask token, pooler, head)."""
    return key.endswith("mask_token") or key.split(".")[0] in ("pooler", "head")


def _config_patch(config) -> int | None:
    ps = getattr(config, "patch_size", None)
    if ps is None:
        return None
    return int(ps[0]) if isinstance(ps, (tuple, list)) else int(ps)


def _load_hf_family(spec: EncoderSpec, path) -> tuple[nn.Module, str, int, int, int | None, bool]:
    import transformers

    cls = getattr(transformers, _HF_CLASS_NAMES[spec.family])
    src = _hf_source(spec, path)
    model = _hf_from_pretrained(cls.from_pretrained, spec, src)
    fp = _fingerprint(model)
    config = model.config
    if spec.family == "dinov2reg":
        prefix = 1 + int(config.num_register_tokens)  # CLS + registers
    elif spec.family in ("dinov2", "clip", "mae"):
        prefix = 1  # CLS
    else:
        prefix = 0  # SigLIP and I-JEPA have no CLS token
    if spec.family in _AA_POS_PREFIX:
        _use_antialiased_pos_resampling(model.embeddings, _AA_POS_PREFIX[spec.family])
    if spec.family == "mae":
        config.mask_ratio = 0.0
        emb_config = getattr(model.embeddings, "config", None)
        if emb_config is not None:
            emb_config.mask_ratio = 0.0
        model.layernorm = nn.Identity()  # spec: tokens after the last block, without the final norm
    interp = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
    return model, fp, int(config.hidden_size), prefix, _config_patch(config), interp


def _use_antialiased_pos_resampling(embeddings: nn.Module, num_prefix: int) -> None:
    """Make an HF embeddings module resample its ``position_embeddings`` like the reference (timm, antialiased)."""
    from timm.layers import resample_abs_pos_embed

    patch = embeddings.patch_embeddings.patch_size
    ph, pw = (patch, patch) if isinstance(patch, int) else (int(patch[0]), int(patch[1]))

    def interpolate_pos_encoding(self, embeddings_: Tensor, height: int, width: int) -> Tensor:
        pos = self.position_embeddings
        return resample_abs_pos_embed(pos, [height // ph, width // pw], num_prefix_tokens=num_prefix).to(pos.dtype)

    embeddings.interpolate_pos_encoding = types.MethodType(interpolate_pos_encoding, embeddings)


def _load_hf_generic(spec: EncoderSpec, path):
    from transformers import AutoImageProcessor, AutoModel

    src = _hf_source(spec, path)
    model = _hf_from_pretrained(AutoModel.from_pretrained, spec, src)
    vision = getattr(model, "vision_model", None)  # CLIPModel / SiglipModel checkpoints: keep the image tower
    if isinstance(vision, nn.Module):
        model = vision
    fp = _fingerprint(model)
    config = model.config
    # prefix tokens: CLS (or CLIP's class embedding), DeiT's distillation token, DINOv2-style registers
    leaves = {n.rsplit(".", 1)[-1] for n, _ in model.named_parameters()}
    prefix = int(getattr(config, "num_register_tokens", 0) or 0)
    prefix += int(bool(leaves & {"cls_token", "class_embedding"})) + int("distillation_token" in leaves)
    mean, std, resize = IMAGENET_MEAN, IMAGENET_STD, None
    try:
        with _quiet_transformers():
            proc = AutoImageProcessor.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError, KeyError, ImportError):
        proc = None
    if proc is not None:
        if getattr(proc, "image_mean", None) is not None and getattr(proc, "image_std", None) is not None:
            mean = tuple(float(v) for v in _as3(proc.image_mean))
            std = tuple(float(v) for v in _as3(proc.image_std))
        resize = _processor_size(proc)
    spec = EncoderSpec(spec.name, "hf", mean, std, resize, False, spec.hub_id)
    interp = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
    dim = getattr(config, "hidden_size", None)
    if dim is None:
        sizes = getattr(config, "hidden_sizes", None)
        dim = sizes[-1] if sizes else 0
    return model, fp, int(dim), prefix, _config_patch(config), spec, interp


def _as3(v) -> tuple[float, float, float]:
    v = list(v) if isinstance(v, (list, tuple)) else [v] * 3
    return tuple(v * 3)[:3] if len(v) == 1 else tuple(v[:3])


def _processor_size(proc) -> int | None:
    """Final square side of an HF image processor (the crop if it centre-crops, else the resize target)."""
    for attr, flag in (("crop_size", "do_center_crop"), ("size", "do_resize")):
        size = getattr(proc, attr, None)
        if size is None or not getattr(proc, flag, True):
            continue
        if isinstance(size, int):
            return size
        size = dict(size)
        for key in ("height", "shortest_edge", "width"):
            if size.get(key):
                return int(size[key])
    return None


# ------------------------------------------------------------------------------------------------- timm families


def _read_state_dict(file: Path, name: str) -> dict[str, Tensor]:
    """A flat ``{key: tensor}`` dict from a ``.safetensors`` or (weights-only) torch checkpoint."""
    if not file.is_file():
        raise EncoderWeightsNotFoundError(f"encoder '{name}': checkpoint file {file} does not exist")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        obj = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:  # any parse failure becomes one clear message naming the file
        raise CheckpointError(f"encoder '{name}': cannot read checkpoint {file}: {e}") from e
    for key in ("state_dict", "model", "encoder"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"encoder '{name}': {file} does not hold a state dict of tensors")
    return dict(obj)


def _strict_load(model: nn.Module, state: dict[str, Tensor], file: Path, name: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"encoder '{name}': checkpoint {file} does not fit the architecture: "
            f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if state[k].shape != own[k].shape]
    if bad:
        raise CheckpointError(f"encoder '{name}': checkpoint {file} has wrong shapes (file vs model): {bad[:8]}")
    model.load_state_dict(state, strict=True)


def _sincos_pos_embed(grid: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """MoCo v3's fixed 2-D sin-cos table ``(1, 1 + grid², dim)``, zero row for CLS.

    Token k (row-major) gets ``[sin(r·ω), cos(r·ω), sin(c·ω), cos(c·ω)]`` with r = k // grid, c = k % grid and
    ω_i = temperature^(−i / (dim/4)).
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    r = rows.flatten()[:, None] * omega[None]
    c = cols.flatten()[:, None] * omega[None]
    table = torch.cat([torch.sin(r), torch.cos(r), torch.sin(c), torch.cos(c)], dim=1)
    return torch.cat([torch.zeros(1, dim), table], dim=0)[None]


def _mocov3_vit(name: str) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    arch = _MOCOV3_ARCH[name]
    model = VisionTransformer(
        img_size=256,
        patch_size=16,
        mlp_ratio=4,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_classes=0,
        dynamic_img_size=True,
        **arch,
    )
    grid = 256 // 16
    model.pos_embed = nn.Parameter(_sincos_pos_embed(grid, arch["embed_dim"]), requires_grad=False)
    return model


def _fix_mocov3_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """RCG/MoCo v3 checkpoint → timm ViT keys (the reference's ``fix_mocov3_state_dict``).

    Keeps ``module.base_encoder.*`` (if the prefix is present at all), strips the prefix, fixes the
    ``norm13/fc13/norm14/fc14`` naming bug, and drops the projection head (``head*``, ``fc.*``).
    """
    prefixed = any(k.startswith(_MOCOV3_PREFIX) for k in state)
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        if prefixed:
            if not k.startswith(_MOCOV3_PREFIX):
                continue
            k = k[len(_MOCOV3_PREFIX) :]
        for marker, old, new in _MOCOV3_RENAMES:
            if marker in k:
                k = k.replace(old, new)
        if "head" in k or k.split(".")[0] == "fc":
            continue
        out[k] = v
    return out


def _resample_pos_to_model(state: dict[str, Tensor], model: nn.Module) -> None:
    pos = getattr(model, "pos_embed", None)
    if pos is None or "pos_embed" not in state or state["pos_embed"].shape == pos.shape:
        return
    from timm.layers import resample_abs_pos_embed

    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None:
        return
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    grid = list(grid)
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], grid, num_prefix_tokens=prefix)


def _load_mocov3(spec: EncoderSpec, path) -> tuple[nn.Module, str, int, int, int]:
    if path is None:
        c = spec.name.rsplit("-", 1)[-1]
        raise _not_found(
            spec.name,
            "<no path given>",
            None,
            f"MoCo v3 weights are not on the Hugging Face hub; pass path= to the RCG release checkpoint "
            f"mocov3_vit{c}.pth (REPA's ckpts/mocov3_vit{c}.pth, see github.com/LTH14/rcg)",
        )
    file = Path(path).expanduser()
    if not file.is_file():
        raise _not_found(spec.name, str(file), None, "pass path= to the RCG MoCo v3 checkpoint (.pth)")
    model = _mocov3_vit(spec.name)
    state = _fix_mocov3_state_dict(_read_state_dict(file, spec.name))
    _resample_pos_to_model(state, model)
    _strict_load(model, state, file, spec.name)
    model.pos_embed.requires_grad_(False)
    return model, _fingerprint(model), int(model.embed_dim), int(model.num_prefix_tokens), 16


def _load_timm(spec: EncoderSpec, path):
    import timm

    model_name = spec.name[len("timm:") :]
    try:
        model = timm.create_model(model_name, pretrained=False, num_classes=0, dynamic_img_size=True)
    except TypeError:  # not a ViT-style model
        model = timm.create_model(model_name, pretrained=False, num_classes=0)
    except RuntimeError as e:
        raise ConfigError(f"encoder '{spec.name}': timm cannot build '{model_name}': {e}") from e
    if path is not None:
        file = Path(path).expanduser()
        if not file.exists():
            raise _not_found(spec.name, str(file), None, "pass path= to a .safetensors or .pth file")
        state = _read_state_dict(file, spec.name)
        own = model.state_dict()
        classifiers = model.pretrained_cfg.get("classifier") or ()
        classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
        for k in list(state):  # the model is built headless: drop classifier weights it does not have
            if k not in own and any(k.startswith(c + ".") for c in classifiers):
                del state[k]
        _resample_pos_to_model(state, model)
        _strict_load(model, state, file, spec.name)
    cfg = model.pretrained_cfg
    mean = tuple(float(v) for v in _as3(cfg.get("mean", IMAGENET_MEAN)))
    std = tuple(float(v) for v in _as3(cfg.get("std", IMAGENET_STD)))
    spec = EncoderSpec(spec.name, "timm", mean, std, None, False, None)
    patch_embed = getattr(model, "patch_embed", None)
    patch = getattr(patch_embed, "patch_size", None)
    patch = int(patch[0]) if isinstance(patch, (tuple, list)) else patch
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    return model, _fingerprint(model), int(model.num_features), prefix, patch, spec


# ------------------------------------------------------------------------------------------------- fingerprint


def _fingerprint(model: nn.Module) -> str:
    """sha256 over the weights: for each state entry (sorted by name) its name, shape and fp32 bytes."""
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu")
        if t.is_floating_point():
            t = t.float()
        t = t.contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()
