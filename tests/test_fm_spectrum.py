"""Gram-trick spectra vs eigvalsh of the dense references (1e-10 relative to lambda_max)."""

import pytest
import torch

import fisher_metrics as fm
from tests.fm_reference import (
    GPT2_NAMES,
    GPT2_PARAMS,
    gpt2_problem,
    mlp,
    mlp_batches,
    mlp_problem,
    single_thread,  # noqa: F401
)


def assert_same_spectrum(gram, dense):
    exact = torch.linalg.eigvalsh(dense.detach()).flip(0)[: gram.numel()]
    assert torch.allclose(gram, exact, rtol=0, atol=1e-10 * float(exact[0]))


@pytest.mark.parametrize("kind", ["ce", "mse"])
@pytest.mark.parametrize("curvature", ["ggn", "fisher_mc", "empirical_fisher"])
def test_gram_spectrum_matches_dense_mlp(kind, curvature):
    model, batches, problem = mlp_problem(kind)
    op = fm.make_operator(model, batches, curvature, mc_samples=2, seed=1)
    gram = fm.gram_eigenvalues(op)
    rows = {"ggn": 30, "fisher_mc": 20, "empirical_fisher": 10}[curvature]
    assert gram.shape == (rows,)
    assert_same_spectrum(gram, problem.dense(curvature, op))


def test_gram_blocks_are_diagonal_blocks():
    model, batches, problem = mlp_problem("ce")
    op = fm.make_operator(model, batches, "ggn")
    blocks = fm.gram_eigenvalues(op, blocks=True)
    assert list(blocks) == op.param_names
    dense, offset = problem.ggn(), 0
    for name, shape in op.param_shapes.items():
        size = shape.numel()
        assert_same_spectrum(blocks[name], dense[offset : offset + size, offset : offset + size])
        offset += size


def test_gram_spectrum_tiny_gpt2():
    model, batch, problem = gpt2_problem(GPT2_NAMES)
    op = fm.make_operator(model, batch, "ggn", params=GPT2_PARAMS)
    assert_same_spectrum(fm.gram_eigenvalues(op), problem.ggn())


def test_gram_bad_arguments():
    data = mlp_batches("ce")
    with pytest.raises(TypeError, match="not a Gram matrix"):
        fm.gram_eigenvalues(fm.make_operator(mlp(), data, "hessian"))
    with pytest.raises(TypeError, match="operator must be"):
        fm.gram_eigenvalues(torch.eye(3))
    op = fm.make_operator(mlp(), data, "ggn")
    with pytest.raises(ValueError, match="max_entries"):
        fm.gram_eigenvalues(op, max_entries=100)
    with pytest.raises(TypeError, match="blocks"):
        fm.gram_eigenvalues(op, blocks="yes")
    custom = fm.make_operator(mlp(), data, "ggn", loss_fn=lambda o, t: o.pow(2).sum(-1))
    with pytest.raises(ValueError, match="callable loss"):
        fm.gram_eigenvalues(custom)
