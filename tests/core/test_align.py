import math

import pytest
import torch

from reed.align import Projector, masked_mean, negative_cosine, resample_tokens


def test_negative_cosine_hand_values():
    pred = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [3.0, 0.0]]])
    target = torch.tensor([[[2.0, 0.0], [0.0, -1.0]], [[1.0, 0.0], [1.0, 0.0]]])
    # sample 0: cos = 1 and -1 -> mean 0; sample 1: cos = 1/sqrt2 and 1 -> mean (1/sqrt2 + 1)/2
    out = negative_cosine(pred, target)
    assert out.shape == (2,)
    assert torch.allclose(out, torch.tensor([0.0, -(1 / math.sqrt(2) + 1) / 2]))


def test_negative_cosine_pooled_and_mask():
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert negative_cosine(p, z).tolist() == [-1.0, 0.0]
    pred = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    mask = torch.tensor([[True, False]])
    assert negative_cosine(pred, target, mask).item() == pytest.approx(-1.0)


def test_negative_cosine_is_fp32_under_bf16():
    p = torch.randn(4, 16, 32).bfloat16() * 1e-3
    z = torch.randn(4, 16, 32).bfloat16()
    out = negative_cosine(p, z)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="shape"):
        negative_cosine(torch.zeros(2, 3), torch.zeros(2, 4))


def test_masked_mean():
    h = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert masked_mean(h).item() == pytest.approx(104 / 3)
    assert masked_mean(h, torch.tensor([[1, 1, 0]])).item() == pytest.approx(2.0)


def test_resample_tokens_area_and_identity():
    z = torch.arange(16.0).reshape(1, 16, 1)  # 4x4 grid, row-major
    down = resample_tokens(z, 4)
    # 2x2 area means of the 4x4 grid
    assert down[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]
    assert resample_tokens(z, 16) is z
    up = resample_tokens(torch.ones(2, 4, 3), 16)
    assert up.shape == (2, 16, 3) and torch.allclose(up, torch.ones_like(up))
    with pytest.raises(ValueError, match="not a square"):
        resample_tokens(torch.zeros(1, 6, 2), 4)


def test_projector_shapes():
    proj = Projector(8, 5, hidden=16)
    assert proj(torch.randn(3, 7, 8)).shape == (3, 7, 5)
    assert proj(torch.randn(3, 8)).shape == (3, 5)
