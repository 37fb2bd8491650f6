"""Tests of reed.image.targets.captions: hand-checked attributes and the captions built from them."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest

from reed.image.digits import DIGIT_NAMES, load_digits_raw
from reed.image.targets.captions import THRESHOLDS, attribute_words, caption_dataset, caption_digit, digit_attributes


def _canvas() -> np.ndarray:
    return np.zeros((8, 8), dtype=np.float64)


def test_attributes_of_a_vertical_bar():
    img = _canvas()
    img[1:7, 3] = 16.0  # rows 1..6 in column 3
    a = digit_attributes(img)
    assert a["mass"] == pytest.approx(6 * 16 / (64 * 16))
    assert (a["height"], a["width"]) == (6, 1)
    assert a["centroid"] == pytest.approx((3.5, 3.0))
    assert a["slant"] == 0.0
    assert a["aspect"] == pytest.approx(6.0)
    assert a["offset"] == pytest.approx(3.0 - 3.5)


def test_slant_sign_convention():
    right, left = _canvas(), _canvas()
    for r in range(1, 6):
        right[r, 6 - r] = 16.0  # "/": going down, the stroke moves left → top leans right
        left[r, r + 1] = 16.0  # "\"
    assert digit_attributes(right)["slant"] == pytest.approx(1.0)
    assert digit_attributes(left)["slant"] == pytest.approx(-1.0)
    assert "slanting to the right" in caption_digit(right, 1)
    assert "slanting to the left" in caption_digit(left, 1)


def test_weighted_centroid_threshold_bbox_and_max_value():
    img = _canvas()
    img[2, 0] = 16.0
    img[2, 3] = 8.0
    img[5, 6] = 3.0  # below the bbox threshold (4): counts as ink, not in the bounding box
    a = digit_attributes(img)
    total = 16 + 8 + 3
    assert a["mass"] == pytest.approx(total / (64 * 16))
    assert a["centroid"] == pytest.approx(((2 * 24 + 5 * 3) / total, (3 * 8 + 6 * 3) / total))
    assert (a["height"], a["width"]) == (1, 4)
    assert digit_attributes(img, max_value=1.0)["mass"] == pytest.approx(total / 64)
    assert digit_attributes(img, threshold=2.0)["height"] == 4  # rows 2..5 once the faint pixel counts


def test_empty_image_and_bad_input():
    a = digit_attributes(_canvas())
    assert a["mass"] == 0.0 and a["height"] == 0 and a["width"] == 0 and a["slant"] == 0.0
    assert a["centroid"] == (3.5, 3.5)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        digit_attributes(np.zeros((1, 8, 8)))
    with pytest.raises(ValueError, match=">= 0"):
        digit_attributes(-np.ones((8, 8)))
    with pytest.raises(ValueError, match="0..9"):
        caption_digit(_canvas(), 10)


def test_caption_mentions_class_and_depends_on_attributes():
    thin, thick = _canvas(), _canvas()
    thin[0:8, 3:5] = 16.0  # mass 0.25 → thin; width 2 → tall and narrow
    thick[0:8, 1:7] = 16.0  # mass 0.75 → thick; width 6 → wide
    c_thin, c_thick = caption_digit(thin, 7), caption_digit(thick, 7)
    assert c_thin.startswith("a handwritten digit seven, ")
    assert "thin strokes" in c_thin and "tall and narrow" in c_thin
    assert "thick strokes" in c_thick and "wide" in c_thick
    assert c_thin != c_thick
    assert caption_digit(thin, 7) == c_thin  # deterministic
    assert caption_digit(thin, 3).startswith("a handwritten digit three, ")
    assert c_thin.endswith(".")


def test_offset_words():
    img = _canvas()
    img[:, 1] = 16.0
    assert "placed left of centre" in caption_digit(img, 1)
    img = _canvas()
    img[:, 6] = 16.0
    assert "placed right of centre" in caption_digit(img, 1)
    img = _canvas()
    img[:, 3:5] = 16.0
    assert ", centred." in caption_digit(img, 1)


def test_caption_dataset_on_real_digits():
    x, y = load_digits_raw()
    caps = caption_dataset(x, y)
    assert len(caps) == len(y) == 1797
    for c, label in zip(caps, y):
        assert c.startswith(f"a handwritten digit {DIGIT_NAMES[label]}, ")
    assert caption_dataset(x[:, None][:5], y[:5]) == caps[:5]  # (N, 1, H, W) accepted
    assert len(set(caps)) > 200  # the attributes carry information beyond the class
    # the thresholds come from this data: every word of every attribute occurs
    words = {w for img in x for w in attribute_words(digit_attributes(img))}
    assert len(words) == 3 * len(THRESHOLDS)
    with pytest.raises(ValueError, match="labels"):
        caption_dataset(x[:3], y[:2])
