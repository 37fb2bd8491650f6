"""reed.geometry: centring, Kabsch (proper rotations, weights/masks, batching) and RMSD, on real numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from reed.geometry import center, centroid, kabsch, rmsd, superpose


def _cloud(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(scale=3.0, size=(n, 3))


def test_kabsch_recovers_known_rotation_and_translation():
    P = _cloud(25, 0)
    R0 = Rotation.random(random_state=7).as_matrix()
    t0 = np.array([4.0, -2.5, 10.0])
    Q = P @ R0.T + t0
    R, t = kabsch(P, Q)
    assert isinstance(R, np.ndarray) and R.dtype == np.float64 and R.shape == (3, 3) and t.shape == (3,)
    np.testing.assert_allclose(R, R0, atol=1e-12)
    np.testing.assert_allclose(t, t0, atol=1e-12)
    np.testing.assert_allclose(superpose(P, Q), Q, atol=1e-12)
    # torch in -> torch out in the input's dtype; float64 arithmetic inside
    Rt, tt = kabsch(torch.tensor(P, dtype=torch.float32), torch.tensor(Q, dtype=torch.float32))
    assert Rt.dtype == torch.float32 and tt.dtype == torch.float32
    np.testing.assert_allclose(Rt.numpy(), R0, atol=1e-5)
    np.testing.assert_allclose(tt.numpy(), t0, atol=1e-4)


def test_kabsch_batched_with_broadcast_weights():
    Ps = np.stack([_cloud(12, s) for s in range(4)])  # (4, 12, 3)
    R0 = Rotation.random(4, random_state=1).as_matrix()
    t0 = np.random.default_rng(2).normal(size=(4, 3))
    Qs = np.einsum("bij,bnj->bni", R0, Ps) + t0[:, None, :]
    R, t = kabsch(Ps, Qs)
    assert R.shape == (4, 3, 3) and t.shape == (4, 3)
    np.testing.assert_allclose(R, R0, atol=1e-12)
    np.testing.assert_allclose(t, t0, atol=1e-12)
    # one pair (N, 3), S weightings (S, N): S fits at once, each equal to the fit with that weighting alone
    P, Q = Ps[0], Qs[0] + np.random.default_rng(3).normal(scale=0.3, size=(12, 3))
    W = np.random.default_rng(4).uniform(0.0, 2.0, size=(3, 12))
    RW, tW = kabsch(P, Q, W)
    assert RW.shape == (3, 3, 3)
    for s in range(3):
        Rs, ts = kabsch(P, Q, W[s])
        np.testing.assert_allclose(RW[s], Rs, atol=1e-12)
        np.testing.assert_allclose(tW[s], ts, atol=1e-12)


def test_reflected_points_give_a_proper_rotation():
    P = _cloud(30, 5)
    Q = P * np.array([1.0, 1.0, -1.0])  # a mirror image: the best orthogonal fit is the reflection itself
    R, t = kabsch(P, Q)
    assert np.linalg.det(R) == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
    # no proper rotation superposes a chiral cloud on its mirror image, and this one is the best among them:
    best = float(rmsd(P, Q))
    assert best > 0.5
    assert best == pytest.approx(math.sqrt(((P @ R.T + t - Q) ** 2).sum(1).mean()), rel=1e-12)
    for seed in range(20):
        Rr = Rotation.random(random_state=seed).as_matrix()
        Pr = P @ Rr.T
        Pr = Pr - Pr.mean(0) + Q.mean(0)
        assert math.sqrt(((Pr - Q) ** 2).sum(1).mean()) >= best - 1e-9


def test_weights_and_masks_ignore_masked_points():
    P = _cloud(20, 8)
    R0 = Rotation.random(random_state=9).as_matrix()
    Q = P @ R0.T + np.array([1.0, 2.0, 3.0])
    Pbad = P.copy()
    Pbad[:6] = np.nan  # masked points may hold anything, NaN included
    Qbad = Q.copy()
    Qbad[:6] += 50.0
    mask = np.ones(20, dtype=bool)
    mask[:6] = False
    R, t = kabsch(Pbad, Qbad, mask)
    np.testing.assert_allclose(R, R0, atol=1e-12)
    np.testing.assert_allclose((P @ R.T + t)[6:], Q[6:], atol=1e-12)
    Rw, tw = kabsch(Pbad, Qbad, mask.astype(float))  # 0/1 weights == bool mask
    np.testing.assert_allclose(Rw, R, atol=1e-14)
    assert float(rmsd(Pbad, Qbad, mask)) < 1e-12
    # torch, batched, padded: padding rows ignored, an empty set gets the identity
    Pt = torch.tensor(np.stack([Pbad, Pbad]))
    Qt = torch.tensor(np.stack([Qbad, Qbad]))
    mt = torch.tensor(np.stack([mask, np.zeros(20, bool)]))
    Rt, tt = kabsch(Pt, Qt, mt)
    np.testing.assert_allclose(Rt[0].numpy(), R0, atol=1e-12)
    assert torch.equal(Rt[1], torch.eye(3, dtype=torch.float64))
    assert torch.equal(tt[1], torch.zeros(3, dtype=torch.float64))


def test_weighted_fit_matches_duplicated_points():
    # integer weights are the same as repeating points: weight 3 on point k == point k three times
    P = _cloud(10, 11)
    Q = _cloud(10, 12)
    w = np.array([1, 3, 1, 2, 1, 1, 4, 1, 1, 2], dtype=float)
    R, t = kabsch(P, Q, w)
    rep = np.repeat(np.arange(10), w.astype(int))
    Rr, tr = kabsch(P[rep], Q[rep])
    np.testing.assert_allclose(R, Rr, atol=1e-12)
    np.testing.assert_allclose(t, tr, atol=1e-12)
    assert float(rmsd(P, Q, w)) == pytest.approx(float(rmsd(P[rep], Q[rep])), rel=1e-12)


def test_rmsd_rotated_copy_and_hand_computed_cases():
    P = _cloud(40, 13)
    R0 = Rotation.random(random_state=14).as_matrix()
    assert float(rmsd(P @ R0.T - 7.0, P)) < 1e-12
    assert float(rmsd(P @ R0.T - 7.0, P, align=False)) > 5.0
    # without alignment: one of four points moved by (0, 3, 4) (length 5): sqrt(25 / 4) = 2.5
    A = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    B = A.copy()
    B[2] += [0.0, 3.0, 4.0]
    assert float(rmsd(A, B, align=False)) == pytest.approx(2.5, rel=1e-14)
    assert float(rmsd(A[::-1], B[::-1], align=False)) == pytest.approx(2.5, rel=1e-14)  # negative strides work
    # weighted, unaligned: sqrt(w2 * 25 / sum w) with weights (1, 1, 2, 0) -> sqrt(50 / 4)
    assert float(rmsd(A, B, np.array([1.0, 1, 2, 0]), align=False)) == pytest.approx(math.sqrt(12.5), rel=1e-14)
    # aligned: two points at +-d along x against two points at +-e along x -> best fit leaves |d - e| on each
    X = np.array([[-2.0, 0, 0], [2.0, 0, 0]])
    Y = np.array([[-3.5, 1, 1], [3.5, 1, 1]])
    assert float(rmsd(X, Y)) == pytest.approx(1.5, rel=1e-12)
    # a pure translation: aligned 0, unaligned its length
    assert float(rmsd(P + [2.0, 3.0, 6.0], P, align=False)) == pytest.approx(7.0, rel=1e-12)
    assert float(rmsd(P + [2.0, 3.0, 6.0], P)) < 1e-12
    # torch batch
    out = rmsd(torch.tensor(np.stack([A, A])), torch.tensor(np.stack([B, A])), align=False)
    assert out.shape == (2,) and out[0].item() == pytest.approx(2.5) and out[1].item() == 0.0


def test_center_and_centroid():
    x = torch.tensor([[[1.0, 2, 3], [3, 4, 5], [100, 100, 100]]])
    m = torch.tensor([[True, True, False]])
    c = center(x, m)
    assert torch.equal(c, torch.tensor([[[-1.0, -1, -1], [1, 1, 1], [0, 0, 0]]]))
    assert c.dtype == torch.float32
    assert torch.equal(center(x, torch.zeros(1, 3, dtype=torch.bool)), torch.zeros(1, 3, 3))
    xn = np.array([[0.0, 0, 0], [2, 4, 6]])
    np.testing.assert_array_equal(center(xn), [[-1.0, -2, -3], [1, 2, 3]])
    np.testing.assert_allclose(centroid(xn, np.array([3.0, 1.0])), [0.5, 1.0, 1.5])
    np.testing.assert_allclose(centroid(x, m).numpy(), [[2.0, 3.0, 4.0]])


def test_kabsch_without_centring_fits_rotation_only():
    P = _cloud(15, 20)
    P = P - P.mean(0)
    R0 = Rotation.random(random_state=21).as_matrix()
    R, t = kabsch(P, P @ R0.T, center=False)
    np.testing.assert_allclose(R, R0, atol=1e-12)
    assert np.all(t == 0)
    # off-centre input: center=False does not remove the offset, so it differs from the centred fit
    R_off, _ = kabsch(P + 5.0, P @ R0.T + 5.0, center=False)
    assert np.abs(R_off - R0).max() > 1e-3
