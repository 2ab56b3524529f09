"""Matrix-free curvature operators over a subset of model parameters.

Every operator here is a symmetric ``n x n`` matrix acting on flat vectors of
the selected parameters (``n`` = their total number of entries, concatenated in
``model.named_parameters()`` order). Products are computed with ``torch.func``
(``functional_call``, ``jvp``, ``vjp``, ``grad``); no matrix is formed unless
:meth:`LinearOperator.to_dense` is called.

Block products. ``matmat(V)`` with ``V: (n, k)`` applies a curvature to ``k``
vectors at once: per batch one reverse linearization (``vjp``: one forward pass,
kept), the ``k`` Jacobian-vector products ``J V`` as one vectorized forward-mode
pass (``torch.func.vmap`` over ``jvp``) and the ``k`` pullbacks ``J^T U`` as one
vectorized backward pass (``vmap`` over the kept ``vjp``); the Hessian vectorizes
forward-over-reverse ``jvp(grad)``. The result equals ``k`` single products up
to rounding. ``quadratic_forms(Z)`` (``z_j^T A z_j``, what Hutchinson needs)
skips the backward pass for the GGN and the Fisher: ``(J z)^T H (J z)`` and
``||J_l z||^2``. Columns go in chunks of ``chunk_size`` (default
``DEFAULT_CHUNK_SIZE = 64``; memory grows with ``chunk_size`` times the
activations of one batch); ``chunk_size=1`` is the column loop. A model whose
forward pass cannot be vectorized (``vmap`` raises) falls back to the column
loop, once, for the operator's lifetime (``vectorized`` turns ``False``).

Objective. For ``R`` valid rows ``r`` (samples, or tokens for sequence models)
with model outputs ``f_r(theta)`` (``C`` entries) and per-row losses
``l_r = l(f_r, y_r)``, every operator is a curvature of the mean loss

    L(theta) = (1/R) sum_r l_r,

over *all* valid rows of *all* batches (a batch contributes the sum of its row
terms; the total is divided once by ``R``). Rows whose label is ``-100`` are not
rows; for dict batches whose ``attention_mask`` has the shape of the labels, a
label at a masked position (``attention_mask == 0``) is not a row either.

Curvatures (``J_r = d f_r / d theta``, ``C x n``; ``H_r = d^2 l_r / d f_r^2``):

- ``GGNOperator``: ``G = (1/R) sum_r J_r^T H_r J_r`` (Schraudolph 2002; Martens
  2020, Sec. 8). For cross-entropy ``H_r = diag(p_r) - p_r p_r^T`` with
  ``p_r = softmax(f_r)``; for the squared error ``H_r = I``. For these two losses
  the GGN equals the (true) Fisher information (Martens 2020, Sec. 9.2).
- ``FisherMCOperator``: ``F = (1/(R S)) sum_r sum_s g_rs g_rs^T`` with
  ``g_rs = grad_theta l(f_r, y_rs)`` at labels ``y_rs ~ p(y | f_r)`` sampled once,
  seeded, at construction (Monte-Carlo Fisher; Kunstner et al. 2019).
- ``EmpiricalFisherOperator``: ``E = (1/R) sum_r g_r g_r^T`` with the data labels
  (Kunstner et al. 2019 explain why this is not the Fisher).
- ``HessianOperator``: ``H = d^2 L / d theta^2`` (forward-over-reverse ``hvp``).

Losses (per row):

- cross-entropy (integer targets): ``l_r = -log softmax(f_r)[y_r]`` with the
  classes on the last output dimension; outputs ``(*, C)`` pair with targets
  ``(*)``; every leading position is a row.
- squared error (float targets): ``l_r = 0.5 * ||f_r - y_r||^2`` summed over the
  output entries of sample ``r``; the rows are the first dimension. This is the
  negative Gaussian log-likelihood with unit variance up to a constant, so that
  ``H_r = I``. Note: ``torch.nn.MSELoss`` (mean over all entries, no 0.5) is
  ``2 / D`` times this loss for ``D`` outputs per row.
- a callable ``loss_fn(outputs, targets) -> (R,)`` of per-row losses, given the
  valid-row outputs ``(R, C)`` and targets ``(R, ...)`` in the layout above
  (integer targets: cross-entropy layout; float targets: squared-error layout).

Hugging Face models: a dict batch is called as ``model(**batch)`` without its
``labels`` (and with ``use_cache=False`` where the model accepts it); the loss is
the model's own: token-level cross-entropy over valid tokens, with labels shifted
by one for causal language models (``kfac_optim.layers.is_causal_lm``;
``labels[:, 1:]`` against ``logits[:, :-1]``), exactly what ``model(**batch).loss``
computes when no label sits on a padded position.

The model is evaluated in eval mode (dropout off) during every product and its
training flags are restored afterwards; the curvature is taken at the current
parameter values, which are copied when the operator is built.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from kfac_optim.layers import IGNORE_INDEX, is_causal_lm

from ._validation import LANCZOS_DTYPES, check_choice, check_dtype, check_int, check_seed

CURVATURES = ("ggn", "fisher_mc", "empirical_fisher", "hessian")
LOSSES = ("cross_entropy", "mse")
DENSE_MAX_DIM = 8192
DEFAULT_CHUNK_SIZE = 64

__all__ = [
    "CURVATURES",
    "DEFAULT_CHUNK_SIZE",
    "LOSSES",
    "CallableOperator",
    "CurvatureOperator",
    "DenseOperator",
    "EmptyBatchError",
    "EmpiricalFisherOperator",
    "FisherMCOperator",
    "GGNOperator",
    "HessianOperator",
    "LinearOperator",
    "ObservedOperator",
    "PreparedBatch",
    "RowLoss",
    "as_operator",
    "batch_list",
    "evaluation_mode",
    "make_operator",
    "resolve_parameters",
]


class EmptyBatchError(ValueError):
    """``data`` has no valid row: every label is ``-100`` or masked.

    Raised by :class:`CurvatureOperator` (and so :func:`make_operator`); a
    ``ValueError``, so callers that catch those keep working.
    """


class LinearOperator:
    """A symmetric linear operator on flat vectors of length ``n``.

    Subclasses implement :meth:`_matvec`; this class checks inputs and derives
    ``matmat``, ``@`` and ``to_dense`` from it.

    Attributes:
        shape: ``(n, n)``.
        dtype: dtype of the vectors the operator takes and returns.
        device: device of those vectors.
    """

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device) -> None:
        self._n = int(n)
        self.dtype = dtype
        self.device = torch.device(device)

    @property
    def shape(self) -> tuple[int, int]:
        return (self._n, self._n)

    def _matvec(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    def matvec(self, v: Tensor) -> Tensor:
        """Return ``A v``.

        Args:
            v: ``(n,)`` tensor; cast to the operator's dtype and device.

        Returns:
            ``(n,)`` tensor ``A v``.

        Raises:
            TypeError: ``v`` is not a floating-point tensor.
            ValueError: ``v`` does not have shape ``(n,)``.
        """
        if not isinstance(v, Tensor) or not v.is_floating_point():
            raise TypeError(f"v must be a floating-point torch.Tensor of shape ({self._n},)")
        if v.shape != (self._n,):
            raise ValueError(f"v must have shape ({self._n},); got {tuple(v.shape)}")
        return self._matvec(v.to(self.device, self.dtype).contiguous())

    def matmat(self, V: Tensor) -> Tensor:
        """Return ``A V`` for ``V`` of shape ``(n, k)``.

        Curvature operators compute the ``k`` products together (see
        :class:`CurvatureOperator`); other operators column by column, or as one
        matrix product for :class:`DenseOperator`.

        Raises:
            TypeError: ``V`` is not a floating-point tensor.
            ValueError: ``V`` does not have shape ``(n, k)``.
        """
        if not isinstance(V, Tensor) or not V.is_floating_point():
            raise TypeError(f"V must be a floating-point torch.Tensor of shape ({self._n}, k)")
        if V.dim() != 2 or V.shape[0] != self._n:
            raise ValueError(f"V must have shape ({self._n}, k); got {tuple(V.shape)}")
        if V.shape[1] == 0:
            return V.new_zeros(self._n, 0).to(self.device, self.dtype)
        return self._matmat(V.to(self.device, self.dtype).contiguous())

    def _matmat(self, V: Tensor) -> Tensor:
        """``A V`` for a checked ``(n, k)`` block; default: one :meth:`_matvec` per column."""
        return torch.stack([self._matvec(V[:, j]) for j in range(V.shape[1])], dim=1)

    def quadratic_forms(self, Z: Tensor) -> Tensor:
        """Return the ``k`` quadratic forms ``z_j^T A z_j`` of the columns of ``Z: (n, k)``.

        What Hutchinson-type estimators need. Default: ``(Z * A Z).sum(0)``; the GGN
        and the (empirical / sampled) Fisher compute them from Jacobian-vector
        products alone (``(J z)^T H (J z)``, ``||J_l z||^2``: forward passes, no
        backward pass), about half the cost of the products.

        Returns:
            ``(k,)`` tensor in the operator's dtype and device.

        Raises:
            TypeError / ValueError: as for :meth:`matmat`.
        """
        if not isinstance(Z, Tensor) or not Z.is_floating_point():
            raise TypeError(f"Z must be a floating-point torch.Tensor of shape ({self._n}, k)")
        if Z.dim() != 2 or Z.shape[0] != self._n:
            raise ValueError(f"Z must have shape ({self._n}, k); got {tuple(Z.shape)}")
        if Z.shape[1] == 0:
            return torch.zeros(0, dtype=self.dtype, device=self.device)
        return self._quadratic_forms(Z.to(self.device, self.dtype).contiguous())

    def _quadratic_forms(self, Z: Tensor) -> Tensor:
        return (Z * self._matmat(Z)).sum(dim=0)

    def __matmul__(self, other: Tensor) -> Tensor:
        if isinstance(other, Tensor) and other.dim() == 2:
            return self.matmat(other)
        return self.matvec(other)

    def to_dense(self, max_dim: int = DENSE_MAX_DIM) -> Tensor:
        """Return the ``(n, n)`` matrix, built from ``n`` products with unit vectors.

        Meant for small cases and tests: cost ``n`` products and ``n^2`` memory.

        Args:
            max_dim: refuse operators with ``n > max_dim``.

        Raises:
            ValueError: ``n > max_dim``.
        """
        max_dim = check_int("max_dim", max_dim, minimum=1)
        if self._n > max_dim:
            raise ValueError(
                f"to_dense needs n <= max_dim; got n={self._n}, max_dim={max_dim} "
                "(raise max_dim if the n x n matrix really fits in memory)"
            )
        eye = torch.eye(self._n, dtype=self.dtype, device=self.device)
        return self.matmat(eye)


class DenseOperator(LinearOperator):
    """Wrap an explicit symmetric matrix ``A: (n, n)`` as a :class:`LinearOperator`."""

    def __init__(self, matrix: Tensor) -> None:
        if not isinstance(matrix, Tensor) or not matrix.is_floating_point():
            raise TypeError("matrix must be a floating-point torch.Tensor of shape (n, n)")
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square (n, n); got {tuple(matrix.shape)}")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matvec(self, v: Tensor) -> Tensor:
        return self.matrix @ v

    def _matmat(self, V: Tensor) -> Tensor:
        return self.matrix @ V


class CallableOperator(LinearOperator):
    """Wrap a function ``v -> A v`` on ``(n,)`` tensors as a :class:`LinearOperator`."""

    def __init__(
        self,
        fn: Callable[[Tensor], Tensor],
        n: int,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> None:
        if not callable(fn):
            raise TypeError("fn must be callable: v (n,) -> A v (n,)")
        super().__init__(check_int("n", n), dtype, device)
        self._fn = fn

    def _matvec(self, v: Tensor) -> Tensor:
        out = self._fn(v)
        if not isinstance(out, Tensor) or out.shape != (self._n,):
            raise ValueError(f"the matvec callable must return a tensor of shape ({self._n},)")
        return out.to(self.device, self.dtype)


class ObservedOperator(LinearOperator):
    """``operator`` that calls ``on_products(k)`` after every product of ``k`` vectors.

    For progress bars and product counts that keep block products: ``matvec``
    reports ``1``, ``matmat`` of an ``(n, k)`` block (and ``quadratic_forms`` of
    ``k`` vectors) reports ``k``, one call per block, computed as ``operator``
    computes it.

    Args:
        operator: the :class:`LinearOperator` to observe.
        on_products: ``k -> None``, e.g. ``tqdm(...).update``.

    Raises:
        TypeError: ``operator`` is not a :class:`LinearOperator` or ``on_products``
            is not callable.
    """

    def __init__(self, operator: LinearOperator, on_products: Callable[[int], object]) -> None:
        if not isinstance(operator, LinearOperator):
            raise TypeError(
                f"operator must be a fisher_metrics LinearOperator; got {type(operator).__name__}"
            )
        if not callable(on_products):
            raise TypeError("on_products must be callable: k (products done) -> None")
        super().__init__(operator.shape[0], operator.dtype, operator.device)
        self.operator = operator
        self._on_products = on_products
        self.is_psd = getattr(operator, "is_psd", False)

    def _matvec(self, v: Tensor) -> Tensor:
        out = self.operator._matvec(v)
        self._on_products(1)
        return out

    def _matmat(self, V: Tensor) -> Tensor:
        out = self.operator._matmat(V)
        self._on_products(V.shape[1])
        return out

    def _quadratic_forms(self, Z: Tensor) -> Tensor:
        out = self.operator._quadratic_forms(Z)
        self._on_products(Z.shape[1])
        return out


def as_operator(
    operator: LinearOperator | Tensor | Callable[[Tensor], Tensor],
    n: int | None = None,
    dtype: torch.dtype | None = None,
) -> LinearOperator:
    """Return ``operator`` as a :class:`LinearOperator`.

    Args:
        operator: a :class:`LinearOperator`, a dense symmetric ``(n, n)`` tensor,
            or a callable ``v -> A v`` (then ``n`` is required).
        n: size of the callable's vectors; ignored otherwise.
        dtype: dtype of the callable's vectors (default float64); ignored otherwise.

    Raises:
        TypeError: ``operator`` is none of the accepted kinds.
        ValueError: a callable is given without ``n``.
    """
    if isinstance(operator, LinearOperator):
        return operator
    if isinstance(operator, Tensor):
        return DenseOperator(operator)
    if callable(operator):
        if n is None:
            raise ValueError("n (the vector length) is required when operator is a callable")
        return CallableOperator(operator, n, dtype=dtype or torch.float64)
    raise TypeError(
        "operator must be a fisher_metrics LinearOperator, a square tensor, or a callable "
        f"matvec with n; got {type(operator).__name__}"
    )


# --------------------------------------------------------------------------- params


def resolve_parameters(
    model: nn.Module, params: str | Tensor | Iterable[str | Tensor] | None
) -> list[str]:
    """Return the names of the selected parameters, in ``named_parameters()`` order.

    Args:
        model: the model.
        params: ``None`` (every parameter with ``requires_grad``), or a name, a
            regular expression (matched with ``re.search`` against the names;
            a string that is exactly a parameter name selects only it), a
            parameter tensor, or an iterable mixing these. Tied parameters are
            reported under their first name.

    Returns:
        The canonical names of the selected parameters.

    Raises:
        TypeError: an entry is neither a string nor a tensor.
        ValueError: an entry matches no parameter, a regular expression does not
            compile, a tensor is not a parameter of ``model``, or nothing is selected.
    """
    named = list(model.named_parameters())
    canonical = {id(p): name for name, p in named}
    alias = {name: canonical[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}
    selected: set[str] = set()
    if params is None:
        selected = {name for name, p in named if p.requires_grad}
    else:
        if isinstance(params, (str, Tensor)):
            items = [params]
        elif isinstance(params, Iterable):
            items = list(params)
        else:
            raise TypeError(
                "params must be None, a name, a regex, a parameter tensor, or an iterable of "
                f"these; got {type(params).__name__}"
            )
        for item in items:
            if isinstance(item, Tensor):
                if id(item) not in canonical:
                    raise ValueError("params contains a tensor that is not a parameter of model")
                selected.add(canonical[id(item)])
            elif isinstance(item, str):
                if item in alias:
                    selected.add(alias[item])
                    continue
                try:
                    pattern = re.compile(item)
                except re.error as err:
                    raise ValueError(f"params entry {item!r} is not a valid regex: {err}") from err
                hits = {alias[name] for name in alias if pattern.search(name)}
                if not hits:
                    examples = ", ".join(list(alias)[:6])
                    raise ValueError(
                        f"params entry {item!r} matches no parameter name (names look like: "
                        f"{examples}, ...)"
                    )
                selected |= hits
            else:
                raise TypeError(
                    f"params entries must be names, regexes or tensors; got {type(item).__name__}"
                )
    if not selected:
        raise ValueError("params selects no parameter (does any parameter require grad?)")
    names = [name for name, _ in named if name in selected]
    for name, p in named:
        if name in selected and not p.is_floating_point():
            raise ValueError(f"params selects non floating-point parameter {name!r}")
    return names


# --------------------------------------------------------------------------- losses


class RowLoss:
    """Per-row loss ``l(f_r, y_r)`` with its output-space curvature and sampler.

    The loss of a :class:`CurvatureOperator` (its :attr:`~CurvatureOperator.loss`):
    ``row_losses(out, targets)`` gives ``(R,)`` losses of valid-row outputs
    ``(R, C)``; ``output_hvp`` the output-Hessian product ``H_r v``;
    ``sqrt_hessian_times`` ``B_r^T J_r`` (``H_r = B_r B_r^T``); ``sample`` labels
    drawn from the likelihood. ``name``: ``"cross_entropy"``, ``"mse"`` or ``"callable"``.
    """

    name = ""

    def row_losses(self, out: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError

    def output_hvp(self, out: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        raise NotImplementedError

    def sample(self, out: Tensor, num_samples: int, generator: torch.Generator) -> Tensor:
        raise ValueError(
            "curvature='fisher_mc' needs a likelihood to sample labels from: use "
            f"loss_fn in {LOSSES} (got a custom callable loss)"
        )

    def sqrt_hessian_times(self, out: Tensor, J: Tensor) -> Tensor:
        """Return ``B_r^T J_r`` per row, with ``H_r = B_r B_r^T``; ``J: (R, C, n)``."""
        raise ValueError(
            f"the GGN Gram factor needs loss_fn in {LOSSES} (got a custom callable loss)"
        )


class _CrossEntropy(RowLoss):
    name = "cross_entropy"

    def row_losses(self, out: Tensor, targets: Tensor) -> Tensor:
        return nn.functional.cross_entropy(out, targets, reduction="none")

    def output_hvp(self, out: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        p = torch.softmax(out, dim=-1)
        pv = p * v
        return pv - p * pv.sum(dim=-1, keepdim=True)

    def sqrt_hessian_times(self, out: Tensor, J: Tensor) -> Tensor:
        # diag(p) - p p^T = B B^T with B = diag(sqrt p) - p sqrt(p)^T, so
        # (B^T J)_c = sqrt(p_c) (J_c - sum_c' p_c' J_c').
        p = torch.softmax(out, dim=-1)[:, :, None]
        return p.sqrt() * (J - (p * J).sum(dim=1, keepdim=True))

    def sample(self, out: Tensor, num_samples: int, generator: torch.Generator) -> Tensor:
        probs = torch.softmax(out.detach().to("cpu", torch.float64), dim=-1)
        draws = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
        return draws.T.contiguous().to(out.device)


class _SquaredError(RowLoss):
    name = "mse"

    def row_losses(self, out: Tensor, targets: Tensor) -> Tensor:
        return 0.5 * (out - targets).pow(2).sum(dim=-1)

    def output_hvp(self, out: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        return v

    def sqrt_hessian_times(self, out: Tensor, J: Tensor) -> Tensor:
        return J

    def sample(self, out: Tensor, num_samples: int, generator: torch.Generator) -> Tensor:
        base = out.detach().to("cpu", torch.float64)
        noise = torch.randn((num_samples, *base.shape), generator=generator, dtype=torch.float64)
        return (base + noise).to(out.device, out.dtype)


class _CallableLoss(RowLoss):
    name = "callable"

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.fn = fn

    def row_losses(self, out: Tensor, targets: Tensor) -> Tensor:
        losses = self.fn(out, targets)
        if not isinstance(losses, Tensor) or losses.shape != out.shape[:1]:
            raise ValueError(
                "a callable loss_fn must return per-row losses of shape (R,) = "
                f"({out.shape[0]},); got {getattr(losses, 'shape', type(losses).__name__)}"
            )
        return losses

    def output_hvp(self, out: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        def total(o: Tensor) -> Tensor:
            return self.row_losses(o, targets).sum()

        return jvp(grad(total), (out,), (v,))[1]


def _resolve_loss(loss_fn: object, targets: Tensor) -> RowLoss:
    if callable(loss_fn):
        return _CallableLoss(loss_fn)
    if loss_fn is None:
        loss_fn = "mse" if targets.is_floating_point() else "cross_entropy"
    loss_fn = check_choice("loss_fn", loss_fn, LOSSES)
    if loss_fn == "cross_entropy" and targets.is_floating_point():
        raise TypeError("loss_fn='cross_entropy' needs integer class targets; got float targets")
    if loss_fn == "mse" and not targets.is_floating_point():
        raise TypeError("loss_fn='mse' needs float targets; got integer targets")
    return _CrossEntropy() if loss_fn == "cross_entropy" else _SquaredError()


# --------------------------------------------------------------------------- data


_ACCEPTED_DATA = (
    "data must be (inputs, targets), a dict batch with 'labels', or an iterable of either"
)


def batch_list(data: object) -> list[object]:
    """``data`` as a list of single batches (``(inputs, targets)`` pairs or dict batches).

    A single batch becomes a one-item list; an iterable of batches is read once
    into a list (possibly empty). The batches themselves are not checked here.

    Raises:
        TypeError: ``data`` is neither a batch nor an iterable of batches.
    """
    if isinstance(data, Mapping) or (
        isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor)
    ):
        return [data]
    if isinstance(data, (Tensor, str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(f"{_ACCEPTED_DATA}; got {type(data).__name__}")
    return list(data)


def _split_batches(data: object) -> list[tuple[object, Tensor, bool]]:
    """Return ``[(inputs, targets, is_dict)]`` for every batch of ``data``."""
    raw = batch_list(data)
    if not raw:
        raise ValueError("data is an empty iterable: it must hold at least one batch")
    batches = []
    for index, batch in enumerate(raw):
        if isinstance(batch, Mapping):
            if "labels" not in batch or not isinstance(batch["labels"], Tensor):
                raise ValueError(f"dict batch {index} of data has no tensor 'labels'")
            inputs = {key: value for key, value in batch.items() if key != "labels"}
            batches.append((inputs, batch["labels"], True))
        elif isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], Tensor):
            batches.append((batch[0], batch[1], False))
        else:
            raise TypeError(f"batch {index} of data: {_ACCEPTED_DATA}; got {type(batch).__name__}")
    return batches


def _move(obj: object, device: torch.device, dtype: torch.dtype) -> object:
    if isinstance(obj, Tensor):
        return obj.to(device, dtype) if obj.is_floating_point() else obj.to(device)
    if isinstance(obj, Mapping):
        return {key: _move(value, device, dtype) for key, value in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_move(value, device, dtype) for value in obj)
    return obj


def _logits(raw: object) -> Tensor:
    if isinstance(raw, Tensor):
        return raw
    logits = getattr(raw, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(raw, (tuple, list)) and raw and isinstance(raw[0], Tensor):
        return raw[0]
    raise TypeError(
        "model output must be a tensor, an object with a .logits tensor, or a tuple whose "
        f"first entry is a tensor; got {type(raw).__name__}"
    )


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (dropout off), the math attention kernel and no attention fast path,
    undone on exit.

    The fused ``scaled_dot_product_attention`` kernels lack forward-mode AD
    (``jvp``); the math kernel is made of differentiable primitives. In eval mode
    without grad, ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` take a
    fused "fast path" (``aten::_transformer_encoder_layer_fwd``, ``_native_multi_head_attention``)
    that has no forward-mode AD either: it is switched off
    (``torch.backends.mha.set_fastpath_enabled(False)``).
    """
    modes = [(module, module.training) for module in model.modules()]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for module, training in modes:
            module.training = training


@dataclass(eq=False)
class PreparedBatch:
    """One batch, ready for products: inputs, valid-row targets and row layout.

    Built by :class:`CurvatureOperator` (its :attr:`~CurvatureOperator.batches`),
    on the operator's device and dtype.

    Attributes:
        args, kwargs: the model's inputs: ``model(*args, **kwargs)``.
        targets: ``(R_b,)`` class labels or ``(R_b, D)`` float targets of the
            valid rows.
        row_index: ``(R_b,)`` positions of the valid rows among the flattened
            ``(N * T)`` output rows (after the label shift); ``None`` for float
            targets (one row per sample, all valid).
        shift: the labels are shifted by one (causal LM): output position ``t``
            pairs with label ``t + 1``.
        class_layout: integer targets (rows are the leading positions of
            ``(*, C)`` outputs) rather than float targets (one row per sample).
        sampled: the Monte-Carlo labels of :class:`FisherMCOperator`
            (``(S, R_b[, D])``), else ``None``.
    """

    args: tuple
    kwargs: dict
    targets: Tensor
    row_index: Tensor | None
    shift: bool
    class_layout: bool
    sampled: Tensor | None = None

    @property
    def num_rows(self) -> int:
        return int(self.targets.shape[0])

    def outputs(
        self,
        call: Callable[[dict, tuple, dict], object],
        params: dict,
        args: tuple | None = None,
    ) -> Tensor:
        """Model outputs (logits) at ``params``, without the last position when shifted.

        Args:
            call: ``(params, args, kwargs) -> model output`` (a tensor, an object
                with ``.logits``, or a tuple led by a tensor), e.g.
                :meth:`CurvatureOperator.call`.
            params: ``{name: tensor}`` of the operator's parameters.
            args: positional inputs in place of :attr:`args` (e.g. one sample of
                them under ``vmap``); the keyword inputs stay :attr:`kwargs`.
        """
        out = _logits(call(params, self.args if args is None else args, self.kwargs))
        return out[:, :-1] if self.shift else out

    def rows(self, call: Callable[[dict, tuple, dict], object], params: dict) -> Tensor:
        """Valid-row outputs ``(R, C)`` at ``params`` (``call`` as for :meth:`outputs`)."""
        out = self.outputs(call, params)
        out = out.reshape(-1, out.shape[-1]) if self.class_layout else out.reshape(out.shape[0], -1)
        if self.row_index is not None:
            out = out.index_select(0, self.row_index)
        return out


def _prepare_batch(
    out: Tensor,
    args: tuple,
    kwargs: dict,
    targets: Tensor,
    attention: Tensor | None,
    shift: bool,
    index: int,
) -> PreparedBatch:
    """Work out the valid rows of one batch from its outputs ``out`` and targets.

    ``attention`` is the dict batch's ``attention_mask`` (``None`` otherwise).
    """
    where = f"batch {index} of data"
    if targets.is_floating_point():
        if out.shape[0] != targets.shape[0] or out[0].numel() != targets[0].numel():
            raise ValueError(
                f"{where}: float targets need outputs (N, ...) and targets (N, ...) with the same "
                f"number of entries per row; got outputs {tuple(out.shape)} and targets "
                f"{tuple(targets.shape)}"
            )
        flat = targets.reshape(targets.shape[0], -1)
        return PreparedBatch(args, kwargs, flat, None, False, class_layout=False)
    mask = None
    if shift:
        if out.dim() != 3 or targets.dim() != 2:
            raise ValueError(
                f"{where}: shifted (causal LM) labels need logits (B, T, V) and labels (B, T); "
                f"got {tuple(out.shape)} and {tuple(targets.shape)}"
            )
        out, targets = out[:, :-1], targets[:, 1:]
    if out.shape[:-1] != targets.shape:
        raise ValueError(
            f"{where}: integer targets need outputs (*, C) and targets (*); got outputs "
            f"{tuple(out.shape)} and targets {tuple(targets.shape)}"
        )
    if attention is not None:
        attention = attention[:, 1:] if shift else attention
        if attention.shape == targets.shape:
            mask = attention != 0
    flat = targets.reshape(-1)
    valid = flat != IGNORE_INDEX
    if mask is not None:
        valid &= mask.reshape(-1)
    row_index = torch.nonzero(valid).reshape(-1)
    flat = flat[row_index]
    num_classes = out.shape[-1]
    if flat.numel() and (flat.min() < 0 or flat.max() >= num_classes):
        raise ValueError(
            f"{where}: class targets must lie in [0, {num_classes}) or be {IGNORE_INDEX}; "
            f"got range [{int(flat.min())}, {int(flat.max())}]"
        )
    return PreparedBatch(args, kwargs, flat, row_index, shift, class_layout=True)


# --------------------------------------------------------------------------- operators


class CurvatureOperator(LinearOperator):
    """Base class: a curvature matrix of the mean loss over a parameter subset.

    Args:
        model: the model; called as ``model(inputs)`` (``model(*inputs)`` for a
            tuple, ``model(**inputs)`` for a dict) or ``model(**batch)`` for dict
            batches.
        data: ``(inputs, targets)``, a dict batch with ``labels``, or an iterable
            of either. Iterables are read once and kept (on the model's device)
            so every product sees the same rows.
        params: parameter selection, see :func:`resolve_parameters`.
        loss_fn: ``None`` (cross-entropy for integer targets, squared error for
            float targets, see the module docstring), ``"cross_entropy"``,
            ``"mse"``, or a callable of per-row losses.
        dtype: ``torch.float32`` or ``torch.float64``. Default: the dtype of the
            first selected parameter. A different dtype evaluates a converted
            copy of the model (one extra model copy in memory).
        shift_labels: shift token labels by one (causal LM). ``None``: shift for
            dict batches of Hugging Face causal LMs only.
        chunk_size: columns of a block product computed together (>= 1; default
            ``DEFAULT_CHUNK_SIZE``); see the module docstring.

    Attributes:
        param_names: selected parameter names (flat-vector order).
        param_shapes: ``{name: shape}`` of the selected parameters, in that order.
        num_rows: ``R``, the number of valid rows (samples or tokens) in ``data``.
        num_batches: number of batches in ``data``.
        chunk_size: the ``chunk_size`` argument.
        vectorized: block products are vectorized (``False`` after a fallback).
        loss_name: ``"cross_entropy"``, ``"mse"`` or ``"callable"``.
        is_psd: whether the matrix is positive semi-definite by construction.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ``data``, ``params``,
            ``loss_fn`` or ``dtype`` is of the wrong kind.
        ValueError: bad ``params`` entries, shapes of outputs and targets that do
            not pair up, class targets out of range; :class:`EmptyBatchError` (a
            ``ValueError``) when ``data`` has no valid row.
    """

    is_psd = True

    def __init__(
        self,
        model: nn.Module,
        data: object,
        *,
        params: str | Tensor | Iterable[str | Tensor] | None = None,
        loss_fn: str | Callable[[Tensor, Tensor], Tensor] | None = None,
        dtype: torch.dtype | None = None,
        shift_labels: bool | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        self.chunk_size = check_int("chunk_size", chunk_size)
        self.vectorized = True
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        check_dtype("dtype", dtype)
        if shift_labels is not None and not isinstance(shift_labels, bool):
            raise TypeError(f"shift_labels must be None, True or False; got {shift_labels!r}")
        if loss_fn is not None and not callable(loss_fn) and not isinstance(loss_fn, str):
            raise TypeError(
                f"loss_fn must be None, one of {LOSSES}, or a callable; "
                f"got {type(loss_fn).__name__}"
            )
        names = resolve_parameters(model, params)
        lookup = dict(model.named_parameters())
        first = lookup[names[0]]
        dtype = dtype or first.dtype
        if dtype not in LANCZOS_DTYPES:
            raise ValueError(
                f"dtype must be one of {LANCZOS_DTYPES}; the model's parameters are {dtype}, so "
                "pass dtype=torch.float32 or torch.float64"
            )
        if any(lookup[name].dtype != dtype for name in names):
            model = copy.deepcopy(model).to(dtype)
            lookup = dict(model.named_parameters())
        super().__init__(sum(lookup[name].numel() for name in names), dtype, first.device)
        self._model = model
        self.param_names = names
        self._params = {name: lookup[name].detach() for name in names}
        self.param_shapes = {name: p.shape for name, p in self._params.items()}
        self._accepts_use_cache = "use_cache" in inspect.signature(model.forward).parameters
        self._batches, self._loss = self._prepare(data, loss_fn, shift_labels)
        self.num_batches = len(self._batches)
        self.num_rows = sum(batch.num_rows for batch in self._batches)
        if self.num_rows == 0:
            raise EmptyBatchError("data has no valid row (every label is -100 or masked)")
        self.loss_name = self._loss.name

    # ---------------------------------------------------------------- plumbing

    @property
    def model(self) -> nn.Module:
        """The model the products evaluate (a converted copy when ``dtype`` differs)."""
        return self._model

    @property
    def params(self) -> dict[str, Tensor]:
        """``{name: detached parameter}`` of the selected parameters (a new dict each time)."""
        return dict(self._params)

    @property
    def batches(self) -> tuple[PreparedBatch, ...]:
        """The prepared batches of ``data``, in order."""
        return tuple(self._batches)

    @property
    def loss(self) -> RowLoss:
        """The per-row loss."""
        return self._loss

    def call(self, params: dict, args: tuple, kwargs: dict) -> object:
        """The model's raw output at ``params``: ``functional_call(model, params, args, kwargs)``.

        Run it inside :func:`evaluation_mode` (``torch.no_grad()`` too unless
        differentiating with ``torch.func``), as the products do.
        """
        return functional_call(self._model, params, args, kwargs)

    def _prepare(self, data: object, loss_fn: object, shift_labels: bool | None):
        batches, loss = [], None
        with torch.no_grad(), evaluation_mode(self._model):
            for index, (inputs, targets, is_dict) in enumerate(_split_batches(data)):
                inputs = _move(inputs, self.device, self.dtype)
                targets = _move(targets, self.device, self.dtype)
                if is_dict:
                    args, kwargs = (), dict(inputs)
                    if self._accepts_use_cache and "use_cache" not in kwargs:
                        kwargs["use_cache"] = False
                elif isinstance(inputs, Mapping):
                    args, kwargs = (), dict(inputs)
                elif isinstance(inputs, (tuple, list)):
                    args, kwargs = tuple(inputs), {}
                else:
                    args, kwargs = (inputs,), {}
                if loss is None:
                    loss = _resolve_loss(loss_fn, targets)
                elif targets.is_floating_point() != batches[0].targets.is_floating_point():
                    raise TypeError(f"batch {index} of data: targets change between int/float")
                out = _logits(self.call(self._params, args, kwargs))
                shift = shift_labels
                if shift is None:
                    shift = bool(
                        is_dict
                        and targets.dim() == 2
                        and out.dim() == 3
                        and is_causal_lm(self._model)
                    )
                attention = kwargs.get("attention_mask") if is_dict else None
                if not isinstance(attention, Tensor) or attention.dim() != 2:
                    attention = None
                batches.append(_prepare_batch(out, args, kwargs, targets, attention, shift, index))
        return batches, loss

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """Concatenate per-parameter tensors (keyed by name) into an ``(n,)`` vector."""
        return torch.cat([tensors[name].reshape(-1) for name in self.param_names])

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """Split an ``(n,)`` vector into per-parameter tensors keyed by name."""
        out, offset = {}, 0
        for name in self.param_names:
            p = self._params[name]
            out[name] = vector[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        return out

    def _normalizer(self) -> int:
        return self.num_rows

    def _batch_product(self, batch: PreparedBatch, v: dict[str, Tensor]) -> dict[str, Tensor]:
        """Return ``sum over the batch's rows`` of the curvature times ``v``."""
        raise NotImplementedError

    def _batch_block_product(self, batch: PreparedBatch, V: dict[str, Tensor]) -> dict[str, Tensor]:
        """``_batch_product`` of ``k`` tangents at once: ``V[name]: (k, *shape)``.

        Default: ``vmap`` of :meth:`_batch_product`; subclasses share the
        linearization between the ``k`` columns.
        """
        return vmap(lambda v: self._batch_product(batch, v))(V)

    def _batch_block_forms(self, batch: PreparedBatch, V: dict[str, Tensor]) -> Tensor:
        """``(k,)`` sums over the batch's rows of ``v_j^T (row curvature) v_j``.

        Default: from :meth:`_batch_block_product`.
        """
        products = self._batch_block_product(batch, V)
        return sum(
            (products[name] * V[name]).reshape(products[name].shape[0], -1).sum(dim=1)
            for name in self.param_names
        )

    def _matvec(self, v: Tensor) -> Tensor:
        tangent = self.unflatten(v)
        total = torch.zeros_like(v)
        with torch.no_grad(), evaluation_mode(self._model):
            for batch in self._batches:
                total += self.flatten(self._batch_product(batch, tangent))
        return total / self._normalizer()

    def _tangents(self, V: Tensor) -> dict[str, Tensor]:
        """``V: (n, k)`` as ``{name: (k, *shape)}`` (views of one ``(k, n)`` copy)."""
        rows = V.T.contiguous()
        tangents, offset = {}, 0
        for name in self.param_names:
            size = self._params[name].numel()
            tangents[name] = rows[:, offset : offset + size].view(-1, *self.param_shapes[name])
            offset += size
        return tangents

    def _block(self, V: Tensor) -> Tensor:
        """Vectorized ``A V`` for one chunk ``V: (n, k)``."""
        tangents = self._tangents(V)
        total = torch.zeros(V.shape[1], V.shape[0], dtype=V.dtype, device=V.device)
        with torch.no_grad(), evaluation_mode(self._model):
            for batch in self._batches:
                out = self._batch_block_product(batch, tangents)
                total += torch.cat(
                    [out[name].reshape(V.shape[1], -1) for name in self.param_names], 1
                )
        return total.T / self._normalizer()

    def _block_forms(self, V: Tensor) -> Tensor:
        """Vectorized ``(k,)`` quadratic forms of one chunk ``V: (n, k)``."""
        tangents = self._tangents(V)
        with torch.no_grad(), evaluation_mode(self._model):
            total = sum(self._batch_block_forms(batch, tangents) for batch in self._batches)
        return total / self._normalizer()

    def _chunked(self, V: Tensor, block: Callable, loop: Callable) -> Tensor:
        """``block`` on chunks of ``chunk_size`` columns (``loop`` for single columns and
        after a fallback), concatenated along the last dimension."""
        chunks = []
        for start in range(0, V.shape[1], self.chunk_size):
            chunk = V[:, start : start + self.chunk_size]
            if self.vectorized and chunk.shape[1] > 1:
                try:
                    chunks.append(block(chunk))
                    continue
                except RuntimeError:
                    # An operation of the model has no batching rule that torch.func can
                    # use (e.g. data-dependent control flow on a tangent): loop instead.
                    self.vectorized = False
            chunks.append(loop(chunk))
        return torch.cat(chunks, dim=-1)

    def _matmat(self, V: Tensor) -> Tensor:
        return self._chunked(V, self._block, super()._matmat)

    def _quadratic_forms(self, Z: Tensor) -> Tensor:
        def loop(chunk: Tensor) -> Tensor:
            return (chunk * LinearOperator._matmat(self, chunk)).sum(dim=0)

        return self._chunked(Z, self._block_forms, loop)

    def gram_factor(self) -> Tensor:
        """Return ``V: (N, n)`` with ``A = V^T V`` (the Gram-trick factor).

        ``V V^T`` (``N x N``) has the non-zero eigenvalues of ``A``, which is
        cheaper when ``N < n`` (Papyan 2019). Rows: ``g_i / sqrt(N)`` for the
        (empirical or sampled) Fisher; ``B_r^T J_r / sqrt(R)`` (``C`` rows per
        valid row) for the GGN. Built with ``jacrev`` (``N`` backward passes,
        vectorized), so it needs ``N * n`` memory.

        Raises:
            TypeError: the Hessian has no Gram factor.
            ValueError: the GGN of a callable loss (its output-Hessian root is
                not known).
        """
        raise TypeError(f"{type(self).__name__} is not a Gram matrix: no gram_factor")

    def _jacobian(self, fn: Callable[[dict], Tensor]) -> Tensor:
        """``jacrev`` of ``fn`` (output ``(N, ...)``) as an ``(N, ..., n)`` tensor."""
        jac = jacrev(fn)(self._params)
        return torch.cat(
            [
                jac[name].flatten(start_dim=jac[name].dim() - self._params[name].dim())
                for name in self.param_names
            ],
            dim=-1,
        )

    def mean_loss(self) -> float:
        """Return the mean loss ``L`` over all valid rows at the current parameters."""
        total = 0.0
        with torch.no_grad(), evaluation_mode(self._model):
            for batch in self._batches:
                out = batch.rows(self.call, self._params)
                total += float(self._loss.row_losses(out, batch.targets).sum())
        return total / self.num_rows


class GGNOperator(CurvatureOperator):
    """Generalized Gauss-Newton ``G = (1/R) sum_r J_r^T H_r J_r`` (= Fisher for CE / MSE).

    One product costs one ``jvp`` and one ``vjp`` through the model per batch.
    Cross-entropy: ``H_r v = p_r * v - p_r (p_r . v)``; squared error: ``H_r = I``;
    callable loss: ``H_r v`` by forward-over-reverse differentiation of the loss in
    the outputs. See :class:`CurvatureOperator` for the arguments.
    """

    def _batch_product(self, batch: PreparedBatch, v: dict[str, Tensor]) -> dict[str, Tensor]:
        def outputs(p: dict) -> Tensor:
            return batch.rows(self.call, p)

        out, jv = jvp(outputs, (self._params,), (v,))
        _, pullback = vjp(outputs, self._params)
        return pullback(self._loss.output_hvp(out, batch.targets, jv))[0]

    def _batch_block_product(self, batch: PreparedBatch, V: dict[str, Tensor]) -> dict[str, Tensor]:
        def outputs(p: dict) -> Tensor:
            return batch.rows(self.call, p)

        out, pullback = vjp(outputs, self._params)
        JV = vmap(lambda v: jvp(outputs, (self._params,), (v,))[1])(V)
        HJV = vmap(lambda u: self._loss.output_hvp(out, batch.targets, u))(JV)
        return vmap(pullback)(HJV)[0]

    def _batch_block_forms(self, batch: PreparedBatch, V: dict[str, Tensor]) -> Tensor:
        def outputs(p: dict) -> Tensor:
            return batch.rows(self.call, p)

        def forward(v: dict[str, Tensor]) -> Tensor:
            out, jv = jvp(outputs, (self._params,), (v,))
            return (jv * self._loss.output_hvp(out, batch.targets, jv)).sum()

        return vmap(forward)(V)

    def gram_factor(self) -> Tensor:
        blocks = []
        with torch.no_grad(), evaluation_mode(self._model):
            for batch in self._batches:
                out = batch.rows(self.call, self._params)
                J = self._jacobian(lambda p, b=batch: b.rows(self.call, p))
                blocks.append(self._loss.sqrt_hessian_times(out, J).reshape(-1, self._n))
        return torch.cat(blocks) / self._normalizer() ** 0.5


class HessianOperator(CurvatureOperator):
    """Hessian ``H = d^2 L / d theta^2`` of the mean loss (forward-over-reverse ``hvp``).

    Not positive semi-definite in general (``is_psd = False``). See
    :class:`CurvatureOperator` for the arguments.
    """

    is_psd = False

    def _batch_product(self, batch: PreparedBatch, v: dict[str, Tensor]) -> dict[str, Tensor]:
        def total(p: dict) -> Tensor:
            return self._loss.row_losses(batch.rows(self.call, p), batch.targets).sum()

        return jvp(grad(total), (self._params,), (v,))[1]


class _GradientOuterProduct(CurvatureOperator):
    """``(1/N) sum_i g_i g_i^T`` over per-row loss gradients ``g_i``, without forming them.

    With ``u = J_l v`` (``J_l``: Jacobian of the per-row losses, one ``jvp``), the
    product is ``J_l^T u / N`` (one ``vjp``).
    """

    def _row_losses(self, batch: PreparedBatch, params: dict) -> Tensor:
        raise NotImplementedError

    def _batch_product(self, batch: PreparedBatch, v: dict[str, Tensor]) -> dict[str, Tensor]:
        def losses(p: dict) -> Tensor:
            return self._row_losses(batch, p)

        _, u = jvp(losses, (self._params,), (v,))
        _, pullback = vjp(losses, self._params)
        return pullback(u)[0]

    def _batch_block_product(self, batch: PreparedBatch, V: dict[str, Tensor]) -> dict[str, Tensor]:
        def losses(p: dict) -> Tensor:
            return self._row_losses(batch, p)

        _, pullback = vjp(losses, self._params)
        U = vmap(lambda v: jvp(losses, (self._params,), (v,))[1])(V)
        return vmap(pullback)(U)[0]

    def _batch_block_forms(self, batch: PreparedBatch, V: dict[str, Tensor]) -> Tensor:
        def losses(p: dict) -> Tensor:
            return self._row_losses(batch, p)

        return vmap(lambda v: jvp(losses, (self._params,), (v,))[1].pow(2).sum())(V)

    def gram_factor(self) -> Tensor:
        with torch.no_grad(), evaluation_mode(self._model):
            blocks = [
                self._jacobian(lambda p, b=batch: self._row_losses(b, p)) for batch in self._batches
            ]
        return torch.cat(blocks) / self._normalizer() ** 0.5


class EmpiricalFisherOperator(_GradientOuterProduct):
    """Empirical Fisher ``E = (1/R) sum_r g_r g_r^T`` with the data labels.

    See :class:`CurvatureOperator` for the arguments.
    """

    def _row_losses(self, batch: PreparedBatch, params: dict) -> Tensor:
        return self._loss.row_losses(batch.rows(self.call, params), batch.targets)


class FisherMCOperator(_GradientOuterProduct):
    """Monte-Carlo Fisher ``F = (1/(R S)) sum_r sum_s g_rs g_rs^T`` with sampled labels.

    Labels ``y_rs ~ p(y | f_r)`` are drawn once at construction from a CPU
    ``torch.Generator`` seeded with ``seed`` (categorical ``softmax(f_r)`` for
    cross-entropy; ``f_r + N(0, I)`` for the squared error), so the operator is a
    fixed matrix and the same seed gives the same matrix on any device.
    ``E[F] = G`` (the GGN) for these losses.

    Args:
        mc_samples: ``S``, label samples per row (>= 1).
        seed: seed of the label sampler (>= 0).
        **kwargs: see :class:`CurvatureOperator`.

    Attributes:
        sampled_targets: per batch, ``(S, R_b)`` class labels or ``(S, R_b, D)``
            regression targets.

    Raises:
        ValueError: ``loss_fn`` is a callable (no likelihood to sample from), or
            ``mc_samples`` / ``seed`` out of range.
    """

    def __init__(
        self, model: nn.Module, data: object, *, mc_samples: int = 1, seed: int = 0, **kwargs
    ) -> None:
        self.mc_samples = check_int("mc_samples", mc_samples, minimum=1)
        self.seed = check_seed("seed", seed)
        super().__init__(model, data, **kwargs)
        generator = torch.Generator().manual_seed(self.seed)
        with torch.no_grad(), evaluation_mode(self._model):
            for batch in self._batches:
                out = batch.rows(self.call, self._params)
                batch.sampled = self._loss.sample(out, self.mc_samples, generator)

    @property
    def sampled_targets(self) -> list[Tensor]:
        return [batch.sampled for batch in self._batches]

    def _normalizer(self) -> int:
        return self.num_rows * self.mc_samples

    def _row_losses(self, batch: PreparedBatch, params: dict) -> Tensor:
        sampled = batch.sampled
        out = batch.rows(self.call, params)
        repeated = out.repeat(self.mc_samples, 1)
        return self._loss.row_losses(repeated, sampled.reshape(-1, *sampled.shape[2:]))


_OPERATORS = {
    "ggn": GGNOperator,
    "fisher_mc": FisherMCOperator,
    "empirical_fisher": EmpiricalFisherOperator,
    "hessian": HessianOperator,
}


def make_operator(
    model: nn.Module,
    data: object,
    curvature: str = "ggn",
    *,
    params: str | Tensor | Iterable[str | Tensor] | None = None,
    loss_fn: str | Callable[[Tensor, Tensor], Tensor] | None = None,
    dtype: torch.dtype | None = None,
    shift_labels: bool | None = None,
    mc_samples: int = 1,
    seed: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> CurvatureOperator:
    """Build the curvature operator named by ``curvature``.

    Args:
        model, data, params, loss_fn, dtype, shift_labels, chunk_size: see
            :class:`CurvatureOperator`.
        curvature: one of ``"ggn"``, ``"fisher_mc"``, ``"empirical_fisher"``,
            ``"hessian"``.
        mc_samples, seed: label sampling of ``"fisher_mc"`` (ignored otherwise).

    Returns:
        An ``(n, n)`` :class:`CurvatureOperator`.

    Raises:
        ValueError: ``curvature`` is not one of the names above; see also
            :class:`CurvatureOperator`.
    """
    check_choice("curvature", curvature, CURVATURES)
    kwargs = dict(
        params=params,
        loss_fn=loss_fn,
        dtype=dtype,
        shift_labels=shift_labels,
        chunk_size=chunk_size,
    )
    if curvature == "fisher_mc":
        return FisherMCOperator(model, data, mc_samples=mc_samples, seed=seed, **kwargs)
    return _OPERATORS[curvature](model, data, **kwargs)
