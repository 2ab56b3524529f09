"""Capacity metrics vs hand-computed values, and Hutchinson / Hutch++ trace estimates.

Tolerances: closed-form metrics to 1e-12; stochastic traces within 4 of their
own standard errors (fixed seeds), Hutch++ on a low-rank-plus-noise matrix also
within 1% relative error and exact (1e-10) on an exactly low-rank matrix.
"""

import math

import pytest
import torch

import fisher_metrics as fm
from tests.fm_reference import (
    DTYPE,
    mlp_problem,
    single_thread,  # noqa: F401
    symmetric,
)

SPECTRUM = [4.0, 2.0, 1.0, 1.0, 0.0]


def test_metrics_by_hand():
    assert fm.spectral_trace(SPECTRUM) == 8.0
    # p = (1/2, 1/4, 1/8, 1/8, 0): H = 1.75 log 2, so exp(H) = 2 ** 1.75.
    assert fm.effective_rank(SPECTRUM) == pytest.approx(2**1.75, rel=1e-12)
    assert fm.condition_number(SPECTRUM) == 4.0  # the 0 is below tol
    assert fm.spectral_gap(SPECTRUM) == 2.0
    assert fm.spectral_gap(SPECTRUM, relative=True) == 0.5
    assert fm.spectral_range(SPECTRUM) == 4.0
    # N sigma^2 = 4 * 0.25 = 1: 0.5 * (log 5 + log 3 + 2 log 2 + log 1) = 0.5 log 60.
    assert fm.pac_bayes_flatness(SPECTRUM, sigma=0.5, num_samples=4) == pytest.approx(
        0.5 * math.log(60), rel=1e-12
    )


def test_metric_edge_cases():
    assert fm.effective_rank([3.0, 3.0, 3.0]) == pytest.approx(3.0)
    assert fm.effective_rank(torch.tensor([2.0])) == 1.0
    assert fm.effective_rank([0.0, 0.0]) == 0.0
    assert fm.effective_rank([1.0, -1.0]) == pytest.approx(2.0)  # |lambda| weights
    assert fm.condition_number([1.0, 1e-3, 1e-16]) == pytest.approx(1e3)  # tol = 3 eps
    assert fm.condition_number([1.0, 1e-3, 1e-12], rtol=0.0) == pytest.approx(1e12)
    assert fm.condition_number([1.0, 1e-3, 1e-12], rtol=1e-2) == 1.0
    assert fm.condition_number([3.0, -5.0, 1.0]) == 3.0
    assert math.isnan(fm.condition_number([-1.0, 0.0]))
    assert math.isnan(fm.spectral_gap([1.0]))
    assert fm.pac_bayes_flatness([-3.0, 0.0], sigma=1.0) == 0.0


def test_capacity_metrics_dict():
    metrics = fm.capacity_metrics(torch.tensor(SPECTRUM), sigma=0.5, num_samples=4)
    assert metrics == {
        "trace": 8.0,
        "effective_rank": pytest.approx(2**1.75),
        "condition_number": 4.0,
        "spectral_gap": 2.0,
        "spectral_range": 4.0,
        "max_eigenvalue": 4.0,
        "min_eigenvalue": 0.0,
        "pac_bayes_flatness": pytest.approx(0.5 * math.log(60)),
    }
    assert "pac_bayes_flatness" not in fm.capacity_metrics(SPECTRUM)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: fm.spectral_trace([[1.0]]), ValueError, "eigenvalues must be 1-D"),
        (lambda: fm.spectral_trace([]), ValueError, "at least one"),
        (lambda: fm.effective_rank([1.0, math.nan]), ValueError, "finite"),
        (lambda: fm.spectral_range("abc"), TypeError, "eigenvalues must be"),
        (lambda: fm.pac_bayes_flatness([1.0], sigma=0.0), ValueError, "sigma"),
        (lambda: fm.pac_bayes_flatness([1.0], sigma=1.0, num_samples=0), ValueError, "num_samples"),
        (lambda: fm.spectral_gap([1.0, 2.0], relative=1), TypeError, "relative"),
        (lambda: fm.condition_number([1.0], rtol=-1.0), ValueError, "rtol"),
    ],
)
def test_capacity_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --------------------------------------------------------------------------- traces


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_within_its_confidence(distribution):
    generator = torch.Generator().manual_seed(0)
    A = symmetric(torch.rand(80, generator=generator, dtype=DTYPE) * 3)
    est = fm.hutchinson(A, num_samples=200, distribution=distribution, seed=1)
    truth = float(torch.trace(A))
    assert abs(est.estimate - truth) <= 4 * est.std_error
    assert est.num_matvecs == 200 and est.samples.shape == (200,)
    low, high = est.confidence_interval
    assert low < est.estimate < high
    assert high - low == pytest.approx(2 * 1.959964 * est.std_error, rel=1e-5)


def test_hutchinson_on_a_curvature_operator():
    model, batches, problem = mlp_problem("ce")
    op = fm.make_operator(model, batches, "ggn")
    est = fm.hutchinson(op, num_samples=60, seed=2)
    assert abs(est.estimate - float(torch.trace(problem.ggn().detach()))) <= 4 * est.std_error


def test_hutch_plus_plus_low_rank_plus_noise():
    generator = torch.Generator().manual_seed(3)
    n = 200
    top = torch.tensor([500.0, 300.0, 200.0, 100.0, 80.0, 50.0])
    spectrum = torch.cat([top, 0.1 * torch.rand(n - 6, generator=generator)])
    A = symmetric(spectrum, seed=3)
    truth = float(spectrum.sum())
    plus = fm.hutch_plus_plus(A, num_matvecs=30, seed=4)
    assert plus.num_matvecs == 30 and plus.method == "hutch++"
    assert abs(plus.estimate - truth) <= 4 * plus.std_error
    assert abs(plus.estimate - truth) / truth < 1e-2
    plain = fm.hutchinson(A, num_samples=30, seed=4)
    assert plus.std_error < plain.std_error / 10


def test_hutch_plus_plus_exact_on_low_rank():
    A = symmetric([5.0, 3.0, 1.0] + [0.0] * 47, seed=1)
    est = fm.hutch_plus_plus(A, num_matvecs=31, seed=0)
    assert est.num_matvecs == 30
    assert est.estimate == pytest.approx(9.0, abs=1e-10)
    assert est.low_rank_trace == pytest.approx(9.0, abs=1e-10)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda A: fm.hutchinson(A, num_samples=1), ValueError, "num_samples"),
        (lambda A: fm.hutchinson(A, distribution="normal"), ValueError, "distribution"),
        (lambda A: fm.hutchinson(A, confidence=1.5), ValueError, "confidence"),
        (lambda A: fm.hutchinson(A, seed=-1), ValueError, "seed"),
        (lambda A: fm.hutch_plus_plus(A, num_matvecs=5), ValueError, "num_matvecs"),
        (lambda A: fm.hutchinson(lambda v: v), ValueError, "n .* is required"),
        (lambda A: fm.hutchinson("A"), TypeError, "operator must be"),
    ],
)
def test_trace_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.eye(6, dtype=DTYPE))
