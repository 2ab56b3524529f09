"""Curvature operator products vs dense float64 references (tests/fm_reference.py).

Tolerances: operator matrices must match the references to 1e-10 relative
Frobenius error in float64 (both sides are exact up to rounding).
"""

import pytest
import torch
from torch import nn

import fisher_metrics as fm
from fisher_metrics.operators import (
    PreparedBatch,
    batch_list,
    evaluation_mode,
    resolve_parameters,
)
from tests.fm_reference import (
    DTYPE,
    GPT2_NAMES,
    GPT2_PARAMS,
    Problem,
    gpt2_problem,
    mlp,
    mlp_batches,
    mlp_problem,
    relative_error,
    single_thread,  # noqa: F401
)

CURVATURES = ["ggn", "fisher_mc", "empirical_fisher", "hessian"]
TOL = 1e-10


@pytest.mark.parametrize("kind", ["ce", "mse"])
@pytest.mark.parametrize("curvature", CURVATURES)
def test_mlp_operator_matches_dense(kind, curvature):
    model, batches, problem = mlp_problem(kind)
    op = fm.make_operator(model, batches, curvature, mc_samples=2, seed=3)
    assert op.shape == (53, 53) and op.num_rows == 10 and op.num_batches == 2
    dense = problem.dense(curvature, op)
    assert relative_error(op.to_dense(), dense) <= TOL
    assert op.is_psd == (curvature != "hessian")


def test_batches_weighted_by_rows_not_by_batch():
    model, batches, problem = mlp_problem("ce")
    joined = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    split = fm.make_operator(model, batches, "ggn").to_dense()
    whole = fm.make_operator(model, joined, "ggn").to_dense()
    assert relative_error(split, whole) <= TOL
    mean_of_means = sum(fm.make_operator(model, b, "ggn").to_dense() for b in batches) / 2
    assert relative_error(mean_of_means, whole) > 1e-3


def test_ignored_labels_are_not_rows():
    model, batches, _ = mlp_problem("ce")
    x, y = batches[1]
    y = y.clone()
    y[:2] = -100
    problem = Problem(model, [n for n, _ in model.named_parameters()], [(x, y)], "ce")
    op = fm.make_operator(model, (x, y), "empirical_fisher")
    assert op.num_rows == 5
    assert relative_error(op.to_dense(), problem.empirical_fisher()) <= TOL


def test_parameter_subset_by_regex_name_and_tensor():
    model = mlp()
    names = ["0.weight", "2.bias"]
    by_regex = resolve_parameters(model, [r"^0\.w", r"2\.bias"])
    by_tensor = resolve_parameters(model, [model[2].bias, model[0].weight])
    assert by_regex == by_tensor == names
    _, batches, problem = mlp_problem("ce", names)
    for curvature in ("ggn", "hessian"):
        op = fm.make_operator(model, batches, curvature, params=[model[0].weight, "2.bias"])
        assert op.param_names == names and op.shape == (33, 33)
        assert relative_error(op.to_dense(), problem.dense(curvature)) <= TOL


@pytest.mark.parametrize("curvature", CURVATURES)
def test_tiny_gpt2_operator_matches_dense(curvature):
    model, batch, problem = gpt2_problem(GPT2_NAMES)
    op = fm.make_operator(model, batch, curvature, params=GPT2_PARAMS, seed=5)
    assert op.param_names == problem.names and op.shape == (88, 88)
    assert op.num_rows == 5  # 2 x 3 shifted labels, one of them -100
    dense = problem.dense(curvature, op)
    assert relative_error(op.to_dense(), dense) <= TOL


def test_gpt2_loss_is_the_models_own_loss():
    model, batch, problem = gpt2_problem(GPT2_NAMES)
    op = fm.make_operator(model, batch, "ggn", params=GPT2_PARAMS)
    with torch.no_grad():
        own = float(model(**batch).loss)
    # Hugging Face computes its loss in float32 (logits.float()), hence 1e-6.
    assert op.mean_loss() == pytest.approx(own, rel=1e-6)
    assert float(problem.mean_loss(problem.theta)) == pytest.approx(op.mean_loss(), rel=1e-12)


def test_gpt2_label_on_masked_position_is_excluded():
    model, batch, _ = gpt2_problem(GPT2_NAMES)
    with_label = dict(batch, labels=batch["input_ids"].clone())
    op = fm.make_operator(model, with_label, "ggn", params=GPT2_PARAMS)
    assert op.num_rows == 5


def test_fisher_mc_is_seeded_and_averages_to_the_ggn():
    model, batches, problem = mlp_problem("ce")
    a = fm.make_operator(model, batches, "fisher_mc", seed=7)
    b = fm.make_operator(model, batches, "fisher_mc", seed=7)
    assert all(torch.equal(s, t) for s, t in zip(a.sampled_targets, b.sampled_targets, strict=True))
    many = fm.make_operator(model, batches, "fisher_mc", mc_samples=3000, seed=0).to_dense()
    # Monte-Carlo error ~ 1/sqrt(R S) = 0.006; 0.05 leaves a wide margin.
    assert relative_error(many, problem.ggn()) < 0.05


def test_float32_model_with_float64_operator_leaves_model_untouched():
    model = mlp().float().train()
    batches = [(x.float(), y) for x, y in mlp_batches("ce")]
    op = fm.make_operator(model, batches, "ggn", dtype=torch.float64)
    assert op.dtype == torch.float64
    reference = Problem(mlp(), [n for n, _ in model.named_parameters()], mlp_batches("ce"), "ce")
    assert relative_error(op.to_dense(), reference.ggn()) < 1e-6  # float32 weights
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.training


def test_dropout_is_off_during_products_and_mode_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Dropout(0.5), nn.Linear(5, 3)).to(DTYPE).train()
    x, y = mlp_batches("ce")[0]
    op = fm.make_operator(model, (x, y), "hessian")
    v = torch.randn(op.shape[0], dtype=DTYPE)
    assert torch.equal(op.matvec(v), op.matvec(v))
    assert model.training and model[1].training


def test_callable_loss_matches_builtin_squared_error():
    model, batches, _ = mlp_problem("mse")

    def half_squared(out, target):
        return 0.5 * ((out - target) ** 2).sum(dim=-1)

    for curvature in ("ggn", "empirical_fisher", "hessian"):
        custom = fm.make_operator(model, batches, curvature, loss_fn=half_squared).to_dense()
        builtin = fm.make_operator(model, batches, curvature, loss_fn="mse").to_dense()
        assert relative_error(custom, builtin) <= TOL


def test_operator_algebra_helpers():
    model, batches, _ = mlp_problem("ce")
    op = fm.make_operator(model, batches, "ggn")
    V = torch.randn(53, 3, dtype=DTYPE)
    assert torch.allclose(op @ V, torch.stack([op @ V[:, j] for j in range(3)], 1))
    pieces = op.unflatten(V[:, 0])
    assert torch.equal(op.flatten(pieces), V[:, 0])
    dense = torch.randn(4, 4, dtype=DTYPE)
    assert torch.equal(fm.as_operator(dense).to_dense(), dense)
    wrapped = fm.as_operator(lambda v: 2 * v, n=4)
    assert torch.equal(wrapped.to_dense(), 2 * torch.eye(4, dtype=DTYPE))


# --------------------------------------------------------------------------- bad input


def _ce_data():
    return mlp_batches("ce")[0]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(curvature="fisher"), ValueError, "curvature must be one of"),
        (dict(curvature=3), TypeError, "curvature must be a string"),
        (dict(params="nomatch"), ValueError, "matches no parameter"),
        (dict(params="("), ValueError, "not a valid regex"),
        (dict(params=3.0), TypeError, "params must be None"),
        (dict(params=[1]), TypeError, "params entries"),
        (dict(params=[torch.zeros(2)]), ValueError, "not a parameter of model"),
        (dict(loss_fn="hinge"), ValueError, "loss_fn must be one of"),
        (dict(loss_fn=1), TypeError, "loss_fn must be None"),
        (dict(loss_fn="mse"), TypeError, "loss_fn='mse' needs float targets"),
        (dict(dtype=torch.float16), ValueError, "dtype must be None or one of"),
        (dict(dtype="float64"), TypeError, "dtype must be None or one of"),
        (dict(curvature="fisher_mc", mc_samples=0), ValueError, "mc_samples"),
        (dict(curvature="fisher_mc", seed=-1), ValueError, "seed"),
        (dict(shift_labels="yes"), TypeError, "shift_labels"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        fm.make_operator(mlp(), _ce_data(), **kwargs)


@pytest.mark.parametrize(
    "data, error, match",
    [
        (torch.zeros(3, 6), TypeError, "data must be"),
        ([], ValueError, "empty iterable"),
        (5, TypeError, "data must be"),
        ([{"input_ids": torch.zeros(2)}], ValueError, "no tensor 'labels'"),
        ([(torch.zeros(2, 6, dtype=DTYPE),)], TypeError, "batch 0 of data"),
        ((torch.zeros(2, 6, dtype=DTYPE), torch.tensor([0, 3])), ValueError, r"\[0, 3\)"),
        ((torch.zeros(2, 6, dtype=DTYPE), torch.tensor([0, 1, 2])), ValueError, "outputs"),
        ((torch.zeros(2, 6, dtype=DTYPE), torch.tensor([-100, -100])), ValueError, "no valid"),
        ((torch.zeros(2, 6, dtype=DTYPE), torch.zeros(2, 4, dtype=DTYPE)), ValueError, "float"),
    ],
)
def test_bad_data(data, error, match):
    with pytest.raises(error, match=match):
        fm.make_operator(mlp(), data)


def test_bad_model_vectors_and_sizes():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fm.make_operator(lambda x: x, _ce_data())
    op = fm.make_operator(mlp(), _ce_data())
    with pytest.raises(ValueError, match=r"shape \(53,\)"):
        op.matvec(torch.zeros(52, dtype=DTYPE))
    with pytest.raises(TypeError, match="floating-point"):
        op.matvec(torch.zeros(53, dtype=torch.long))
    with pytest.raises(ValueError, match="max_dim"):
        op.to_dense(max_dim=10)
    with pytest.raises(ValueError, match="fisher_mc"):
        fm.make_operator(mlp(), _ce_data(), "fisher_mc", loss_fn=lambda o, t: o.sum(-1))
    with pytest.raises(ValueError, match="n .* is required"):
        fm.as_operator(lambda v: v)
    with pytest.raises(TypeError, match="operator must be"):
        fm.as_operator("matrix")
    with pytest.raises(ValueError, match="square"):
        fm.as_operator(torch.zeros(2, 3))


def test_public_batch_api():
    model, batches, problem = mlp_problem("ce")
    op = fm.make_operator(model, batches, "ggn")
    assert len(op.batches) == 2 and all(isinstance(b, PreparedBatch) for b in op.batches)
    assert list(op.params) == op.param_names and op.model is model
    op.params.clear()  # a copy: the operator keeps its parameters
    assert list(op.params) == op.param_names
    model.train()
    with torch.no_grad(), evaluation_mode(op.model):
        assert not model.training
        rows = torch.cat([b.rows(op.call, op.params) for b in op.batches])
        losses = torch.cat(
            [op.loss.row_losses(b.rows(op.call, op.params), b.targets) for b in op.batches]
        )
    assert model.training
    model.eval()
    assert relative_error(rows, problem.rows(problem.theta)[0]) <= TOL
    assert float(losses.mean()) == pytest.approx(op.mean_loss(), rel=TOL)
    assert batch_list(batches[0]) == [batches[0]] and batch_list(iter(batches)) == batches
    with pytest.raises(fm.EmptyBatchError) as err:
        fm.make_operator(model, (batches[0][0], torch.full((3,), -100)))
    assert isinstance(err.value, ValueError)


# --------------------------------------------------------------------------- block products


def _columns(op, V):
    return torch.stack([op.matvec(V[:, j]) for j in range(V.shape[1])], dim=1)


@pytest.mark.parametrize("curvature", CURVATURES)
def test_block_product_equals_single_products_and_dense_mlp(curvature):
    model, batches, problem = mlp_problem("ce")
    op = fm.make_operator(model, batches, curvature, mc_samples=2, seed=3, chunk_size=3)
    V = torch.randn(53, 7, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    block = op.matmat(V)  # chunks of 3, 3 and 1 columns
    assert op.vectorized
    assert relative_error(block, _columns(op, V)) <= TOL
    assert relative_error(block, problem.dense(curvature, op) @ V) <= TOL
    whole = fm.make_operator(model, batches, curvature, mc_samples=2, seed=3, chunk_size=64)
    assert relative_error(whole.matmat(V), block) <= TOL


@pytest.mark.parametrize("curvature", CURVATURES)
def test_block_product_equals_single_products_and_dense_tiny_gpt2(curvature):
    model, batch, problem = gpt2_problem(GPT2_NAMES)
    op = fm.make_operator(model, batch, curvature, params=GPT2_PARAMS, seed=5)
    V = torch.randn(88, 5, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    block = op.matmat(V)
    assert op.vectorized
    assert relative_error(block, _columns(op, V)) <= TOL
    assert relative_error(block, problem.dense(curvature, op) @ V) <= TOL


class _SquareNoVmap(torch.autograd.Function):
    """``x * x`` with forward and reverse derivatives but no vmap rule."""

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return 2 * x * t


class _SquareNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = mlp()

    def forward(self, x):
        return _SquareNoVmap.apply(self.inner(x))


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_block_product_falls_back_to_the_column_loop(curvature):
    model = _SquareNet()
    batches = mlp_batches("mse")
    op = fm.make_operator(model, batches, curvature)
    V = torch.randn(53, 4, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    block = op.matmat(V)
    assert not op.vectorized
    assert relative_error(block, _columns(op, V)) <= TOL
    # independent reference: the same model written without the custom Function
    reference = fm.make_operator(_PlainSquare(model.inner), batches, curvature)
    assert relative_error(block, reference.to_dense() @ V) <= TOL


class _PlainSquare(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) ** 2


def test_chunk_size_is_checked():
    model, batches, _ = mlp_problem("ce")
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        fm.make_operator(model, batches, "ggn", chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        fm.make_operator(model, batches, "ggn", chunk_size=2.5)


@pytest.mark.parametrize("curvature", CURVATURES)
def test_quadratic_forms_equal_dense_mlp_and_tiny_gpt2(curvature):
    generator = torch.Generator().manual_seed(4)
    model, batches, problem = mlp_problem("mse")
    op = fm.make_operator(model, batches, curvature, mc_samples=2, seed=3, chunk_size=4)
    Z = torch.randn(53, 9, generator=generator, dtype=DTYPE)
    dense = problem.dense(curvature, op)
    assert relative_error(op.quadratic_forms(Z), (Z * (dense @ Z)).sum(0)) <= TOL
    model, batch, problem = gpt2_problem(GPT2_NAMES)
    op = fm.make_operator(model, batch, curvature, params=GPT2_PARAMS, seed=5)
    Z = torch.randn(88, 6, generator=generator, dtype=DTYPE)
    dense = problem.dense(curvature, op)
    assert relative_error(op.quadratic_forms(Z), (Z * (dense @ Z)).sum(0)) <= TOL
    assert op.quadratic_forms(Z[:, :0]).shape == (0,)


def test_quadratic_forms_fall_back_and_observe():
    model = _SquareNet()
    batches = mlp_batches("mse")
    op = fm.make_operator(model, batches, "ggn")
    Z = torch.randn(53, 4, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    reference = fm.make_operator(_PlainSquare(model.inner), batches, "ggn").to_dense()
    calls = []
    forms = fm.ObservedOperator(op, calls.append).quadratic_forms(Z)
    assert not op.vectorized and calls == [4]
    assert relative_error(forms, (Z * (reference @ Z)).sum(0)) <= TOL
    with pytest.raises(ValueError, match="Z must have shape"):
        op.quadratic_forms(torch.zeros(52, 2, dtype=DTYPE))
    with pytest.raises(TypeError, match="operator must be a fisher_metrics LinearOperator"):
        fm.ObservedOperator(torch.eye(3), print)
