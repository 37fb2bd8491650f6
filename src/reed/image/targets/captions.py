"""A synthetic modality for the digits: a caption per image, from its class and measured attributes.

REED aligns the denoiser with representations of a *synthetic modality* paired with each example (in the
paper, a VLM caption embedded by a VLM). For the embedded 8×8 digits there is no VLM; instead each image gets
a rule-based caption built from its label and four hand-checkable measurements (:func:`digit_attributes`),
which a real sentence encoder (:mod:`reed.image.targets.text`) then embeds. Example::

    "a handwritten digit seven, drawn with thin strokes, slanting to the right, tall and narrow,
     placed left of centre."

Coordinates: ``row`` grows downwards (row 0 is the top), ``col`` grows to the right (col 0 is the left).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from reed.image.digits import DIGIT_NAMES

__all__ = [
    "DIGIT_NAMES",
    "THRESHOLDS",
    "attribute_words",
    "caption_dataset",
    "caption_digit",
    "digit_attributes",
]

#: Thresholds that turn attributes into words, chosen from the 1797 scikit-learn digits (rounded; the
#: fractions of the data in each bucket are given). Each pair ``(lo, hi)`` gives three words:
#: ``value < lo``, ``lo <= value <= hi``, ``value > hi``.
#:
#: - ``mass``: terciles (0.288, 0.321) → thin / medium / thick strokes (≈ 1/3 each).
#: - ``slant``: symmetric ±0.1 → slanting to the left / upright / slanting to the right (31% / 56% / 13%).
#: - ``aspect`` (height / width): every digit is 8 px tall at threshold 4 (the data are size-normalised), so
#:   this is 8 / width: > 1.7 (width ≤ 4) / 1.5–1.7 (width 5) / < 1.5 (width ≥ 6) → tall and narrow / of
#:   medium width / wide (11% / 36% / 53%).
#: - ``offset`` (centroid column minus the centre column, pixels): symmetric ±0.2 → placed left of centre /
#:   centred / placed right of centre (18% / 51% / 31%).
THRESHOLDS: dict[str, tuple[float, float]] = {
    "mass": (0.29, 0.32),
    "slant": (-0.1, 0.1),
    "aspect": (1.5, 1.7),
    "offset": (-0.2, 0.2),
}

_WORDS: dict[str, tuple[str, str, str]] = {
    "mass": ("drawn with thin strokes", "drawn with medium strokes", "drawn with thick strokes"),
    "slant": ("slanting to the left", "upright", "slanting to the right"),
    "aspect": ("wide", "of medium width", "tall and narrow"),
    "offset": ("placed left of centre", "centred", "placed right of centre"),
}


def digit_attributes(image: np.ndarray, *, max_value: float = 16.0, threshold: float = 4.0) -> dict:
    """Measured attributes of one grey-scale image ``(H, W)`` in raw ink units (≥ 0; 0 = background).

    With ink ``I[r, c]`` and ink-weighted means ``r̄, c̄`` over all pixels:

    - ``mass``: ``sum(I) / (H * W * max_value)`` — the fraction of the canvas covered by full-intensity ink.
    - ``centroid``: ``(r̄, c̄)`` in pixels (the image centre ``((H-1)/2, (W-1)/2)`` for an empty image).
    - ``slant``: ``-Cov(c, r) / Var(r)`` with ink-weighted moments — minus the regression slope of column on
      row, i.e. horizontal pixels gained per pixel of height going *up*. Positive = the top leans right
      (``/``, "slanting to the right"), negative = the top leans left (``\\``); 0 if ``Var(r) = 0`` or no ink.
    - ``height``, ``width``: extent in pixels of the bounding box of pixels with ``I > threshold``
      (``last - first + 1``; 0 if no pixel passes).
    - ``aspect``: ``height / width`` (0 if ``width == 0``).
    - ``offset``: ``c̄ - (W - 1) / 2``, the horizontal centroid offset in pixels (positive = right of centre).

    Returns:
        dict with float ``mass, slant, aspect, offset``, int ``height, width`` and tuple ``centroid``.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"digit_attributes expects one image (H, W), got shape {img.shape}")
    if np.any(img < 0):
        raise ValueError("digit_attributes expects raw ink units >= 0 (0..16 for the digits), got negatives")
    h, w = img.shape
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    total = img.sum()

    if total > 0:
        r_mean, c_mean = (img * rows).sum() / total, (img * cols).sum() / total
        var_r = (img * (rows - r_mean) ** 2).sum() / total
        cov_cr = (img * (rows - r_mean) * (cols - c_mean)).sum() / total
        slant = float(-cov_cr / var_r) if var_r > 1e-12 else 0.0
    else:
        r_mean, c_mean, slant = (h - 1) / 2.0, (w - 1) / 2.0, 0.0

    on_r, on_c = np.nonzero(img > threshold)
    height = int(on_r.max() - on_r.min() + 1) if on_r.size else 0
    width = int(on_c.max() - on_c.min() + 1) if on_c.size else 0
    return {
        "mass": float(total / (h * w * max_value)),
        "slant": slant + 0.0,  # + 0.0 turns -0.0 into 0.0
        "height": height,
        "width": width,
        "aspect": float(height / width) if width else 0.0,
        "centroid": (float(r_mean), float(c_mean)),
        "offset": float(c_mean - (w - 1) / 2.0),
    }


def _bucket(value: float, bounds: tuple[float, float]) -> int:
    lo, hi = bounds
    return 0 if value < lo else (2 if value > hi else 1)


def attribute_words(attrs: dict, thresholds: dict[str, tuple[float, float]] | None = None) -> list[str]:
    """The phrases for ``attrs`` (from :func:`digit_attributes`) in caption order: strokes, slant, shape,
    position. ``thresholds`` defaults to :data:`THRESHOLDS`."""
    th = THRESHOLDS if thresholds is None else thresholds
    return [_WORDS[k][_bucket(float(attrs[k]), th[k])] for k in ("mass", "slant", "aspect", "offset")]


def caption_digit(
    image: np.ndarray,
    label: int,
    *,
    max_value: float = 16.0,
    thresholds: dict[str, tuple[float, float]] | None = None,
) -> str:
    """Deterministic caption of one digit image ``(H, W)`` (raw ink units) with class ``label`` (0..9).

    E.g. ``"a handwritten digit seven, drawn with thin strokes, slanting to the right, tall and narrow,
    placed left of centre."``; the word thresholds are :data:`THRESHOLDS`.
    """
    label = int(label)
    if not 0 <= label < len(DIGIT_NAMES):
        raise ValueError(f"caption_digit: label must be in 0..9, got {label}")
    words = attribute_words(digit_attributes(image, max_value=max_value), thresholds)
    return f"a handwritten digit {DIGIT_NAMES[label]}, " + ", ".join(words) + "."


def caption_dataset(
    images: np.ndarray, labels: Sequence[int] | np.ndarray, *, max_value: float = 16.0
) -> list[str]:
    """Captions for images ``(N, H, W)`` (or ``(N, 1, H, W)``) in raw ink units and labels ``(N,)``."""
    imgs = np.asarray(images)
    if imgs.ndim == 4 and imgs.shape[1] == 1:
        imgs = imgs[:, 0]
    labels = np.asarray(labels)
    if imgs.ndim != 3 or labels.shape != (imgs.shape[0],):
        raise ValueError(
            f"caption_dataset expects images (N, H, W) and labels (N,), got {np.asarray(images).shape}, "
            f"{labels.shape}"
        )
    return [caption_digit(img, int(lab), max_value=max_value) for img, lab in zip(imgs, labels)]
