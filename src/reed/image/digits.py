"""The embedded default dataset: scikit-learn's handwritten digits (ships offline with scikit-learn).

1797 real 8×8 grey-scale images of the digits 0–9, pixel values 0..16 (integers, ink = high).
"""

from __future__ import annotations

import numpy as np

DIGIT_NAMES: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)  # fmt: skip

#: Largest raw pixel value in ``sklearn.datasets.load_digits``.
DIGITS_MAX_VALUE = 16.0


def load_digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """Raw digits: images float32 ``(N, 8, 8)`` with values 0..16, labels int64 ``(N,)``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)
    labels = np.asarray(bunch.target, dtype=np.int64)
    return images, labels


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Digits ready for a model.

    Returns:
        images: float32 ``(N, 1, 8, 8)`` scaled to [-1, 1] by ``x / 8 - 1`` (0 → -1, 16 → +1).
        labels: int64 ``(N,)`` in 0..9 (index into :data:`DIGIT_NAMES`).
    """
    raw, labels = load_digits_raw()
    images = (raw / (DIGITS_MAX_VALUE / 2.0) - 1.0).astype(np.float32)[:, None]
    return np.ascontiguousarray(images), labels
