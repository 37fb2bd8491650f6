"""The image domain's config section (``image:``): data, SiT model, flow process, sampler, encoder fitting."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from reed.errors import ConfigError

# targets.<i>.source values of image runs; the ones that read a file or directory need targets.<i>.path
TARGET_SOURCES = ("fitted_encoder", "caption_text", "file", "store", "encoder", "vlm")
PATH_SOURCES = ("fitted_encoder", "file", "store")
# top-level keys of the layout before domain sections (they now live under image:)
LEGACY_KEYS = ("data", "model", "process", "sample", "fit")


@dataclass
class DataConfig:
    """Where the training examples come from.

    ``name='digits'``: the embedded default, ``sklearn.datasets.load_digits`` (1797 real 8x8 digits, 10 classes).
    ``name='npz'``: a user file with ``images`` (N,H,W[,C]) uint8 or (N,C,H,W) float in [-1,1] and ``labels`` (N,).
    ``name='images'``: a directory written by ``reed prepare images`` (uint8 shards), trained in pixel space.
    ``name='latents'``: a directory written by ``reed prepare latents`` (VAE posterior mean/std, resampled each step).
    """

    name: Literal["digits", "npz", "images", "latents"] = "digits"
    path: str | None = None


@dataclass
class ModelConfig:
    """SiT denoiser. ``preset`` names a size (``SiT-XL/2`` ... ``SiT-T/2``); explicit fields override it.

    ``input_size``, ``in_channels`` and ``num_classes`` are filled from the data when left ``None``.
    """

    preset: str = "SiT-T/2"
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    mlp_ratio: float = 4.0
    qk_norm: bool = False
    fused_attn: bool = True
    input_size: int | None = None
    in_channels: int | None = None
    num_classes: int | None = None


@dataclass
class ProcessConfig:
    """Continuous flow process (t=0 data, t=1 noise)."""

    path: Literal["linear", "cosine"] = "linear"
    time_sampling: Literal["uniform", "lognormal"] = "uniform"
    lognormal_mean: float = 0.0
    lognormal_std: float = 1.0
    label_dropout: float = 0.1


@dataclass
class SampleConfig:
    """Sampler used for in-training previews and ``reed sample`` defaults."""

    sampler: Literal["euler", "heun", "sde"] = "euler"
    steps: int = 50
    cfg_scale: float = 1.0
    guidance_low: float = 0.0
    guidance_high: float = 1.0


@dataclass
class FitConfig:
    """``reed fit-encoder``: a small CNN fitted with VICReg on the training images (for ``fitted_encoder`` targets)."""

    dim: int = 64
    width: int = 64
    downsample: int = 1
    steps: int = 300
    batch_size: int = 256
    lr: float = 1e-3


@dataclass
class ImageConfig:
    """Everything specific to class-conditional image generation (``domain: image``)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    process: ProcessConfig = field(default_factory=ProcessConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    fit: FitConfig = field(default_factory=FitConfig)


def validate_image(cfg) -> None:
    """Cross-field checks of the ``image:`` section and of the targets an image run reads."""
    im: ImageConfig = cfg.image
    if not 0.0 <= im.process.label_dropout < 1.0:
        raise ConfigError(f"config key 'image.process.label_dropout' must be in [0, 1), got {im.process.label_dropout}")
    s = im.sample
    if not 0.0 <= s.guidance_low <= s.guidance_high <= 1.0:
        raise ConfigError(f"image.sample.guidance_low/high must satisfy 0 <= low <= high <= 1, got {s.guidance_low}, "
                          f"{s.guidance_high}")
    for i, tg in enumerate(cfg.targets):
        if tg.source in PATH_SOURCES and not tg.path:
            raise ConfigError(f"config key 'targets.{i}.path' is required for source '{tg.source}'")
