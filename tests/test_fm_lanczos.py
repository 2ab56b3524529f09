"""Lanczos, SLQ and top_eigenvalues vs torch.linalg.eigvalsh of dense references.

Tolerances: top-k eigenvalues of the curvature operators within 1e-8 relative
error in float64 (the Lanczos stopping tolerance is 1e-10 of the spectral
radius); SLQ density integrates to 1 within 1e-6 on its default grid; SLQ
moments equal the same-probe quadratic forms to 1e-10 (Gauss quadrature is exact
up to degree 2m - 1) and the dense eigenvalue moments within 4 standard errors of
the Rademacher probe average.
"""

import math

import pytest
import torch

import fisher_metrics as fm
from tests.fm_reference import (
    DTYPE,
    GPT2_NAMES,
    GPT2_PARAMS,
    gpt2_problem,
    mlp,
    mlp_batches,
    mlp_problem,
    single_thread,  # noqa: F401
    symmetric,
)

CURVATURES = ["ggn", "fisher_mc", "empirical_fisher", "hessian"]
RESULT_KEYS = {
    "top_eigenvalues",
    "max_eigenvalue",
    "min_computed_eigenvalue",
    "top_k_ratio",
    "effective_rank",
    "spectral_gap",
    "spectral_range",
    "lanczos_iterations",
    "k_requested",
    "k_computed",
    "batch_size_used",
    "operator_used",
    "is_psd",
    "residuals",
    "note",
}


def assert_top(res, dense, which="largest", k=5):
    values = torch.linalg.eigvalsh(dense.detach())
    reference = values.flip(0)[:k] if which == "largest" else values[:k]
    got = torch.tensor(res["top_eigenvalues"], dtype=DTYPE)
    assert got.shape == (k,)
    assert float(((got - reference).abs() / reference.abs()).max()) <= 1e-8
    assert all(res["converged"]) and res["k_computed"] == k


@pytest.mark.parametrize("curvature", CURVATURES)
def test_top5_mlp_all_curvatures(curvature):
    model, batches, problem = mlp_problem("ce")
    res = fm.top_eigenvalues(model, batches, curvature=curvature, k=5, seed=3, dtype=DTYPE)
    same_labels = fm.make_operator(model, batches, curvature, seed=3)
    assert_top(res, problem.dense(curvature, same_labels))
    assert res["is_psd"] == (curvature != "hessian")
    assert res["batch_size_used"] == 10


@pytest.mark.parametrize("curvature", CURVATURES)
def test_top5_tiny_gpt2_all_curvatures(curvature):
    model, batch, problem = gpt2_problem(GPT2_NAMES)
    res = fm.top_eigenvalues(
        model, batch, curvature=curvature, k=5, params=GPT2_PARAMS, seed=1, dtype=DTYPE
    )
    same_labels = fm.make_operator(model, batch, curvature, params=GPT2_PARAMS, seed=1)
    assert_top(res, problem.dense(curvature, same_labels))
    assert res["batch_size_used"] == 5


def test_smallest_hessian_eigenvalues():
    model, batches, problem = mlp_problem("mse")
    res = fm.top_eigenvalues(model, batches, curvature="hessian", k=5, which="smallest")
    assert_top(res, problem.hessian(), which="smallest")
    assert res["top_eigenvalues"] == sorted(res["top_eigenvalues"])
    assert res["min_computed_eigenvalue"] == res["top_eigenvalues"][0]


def test_result_dict_contents():
    model, batches, _ = mlp_problem("ce")
    res = fm.top_eigenvalues(model, batches, k=4, reorth="periodic")
    assert RESULT_KEYS <= set(res)
    values = res["top_eigenvalues"]
    assert values == sorted(values, reverse=True)
    assert res["max_eigenvalue"] == values[0] and res["min_computed_eigenvalue"] == values[-1]
    assert res["spectral_gap"] == pytest.approx(values[0] - values[1])
    assert res["spectral_range"] == pytest.approx(values[0] - values[-1])
    assert res["top_k_ratio"] == pytest.approx(values[0] / values[-1])
    assert "condition_number" not in res  # a ratio of k computed values, named as such
    assert 1 <= res["effective_rank"] <= 4
    assert res["k_requested"] == 4 and res["operator_used"] == "GGNOperator"
    assert len(res["residuals"]) == 4 and res["lanczos_iterations"] >= 4
    assert "4/4" in res["note"]


# --------------------------------------------------------------------------- lanczos core


@pytest.mark.parametrize("reorth", ["full", "periodic"])
@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_dense_matrix_full_and_periodic(reorth, which):
    generator = torch.Generator().manual_seed(4)
    outliers = torch.tensor([9.0, 7.0, -6.0, -8.0])
    spectrum = torch.cat([outliers, torch.randn(116, generator=generator)])
    A = symmetric(spectrum)
    res = fm.lanczos(A, k=6, which=which, reorth=reorth)
    exact = torch.linalg.eigvalsh(A)
    exact = exact.flip(0)[:6] if which == "largest" else exact[:6]
    assert torch.allclose(res.eigenvalues, exact, rtol=0, atol=1e-9)
    assert res.all_converged and res.ghosts_removed == 0


def test_no_reorthogonalization_ghosts_are_not_reported():
    generator = torch.Generator().manual_seed(0)
    outliers = torch.tensor([100.0, 50.0, 30.0, 10.0])
    spectrum = torch.cat([outliers, torch.rand(296, generator=generator)])
    A = symmetric(spectrum)
    res = fm.lanczos(A, k=5, reorth="none", max_iter=150)
    assert int((res.ritz_values - 100).abs().lt(1e-6).sum()) > 1  # ghosts exist in T
    assert res.ghosts_removed > 0
    assert res.eigenvalues[:4].tolist() == pytest.approx([100.0, 50.0, 30.0, 10.0], abs=1e-8)
    gaps = (res.eigenvalues[:, None] - res.eigenvalues[None, :]).abs()
    assert float((gaps + torch.eye(5, dtype=DTYPE)).min()) > 1e-6  # no duplicates
    exact = torch.linalg.eigvalsh(A)
    for value, residual, ok in zip(
        res.eigenvalues, res.explicit_residuals, res.converged, strict=True
    ):
        distance = float((exact - value).abs().min())
        assert distance <= float(residual) + 1e-10
        assert not ok or distance <= res.tol * res.scale + 1e-10
    periodic = fm.lanczos(A, k=5, reorth="periodic", max_iter=150)
    assert periodic.ghosts_removed == 0 and periodic.all_converged
    assert periodic.eigenvalues[:4].tolist() == pytest.approx([100.0, 50.0, 30.0, 10.0], abs=1e-9)


def test_residuals_are_honest_before_convergence():
    generator = torch.Generator().manual_seed(2)
    A = symmetric(torch.rand(300, generator=generator, dtype=DTYPE))
    res = fm.lanczos(A, k=5, max_iter=12, return_vectors=True)
    assert not res.all_converged
    exact = torch.linalg.eigvalsh(A)
    for i, value in enumerate(res.eigenvalues):
        u = res.eigenvectors[:, i]
        true_residual = float((A @ u - value * u).norm())
        assert true_residual == pytest.approx(float(res.residuals[i]), rel=1e-6, abs=1e-12)
        assert float((exact - value).abs().min()) <= float(res.residuals[i]) + 1e-12
    assert res.converged.tolist() == (res.residuals <= res.tol * res.scale).tolist()


def test_deterministic_under_seed():
    model, batches, _ = mlp_problem("ce")
    op = fm.make_operator(model, batches, "hessian")
    a = fm.lanczos(op, k=3, seed=11)
    b = fm.lanczos(op, k=3, seed=11)
    assert torch.equal(a.eigenvalues, b.eigenvalues) and torch.equal(a.alpha, b.alpha)
    c = fm.lanczos(op, k=3, seed=12)
    assert not torch.equal(a.alpha, c.alpha)
    assert torch.allclose(a.eigenvalues, c.eigenvalues, rtol=1e-9)


def test_invariant_subspace_restarts_find_multiplicity():
    A = symmetric([3.0, 2.0, 1.0] + [0.0] * 37)
    res = fm.lanczos(A, k=6)
    assert res.restarts >= 1 and res.all_converged
    assert torch.allclose(
        res.eigenvalues, torch.tensor([3.0, 2.0, 1.0, 0, 0, 0], dtype=DTYPE), atol=1e-10
    )


def test_callable_and_float32_operators():
    A = symmetric([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    res = fm.lanczos(lambda v: A @ v, n=6, k=2)
    assert res.eigenvalues.tolist() == pytest.approx([5.0, 4.0], abs=1e-10)
    res32 = fm.lanczos(A.float(), k=2)
    assert res32.tol == 1e-5
    assert res32.eigenvalues.tolist() == pytest.approx([5.0, 4.0], abs=1e-4)


# --------------------------------------------------------------------------- SLQ


def test_slq_density_and_moments():
    generator = torch.Generator().manual_seed(5)
    n, num_probes, steps = 60, 40, 12
    spectrum = torch.cat([torch.tensor([8.0, 5.0]), torch.rand(n - 2, generator=generator)])
    A = symmetric(spectrum, seed=5)
    probes = (2.0 * torch.randint(0, 2, (n, num_probes), generator=generator) - 1).to(DTYPE)
    density = fm.slq(A, probes=probes, lanczos_steps=steps)
    assert float(density.weights.sum()) == pytest.approx(1.0, abs=1e-12)
    grid, phi = density.density()
    assert float(torch.trapezoid(phi, grid)) == pytest.approx(1.0, abs=1e-6)
    Q = probes / math.sqrt(n)
    for p in range(5):
        power = torch.linalg.matrix_power(A, p)
        same_probes = float(((Q * (power @ Q)).sum(0)).mean())
        assert density.moment(p) == pytest.approx(same_probes, rel=1e-10, abs=1e-12)
        exact = float((spectrum**p).mean())
        variance = 2 * (float((power**2).sum()) - float((torch.diagonal(power) ** 2).sum()))
        stderr = math.sqrt(variance / num_probes) / n
        assert abs(density.moment(p) - exact) <= 4 * stderr + 1e-12


def test_slq_seeded_probes_and_gaussian_density():
    A = symmetric([2.0, 1.0, 0.0, -1.0])
    a = fm.slq(A, num_probes=3, lanczos_steps=4, seed=1)
    b = fm.slq(A, num_probes=3, lanczos_steps=4, seed=1)
    assert torch.equal(a.nodes, b.nodes) and a.num_matvecs <= 12
    grid, phi = fm.gaussian_density(
        torch.zeros(1), torch.ones(1), grid=torch.tensor([0.0]), sigma=1.0
    )
    assert float(phi[0]) == pytest.approx(1 / math.sqrt(2 * math.pi))


def _moments_exact(density, A, probes, steps):
    """Gauss quadrature of each probe is exact up to degree 2 m - 1: check p <= 2 m - 1."""
    Q = probes / probes.norm(dim=0)
    for p in range(2 * steps):
        same_probes = float(((Q * (torch.linalg.matrix_power(A, p) @ Q)).sum(0)).mean())
        assert density.moment(p) == pytest.approx(same_probes, rel=1e-9, abs=1e-12)


def test_slq_probes_in_blocks_equal_probes_one_by_one():
    """Blocks of probes (one block product per step), including runs that stop early."""
    generator = torch.Generator().manual_seed(8)
    A = symmetric([3.0, 2.0, 2.0, 1.0] + [0.5] * 16 + torch.rand(20, generator=generator).tolist())
    eigenvectors = torch.linalg.eigh(A).eigenvectors
    probes = torch.cat(
        [
            (2.0 * torch.randint(0, 2, (40, 5), generator=generator) - 1).to(DTYPE),
            eigenvectors[:, -1:],  # eigenvalue 3: invariant after one step
            eigenvectors[:, -3:].sum(dim=1, keepdim=True),  # eigenvalues 3, 2, 2: after two
        ],
        dim=1,
    )
    steps = 6
    for reorth in ("full", "none"):
        together = fm.slq(A, probes=probes, lanczos_steps=steps, reorth=reorth, block_size=4)
        alone = [
            fm.slq(A, probes=probes[:, l : l + 1], lanczos_steps=steps, reorth=reorth)
            for l in range(7)
        ]
        sequential = fm.slq(A, probes=probes, lanczos_steps=steps, reorth="periodic")
        assert together.num_matvecs == sum(d.num_matvecs for d in alone) == 5 * steps + 1 + 2
        assert torch.equal(together.probe, sequential.probe)
        for l, one in enumerate(alone):
            mine = together.probe == l
            assert torch.allclose(together.nodes[mine], one.nodes, rtol=1e-10, atol=1e-12)
            assert torch.allclose(together.weights[mine], one.weights / 7, rtol=1e-10, atol=1e-14)
        assert torch.allclose(together.nodes, sequential.nodes, rtol=1e-8, atol=1e-10)
        assert torch.allclose(together.weights, sequential.weights, rtol=1e-8, atol=1e-12)
        _moments_exact(together, A, probes, 2)


def test_slq_on_a_curvature_operator_uses_block_products():
    model, batches, problem = mlp_problem("ce")
    op = fm.make_operator(model, batches, "ggn")
    calls = []
    observed = fm.ObservedOperator(op, calls.append)
    density = fm.slq(observed, num_probes=3, lanczos_steps=4, seed=2)
    assert calls == [3, 3, 3, 3] and density.num_matvecs == 12
    probes = 2.0 * torch.randint(0, 2, (53, 3), generator=torch.Generator().manual_seed(2)) - 1
    _moments_exact(density, problem.ggn().detach(), probes.to(DTYPE), 4)


def test_explicit_residuals_without_full_reorthogonalization():
    A = symmetric(torch.linspace(1.0, 10.0, 30).tolist(), seed=6)
    res = fm.lanczos(A, k=3, reorth="none", max_iter=30)
    vectors = fm.lanczos(A, k=3, reorth="none", max_iter=30, return_vectors=True).eigenvectors
    reference = (A @ vectors - vectors * res.eigenvalues).norm(dim=0)
    assert torch.allclose(res.explicit_residuals, reference, rtol=1e-8, atol=1e-13)


# --------------------------------------------------------------------------- block Lanczos


@pytest.mark.parametrize("which", ["largest", "smallest"])
@pytest.mark.parametrize("block_size", [1, 3, 5])
def test_block_lanczos_dense_with_a_triple_eigenvalue(which, block_size):
    spectrum = torch.cat([torch.tensor([9.0, 7.0, 7.0, 7.0, 5.0]), torch.linspace(-1, 3, 95)])
    A = symmetric(spectrum.tolist(), seed=3)
    res = fm.block_lanczos(A, k=5, which=which, block_size=block_size, seed=1, return_vectors=True)
    reference = torch.sort(spectrum.to(DTYPE), descending=which == "largest").values[:5]
    assert torch.allclose(res.eigenvalues, reference, rtol=1e-8, atol=1e-12)
    assert res.all_converged and res.block_size == block_size
    U = res.eigenvectors
    assert torch.allclose(U.T @ U, torch.eye(5, dtype=DTYPE), atol=1e-8)
    true_residuals = (A @ U - U * res.eigenvalues).norm(dim=0)
    assert torch.allclose(res.residuals, true_residuals, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_block_lanczos_on_curvature_operators_uses_block_products(curvature):
    model, batches, problem = mlp_problem("ce")
    calls = []
    op = fm.ObservedOperator(fm.make_operator(model, batches, curvature), calls.append)
    res = fm.block_lanczos(op, k=4, block_size=4)
    values = torch.linalg.eigvalsh(problem.dense(curvature).detach()).flip(0)[:4]
    assert float(((res.eigenvalues - values).abs() / values.abs()).max()) <= 1e-8
    assert calls[0] == 4 and sum(calls) == res.num_matvecs and len(calls) == res.iterations


def test_block_lanczos_restarts_after_an_invariant_subspace():
    A = symmetric([4.0, 4.0, 1.0, 1.0, 1.0, 0.0], seed=2)  # 3 distinct values
    res = fm.block_lanczos(A, k=6, block_size=1, max_matvecs=6)
    assert torch.allclose(
        res.eigenvalues, torch.tensor([4.0, 4, 1, 1, 1, 0], dtype=DTYPE), atol=1e-10
    )
    assert res.restarts >= 1 and res.num_matvecs == 6


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(k=11), ValueError, "k must be <= n"),
        (dict(block_size=0), ValueError, "block_size must be an integer >= 1"),
        (dict(block_size=11), ValueError, "block_size must be <= n"),
        (dict(k=4, max_matvecs=3), ValueError, "max_matvecs must be >= max"),
        (dict(which="top"), ValueError, "which must be one of"),
        (dict(tol=0.0), ValueError, "tol must be"),
    ],
)
def test_block_lanczos_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        fm.block_lanczos(symmetric(list(range(10))), **kwargs)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(k=0), ValueError, "k must be an integer >= 1"),
        (dict(k=2.5), TypeError, "k must be an integer"),
        (dict(k=11), ValueError, "k must be <= n"),
        (dict(which="top"), ValueError, "which must be one of"),
        (dict(reorth="partial"), ValueError, "reorth must be one of"),
        (dict(k=5, max_iter=3), ValueError, "max_iter must be >= k"),
        (dict(tol=-1.0), ValueError, "tol must be"),
        (dict(seed=-2), ValueError, "seed must be"),
        (dict(v0=torch.zeros(3)), ValueError, "v0 must be"),
        (dict(v0=torch.zeros(10, dtype=DTYPE)), ValueError, "non-zero"),
    ],
)
def test_lanczos_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        fm.lanczos(torch.eye(10, dtype=DTYPE), **kwargs)


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="operator dtype must be"):
        fm.lanczos(torch.eye(3, dtype=torch.float16))
    with pytest.raises(ValueError, match="n .* is required"):
        fm.lanczos(lambda v: v, k=1)
    A = torch.eye(4, dtype=DTYPE)
    with pytest.raises(ValueError, match="num_probes"):
        fm.slq(A, num_probes=0)
    with pytest.raises(ValueError, match="lanczos_steps"):
        fm.slq(A, lanczos_steps=0)
    with pytest.raises(ValueError, match="probes must be"):
        fm.slq(A, probes=torch.ones(3, 2))
    with pytest.raises(ValueError, match="sigma"):
        fm.gaussian_density(torch.zeros(2), torch.ones(2) / 2, sigma=0.0)
    with pytest.raises(ValueError, match="non-negative"):
        fm.gaussian_density(torch.zeros(2), -torch.ones(2))
    with pytest.raises(ValueError, match="same length"):
        fm.gaussian_density(torch.zeros(2), torch.ones(3))
    with pytest.raises(TypeError, match="nodes must be"):
        fm.gaussian_density([0.0], torch.ones(1))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(curvature="gauss_newton"), ValueError, "curvature must be one of"),
        (dict(which="middle"), ValueError, "which must be one of"),
        (dict(reorth="selective"), ValueError, "reorth must be one of"),
        (dict(k=0), ValueError, "k must be"),
        (dict(k=54), ValueError, "k must be <= the number of selected parameters"),
        (dict(max_iter=0), ValueError, "max_iter"),
        (dict(dtype=torch.int32), ValueError, "dtype"),
        (dict(seed=-1), ValueError, "seed"),
    ],
)
def test_top_eigenvalues_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        fm.top_eigenvalues(mlp(), mlp_batches("ce"), **kwargs)
