"""The image domain's config section (``image:``): data, SiT model, flow process, sampler, encoder fitting."""

from __future__ import annotations

import math
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
    ``name='shapes'``: the procedural world of :mod:`reed.image.shapes` (the yardstick's data): ``size`` images of
    its training range drawn with ``seed`` at ``resolution`` (16 or 32), generated on the fly.
    """

    name: Literal["digits", "npz", "images", "latents", "shapes"] = "digits"
    path: str | None = None
    size: int = 4000
    seed: int = 0
    resolution: int = 16


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
    """Sampler used for in-training previews and ``reed sample`` defaults.

    ``protocol`` is ``reed sample``'s default (``--protocol`` overrides it): ``reed`` (class-balanced labels, the
    run's VAE, pixels rounded) or ``paper`` (the reference generate.py: random labels, ``sd-vae-ft-ema``, pixels
    truncated); see :mod:`reed.image.generate`.
    """

    sampler: Literal["euler", "heun", "sde"] = "euler"
    steps: int = 50
    cfg_scale: float = 1.0
    guidance_low: float = 0.0
    guidance_high: float = 1.0
    protocol: Literal["reed", "paper"] = "reed"
    #: REG models only: the guidance scale of the generated representation token (null: cfg_scale; 0: its
    #: conditional drift alone); it applies only while the image is guided (cfg_scale > 1)
    cls_cfg_scale: float | None = None


@dataclass
class FitConfig:
    """``reed fit-encoder``: a small CNN fitted with VICReg (for ``fitted_encoder`` targets), on the training images
    or, with ``world_size`` > 0 and a procedural world (``image.data.name=shapes``), on that many images of the
    world's own encoder-fitting range (disjoint from the training images: an encoder that knows more than the
    generator's data, as a pretrained one does)."""

    dim: int = 64
    width: int = 64
    downsample: int = 1
    steps: int = 300
    batch_size: int = 256
    lr: float = 1e-3
    world_size: int = 0


@dataclass
class ImageConfig:
    """Everything specific to class-conditional image generation (``domain: image``)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    process: ProcessConfig = field(default_factory=ProcessConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    fit: FitConfig = field(default_factory=FitConfig)


SAMPLE_KEYS = ("config key 'image.sample.cfg_scale'", "config key 'image.sample.guidance_low'",
               "config key 'image.sample.guidance_high'")


def check_cls_cfg(value: float | None, name: str) -> None:
    """REG's ``cls_cfg_scale``: None, 0 (the token's conditional drift alone) or a finite number > 0."""
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{name} must be a finite number >= 0 (0: the representation token is not guided), "
                          f"got {value}")


def check_guidance(cfg_scale: float, low: float, high: float, names: tuple[str, str, str] = SAMPLE_KEYS) -> None:
    """Refuse classifier-free guidance settings the sampler cannot honour; ``names`` name the three values (config
    keys or ``reed sample`` flags) in the message.

    ``cfg_scale`` must be finite and >= 1 (guidance is applied only above 1, so a smaller value would silently mean
    none); the guidance interval ``low <= t <= high`` lies in the flow's time [0, 1] (0 = data, 1 = noise) and must
    not be empty (``low <= high``)."""
    if not (math.isfinite(cfg_scale) and cfg_scale >= 1.0):
        raise ConfigError(f"{names[0]} must be a finite number >= 1 (1 = no guidance; guidance applies only above 1), "
                          f"got {cfg_scale}")
    for name, v in ((names[1], low), (names[2], high)):
        if not 0.0 <= v <= 1.0:  # also NaN
            raise ConfigError(f"{name} must be in [0, 1] (a time of the flow: 0 = data, 1 = noise), got {v}")
    if low > high:
        raise ConfigError(f"{names[1]} ({low}) is above {names[2]} ({high}): the guidance interval low <= t <= high "
                          "would be empty")


def validate_image(cfg) -> None:
    """Cross-field checks of the ``image:`` section and of the targets an image run reads."""
    im: ImageConfig = cfg.image
    if not 0.0 <= im.process.label_dropout < 1.0:
        raise ConfigError(f"config key 'image.process.label_dropout' must be in [0, 1), got {im.process.label_dropout}")
    s = im.sample
    check_guidance(s.cfg_scale, s.guidance_low, s.guidance_high)
    check_cls_cfg(s.cls_cfg_scale, "config key 'image.sample.cls_cfg_scale'")
    for i, tg in enumerate(cfg.targets):
        if tg.source in PATH_SOURCES and not tg.path:
            raise ConfigError(f"config key 'targets.{i}.path' is required for source '{tg.source}'")
