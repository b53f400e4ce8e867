"""What a backbone learned (common.inspect, common.evaluate's RankMe) and the report's wall time: the nearest
neighbours against features built so that the answer is known, RankMe against hand-computed values, the spectrum
of features whose centred spectrum is known, and the wall time of a run in parts. (The pictures end to end from a
real run's backbone.pt, and the collapse line of the real loop: tests/test_evaluation.py.)"""
import math

import pytest
import torch

from common import evaluate, inspect, report


def test_the_neighbours_are_the_nearest_by_cosine():
    """Memory on a circle at known angles, inside a random 16-D subspace, each row scaled by its own positive factor
    (cosine ignores it); the query at angle 0: the nearest are those of smallest |angle|, in that order. A search
    by dot product without normalising (the scales then win) or by Euclidean distance fails here."""
    g = torch.Generator().manual_seed(0)
    angles = torch.tensor([2.0, -0.1, 0.5, -1.2, 3.0, 0.3, -0.7, 1.6], dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(16, 2, generator=g, dtype=torch.float64))  # (16, 2) orthonormal
    scales = torch.tensor([9.0, 0.2, 5.0, 3.0, 7.0, 0.1, 4.0, 6.0], dtype=torch.float64)
    memory = scales[:, None] * (torch.stack([angles.cos(), angles.sin()], 1) @ basis.T)  # (8, 16)
    query = (torch.tensor([[1.0, 0.0]], dtype=torch.float64) @ basis.T) * 0.3
    sims, idx = inspect.nearest(query, memory, 5)
    expected = angles.abs().argsort()[:5]  # -0.1, 0.3, 0.5, -0.7, -1.2
    assert idx[0].tolist() == expected.tolist() == [1, 5, 2, 6, 3]
    torch.testing.assert_close(sims[0], angles[expected].cos(), rtol=0, atol=1e-12)  # float64 rounding only
    assert inspect.nearest(query, memory, 50)[1].shape == (1, 8)  # k larger than the memory: all of it


def test_one_query_per_class_drawn_by_the_seed():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    picks = inspect.one_per_class(labels, seed=0)
    assert labels[picks].tolist() == [0, 1, 2] and picks == inspect.one_per_class(labels, seed=0)
    assert any(inspect.one_per_class(labels, seed=s) != picks for s in range(1, 6))


def test_rankme_of_known_spectra():
    """RankMe = exp(-Σ p_k log p_k), p_k = σ_k / Σσ + ε (Garrido et al. 2023, Eq. 1), computed by hand: σ = (3, 2, 1)
    gives p = (1/2, 1/3, 1/6) and exp(H) = 2^(1/2) 3^(1/3) 6^(1/6); d equal values give d; one non-zero value (or
    none: a collapsed embedding) gives 1. The tolerances are ε's share: each p_k moves by 1e-7, which moves H by
    under d · 1e-7 · (1 + |log ε|) < 2e-6 · d, so exp(H) by that fraction of itself."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(50, 3, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(8, 3, generator=g, dtype=torch.float64))
    z = u @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ v.T  # (50, 8), singular values 3, 2, 1
    sigma = torch.linalg.svdvals(z)
    assert evaluate.rankme(sigma) == pytest.approx(2 ** 0.5 * 3 ** (1 / 3) * 6 ** (1 / 6), rel=2e-6 * 8)
    assert evaluate.rankme(torch.ones(64, dtype=torch.float64)) == pytest.approx(64, rel=2e-6 * 64)
    assert evaluate.rankme(torch.tensor([5.0] + [0.0] * 63)) == pytest.approx(1, rel=2e-6 * 64)
    assert evaluate.rankme(torch.zeros(64)) == pytest.approx(1, rel=2e-6 * 64)  # no spread at all: not NaN


def test_spectrum_is_of_the_centred_l2_normalised_features():
    """Rows that are the d one-hot vectors, each repeated m times and scaled by its own positive factor: once
    L2-normalised they are one-hot, and once centred their singular values are sqrt(m), d - 1 times, and 0 (the
    centring removes the mean direction), so RankMe is d - 1. Features that skip the normalisation or the centring
    give another spectrum. All rows alike up to float32 rounding (full collapse, as a network computes it) give
    RankMe 1: the rounding noise the centring leaves is not counted as spread."""
    d, m = 6, 5
    g = torch.Generator().manual_seed(0)
    f = torch.eye(d, dtype=torch.float64).repeat(m, 1) * (0.1 + 10 * torch.rand(d * m, 1, generator=g))
    sigma = evaluate.spectrum(f)
    torch.testing.assert_close(sigma, torch.tensor([m ** 0.5] * (d - 1) + [0.0], dtype=torch.float64),
                               rtol=0, atol=1e-12)  # float64 rounding only
    assert evaluate.rankme(sigma) == pytest.approx(d - 1, rel=2e-6 * d)
    collapsed = torch.randn(1, 32, generator=g).abs().repeat(40, 1) * torch.rand(40, 1, generator=g)
    assert evaluate.rankme(evaluate.spectrum(collapsed)) == pytest.approx(1, rel=2e-6 * 32)


def test_wall_time_counts_from_each_start_and_adds_the_parts():
    """A run that started at t = 100 and logged its first row 40 s later, its last at 250, was interrupted, and
    resumed at t = 1000 (rows to 1090): 150 + 90 s. Without starts (a run directory of an older version): the
    span of its rows. The report's column reads it."""
    rows = [{"step": s, "time": t} for s, t in ((10, 140.0), (20, 250.0), (20, 1030.0), (30, 1090.0))]
    assert report.wall_time({"starts": [100.0, 1000.0]}, rows) == 240.0
    assert report.wall_time({"starts": [100.0]}, rows[:2]) == 150.0
    assert report.wall_time({}, rows[:2]) == 110.0
    assert report.wall_time({}, []) is None
    cells = report.row("r", {"starts": [100.0, 1000.0]}, rows, {})
    assert cells[report.HEADER.index("wall time")] == "0:04:00"
    assert math.isclose(report.wall_time({"starts": [1000.0, 100.0]}, rows), 240.0)  # order as written or not
