"""``KFACFisher``: the Fisher of the stored K-FAC factors, without another pass over data.

For a layer with weight matrix ``W`` (``o x d``, the bias as the last input
column) the K-FAC approximation of the Fisher block with respect to the
column-major ``vec(W)`` is (Martens & Grosse 2015, Eq. 5; docs/design.md)

    F_layer = A (x) G,     A = (1/T) sum a a^T  (d x d),   G = (1/N) sum g g^T  (o x o),

so that, with ``A = Q_A diag(s_A) Q_A^T`` and ``G = Q_G diag(s_G) Q_G^T``:

- eigenvalues: ``{s_A,i * s_G,j}`` (Van Loan 2000, "The ubiquitous Kronecker product", Sec. 2);
- trace: ``tr(A) tr(G)``;
- log-determinant: ``log det(A (x) G + lambda I) = sum_ij log(s_A,i s_G,j + lambda)``;
- product: ``(A (x) G) vec(V) = vec(G V A)`` for ``V: (o, d)`` (``A`` symmetric).

The model's Fisher is approximated block-diagonally, one block per layer, so the
whole-model eigenvalues are the union of the layers'.

Factors are read from a ``kfac_optim.KFACPreconditioner`` (duck-typed: any
object with ``state_dict()`` and ``model``) or from its ``state_dict()``, through
``kfac_optim.state`` (the saved-state schema; ``read_factors``): ``{"steps",
"layers": {name: {"A": {"ema", "weight", "updates"}, "G": {...}, "G_low_rank",
...}}}``. Bias-corrected factors are ``A = A.ema / A.weight`` (a vector, the
diagonal, for ``nn.Embedding``) and ``G = G.ema / G.weight``, or, for a low-rank
G (Woodbury policy), ``G = U U^T`` with ``U = cols / sqrt(weight)`` (``o x k``).
A low-rank G's eigenvalues come from the ``k x k`` Gram ``U^T U`` (same non-zero
eigenvalues; ``o - k`` zeros), never from a dense ``o x o`` matrix. The stored
eigendecompositions (``inv``) are not used: they may be stale
(``inv_update_steps``) or clipped (``max_condition_number``).

Layer kinds and the weight-matrix convention are ``kfac_optim.layers``'
(``layer_kind``, ``weight_matrix``, ``parameters_from_matrix``): ``nn.Linear``
weight ``(o, d_in)``; Hugging Face ``Conv1D`` stores ``(d_in, o)`` (transposed);
``nn.Conv2d`` weight ``(o, C, kh, kw)`` reshaped to ``(o, C kh kw)``;
``nn.Embedding`` weight ``(V, D)`` is ``W^T`` with ``o = D``, ``d = V``. The
bias, when present, is the last column of ``W``.

Scale: ``A (x) G`` approximates the Fisher of the *mean* loss per row (sample
or token). ``kfac_optim`` builds ``G`` from the gradients of the training loss
(data labels), i.e. a Kronecker-factored *empirical* Fisher unless labels were
sampled from the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from kfac_optim.layers import (
    LAYER_KINDS,
    SUPPORTED_MODULES,
    layer_bias,
    layer_kind,
    matrix_shape,
    parameters_from_matrix,
    split_group_name,
    weight_matrix,
)
from kfac_optim.state import g_rows, preconditioner_state, read_factors

from ._validation import check_dtype, check_int, check_positive_float
from .representation import FisherRepresentation, log_sum

__all__ = ["BY_DESIGN", "KFACFisher", "LAYER_KINDS", "layer_kind"]

BY_DESIGN = "skipped by design"  # how a skipped_layers reason for a deliberate skip begins

_CHUNK = 2**22  # entries of s_A s_G^T handled at once by logdet


@dataclass(eq=False)
class _Layer:
    """One layer's factors and parameter layout; eigenvalues cached on first use."""

    name: str
    kind: str
    weight: str
    bias: str | None
    weight_shape: torch.Size
    out_features: int
    in_features: int
    a: Tensor  # (d, d), or (d,) diagonal for an Embedding
    g: Tensor | None  # dense (o, o), or None when low-rank
    u: Tensor | None  # (o, k) with G = U U^T, or None when dense
    updates: int
    spectra: tuple[Tensor, Tensor, int] | None = None

    @property
    def params(self) -> list[str]:
        return [self.weight] + ([self.bias] if self.bias else [])

    def to_matrix(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """Parameter tensors -> ``V: (o, d)`` (bias last column)."""
        bias = None if self.bias is None else tensors[self.bias]
        return weight_matrix(self.kind, tensors[self.weight], bias)

    def from_matrix(self, V: Tensor) -> dict[str, Tensor]:
        """``V: (o, d)`` -> parameter tensors."""
        weight, bias = parameters_from_matrix(self.kind, V, self.weight_shape,
                                              self.bias is not None)
        out = {} if bias is None else {self.bias: bias.contiguous()}
        out[self.weight] = weight.contiguous()
        return out

    def factor_spectra(self) -> tuple[Tensor, Tensor, int]:
        """``(s_A (d,), s_G (r,), z)``: descending float64 CPU eigenvalues, ``z = o - r``.

        Factor eigenvalues below 0 (round-off of a PSD matrix) are set to 0.
        """
        if self.spectra is None:
            if self.a.dim() == 1:
                s_a = self.a
            else:
                s_a = torch.linalg.eigvalsh(self.a)
            if self.u is None:
                s_g = torch.linalg.eigvalsh(self.g)
            elif self.u.shape[1] < self.u.shape[0]:
                s_g = torch.linalg.eigvalsh(self.u.T @ self.u)  # Gram trick: k x k
            else:
                s_g = torch.linalg.eigvalsh(self.u @ self.u.T)
            s_a = torch.sort(s_a.to("cpu", torch.float64).clamp_min(0.0), descending=True).values
            s_g = torch.sort(s_g.to("cpu", torch.float64).clamp_min(0.0), descending=True).values
            self.spectra = (s_a, s_g, self.out_features - s_g.numel())
        return self.spectra

    def trace_a(self) -> float:
        return float(self.a.sum() if self.a.dim() == 1 else self.a.diagonal().sum())

    def trace_g(self) -> float:
        return float(self.g.diagonal().sum() if self.u is None else (self.u * self.u).sum())

    def mvp(self, V: Tensor) -> Tensor:
        """``G V A`` (``mat((A (x) G) vec(V))``)."""
        gv = self.g @ V if self.u is None else self.u @ (self.u.T @ V)
        return gv * self.a if self.a.dim() == 1 else gv @ self.a


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


class KFACFisher(FisherRepresentation):
    """Block-diagonal K-FAC Fisher ``diag(A_l (x) G_l)`` from stored K-FAC factors.

    Build it with :meth:`from_preconditioner` or :meth:`from_state_dict`; see the
    module docstring for the formulas and conventions.

    Attributes:
        layers: K-FAC layer (module) names, in the state's order.
        layer_params: ``{layer: [weight name, bias name]}`` (canonical
            ``named_parameters()`` names; a tied weight appears under its first name).
        param_names: all covered parameters, ``named_parameters()`` order.
        param_shapes: ``{name: shape}``.
        steps: the preconditioner's step count.
        provenance: how the factors were obtained: the ``"fit"`` entry of a state from
            :func:`fisher_metrics.fit_factors` (``{"source": "fitted", "fisher", ...}``),
            else ``{"source": "state", "steps": steps}`` (a saved K-FAC state).
        skipped_layers: ``{layer: reason}`` for state layers without factors, not covered:
            skipped by design (a position table, left to the base update by ``kfac_optim``;
            the reason begins with :data:`BY_DESIGN`), not read (the q, k, v blocks of an
            ``nn.MultiheadAttention``), or without a factor update yet (never reached by a
            captured backward).
        dtype, device: of the factors here (default float64) and of products.
    """

    def __init__(
        self,
        model: nn.Module,
        state: Mapping,
        *,
        dtype: torch.dtype | None = torch.float64,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        check_dtype("dtype", dtype)
        state = preconditioner_state(state)
        owners = state.get("owners")
        if owners:
            raise ValueError(
                f"the K-FAC state is rank {owners['rank']}'s under inverse_workers='owner' "
                f"(owners {owners['layers']}): it holds the factors of that rank's layers only. "
                "Read a state of inverse_workers='replicate' (or 'assign'), or of a single "
                "process; gather the ranks' states into one first"
            )
        while isinstance(model, DistributedDataParallel):
            model = model.module
        named = list(model.named_parameters())
        canonical = {id(p): name for name, p in named}
        order = {name: i for i, (name, _) in enumerate(named)}
        self.aliases = {
            name: canonical[id(p)] for name, p in model.named_parameters(remove_duplicate=False)
        }
        self.steps = int(state.get("steps", 0))
        fit = state.get("fit")
        self.provenance = (dict(fit) if isinstance(fit, Mapping) else
                           {"source": "state", "steps": self.steps})
        self._layers: dict[str, _Layer] = {}
        owner: dict[str, str] = {}
        self.skipped_layers: dict[str, str] = {}
        for name, entry in state["layers"].items():
            layer = self._build_layer(model, canonical, name, entry, dtype)
            if isinstance(layer, str):
                self.skipped_layers[name] = layer
                continue
            for param in layer.params:
                if param in owner:
                    raise ValueError(
                        f"parameter {param!r} belongs to K-FAC layers {owner[param]!r} and "
                        f"{name!r}: a block-diagonal Fisher needs each parameter in one layer"
                    )
                owner[param] = name
            self._layers[name] = layer
        if not self._layers:
            raise ValueError(
                "the K-FAC state has no layer with factors (skipped: "
                f"{self.skipped_layers or 'none'}): run preconditioner steps that update factors"
            )
        first = next(iter(self._layers.values()))
        self.dtype = first.a.dtype
        self.device = first.a.device
        self.layers = list(self._layers)
        self.layer_params = {name: layer.params for name, layer in self._layers.items()}
        self.param_names = sorted(owner, key=order.__getitem__)
        lookup = dict(named)
        self.param_shapes = {name: lookup[name].shape for name in self.param_names}
        self.aliases = {alias: name for alias, name in self.aliases.items() if name in owner}

    # ------------------------------------------------------------ constructors

    @classmethod
    def from_preconditioner(
        cls, preconditioner: object, *, dtype: torch.dtype | None = torch.float64
    ) -> KFACFisher:
        """From a live ``kfac_optim.KFACPreconditioner`` (or a ``KFAC`` optimizer).

        Reads ``preconditioner.state_dict()`` and ``preconditioner.model``
        (duck-typed; a ``KFAC`` optimizer's ``.preconditioner`` is used).

        Args:
            preconditioner: the preconditioner or the optimizer holding it.
            dtype: dtype of the factors here (float32 or float64, default
                float64; ``None`` keeps the stored dtype, raised to float32).

        Raises:
            TypeError: ``preconditioner`` has no ``state_dict()`` and ``model``.
            ValueError: as for :meth:`from_state_dict`.
        """
        pre = getattr(preconditioner, "preconditioner", preconditioner)
        model = getattr(pre, "model", None)
        if not callable(getattr(pre, "state_dict", None)) or not isinstance(model, nn.Module):
            raise TypeError(
                "preconditioner must be a kfac_optim.KFACPreconditioner (or a KFAC optimizer): an "
                f"object with .state_dict() and .model; got {type(preconditioner).__name__}"
            )
        return cls(model, pre.state_dict(), dtype=dtype)

    @classmethod
    def from_state_dict(
        cls, state: Mapping, model: nn.Module, *, dtype: torch.dtype | None = torch.float64
    ) -> KFACFisher:
        """From ``KFACPreconditioner.state_dict()`` (or a ``KFAC`` optimizer's ``state_dict()``).

        Args:
            state: the state dict (e.g. ``torch.load`` of a saved one); a ``KFAC``
                optimizer's state (its ``"kfac"`` entry) is accepted too.
            model: the model the state belongs to (maps layer names to modules
                and parameters); a ``DistributedDataParallel`` wrapper is unwrapped.
            dtype: see :meth:`from_preconditioner`.

        Raises:
            TypeError: ``model`` is not an ``nn.Module``; ``state`` is not a K-FAC state.
            ValueError: a layer name is not a module of ``model`` or not a
                supported layer type, factor shapes do not match the module
                (naming the layer), or no layer has factors yet. Layers without
                factors yet are listed in :attr:`skipped_layers`. A low-rank G that
                holds only some rows of U (one rank's state under
                ``woodbury_reduction="row_sharded"``) is refused, naming the layer. One
                rank's state under ``inverse_workers="owner"`` (a subset of the layers) is
                refused, naming the owners.
        """
        return cls(model, state, dtype=dtype)

    @staticmethod
    def _build_layer(
        model: nn.Module, canonical: dict, name: str, entry: Mapping, dtype: torch.dtype | None
    ) -> _Layer | str:
        """The layer's factors, or the reason (a string) why it has none yet."""
        parent, _, block = name.rpartition(".")
        if block in ("q_proj", "k_proj", "v_proj") and isinstance(
                _submodule(model, parent), nn.MultiheadAttention):
            return ("an nn.MultiheadAttention in-projection block (rows of in_proj_weight): "
                    "not read by KFACFisher yet")
        try:
            module = model.get_submodule(name)
        except AttributeError as err:
            base, group = split_group_name(name)
            parent = dict(model.named_modules()).get(base) if group is not None else None
            if layer_kind(parent) is not None and getattr(parent, "groups", 1) > 1:
                return (f"group {group} of the grouped convolution {base!r}: a block-diagonal "
                        "Fisher needs each parameter in one layer, and the groups share theirs")
            raise ValueError(
                f"K-FAC state layer {name!r} is not a module of the model (state of another model?)"
            ) from err
        kind = layer_kind(module)
        if kind is None:
            raise ValueError(
                f"K-FAC state layer {name!r} is a {type(module).__name__}; supported: "
                f"{', '.join(SUPPORTED_MODULES)}"
            )
        weight = module.weight
        bias = layer_bias(module)  # None when absent or frozen (no column in A)
        o, d = matrix_shape(kind, weight.shape, bias is not None)
        rows = g_rows(entry, name)
        if rows is not None:
            raise ValueError(
                f"layer {name!r}: the state's low-rank G holds rows {tuple(rows)} of U only (one "
                "rank's state under woodbury_reduction='row_sharded'); use a single-process or "
                "woodbury_reduction='gather' state"
            )
        factors = read_factors(entry, name, dtype=dtype)
        if factors is None and entry.get("positional", False):
            return (f"{BY_DESIGN} (an embedding looked up with ids shared by the whole batch, a "
                    "position table: kfac_optim leaves it to the base update)")
        if factors is None:
            return "no factor update yet (the layer never saw a captured forward/backward)"
        a, g, u = factors.a, factors.g, factors.u
        expected_a = (d,) if kind == "embedding" else (d, d)
        if tuple(a.shape) != expected_a:
            raise ValueError(
                f"layer {name!r}: factor A has shape {tuple(a.shape)}, the module needs "
                f"{expected_a} (a bias in one and not the other? state of another model?)"
            )
        if u is not None:
            if u.dim() != 2 or u.shape[0] != o:
                raise ValueError(
                    f"layer {name!r}: low-rank G columns have shape {tuple(u.shape)}, "
                    f"the module needs ({o}, k)"
                )
        else:
            if tuple(g.shape) != (o, o):
                raise ValueError(
                    f"layer {name!r}: factor G has shape {tuple(g.shape)}, the module needs "
                    f"({o}, {o})"
                )
        return _Layer(
            name=name,
            kind=kind,
            weight=canonical[id(weight)],
            bias=None if bias is None else canonical[id(bias)],
            weight_shape=weight.shape,
            out_features=o,
            in_features=d,
            a=a,
            g=g,
            u=u,
            updates=factors.updates,
        )

    # ------------------------------------------------------------ factors

    def factors(self, layer: str) -> dict[str, object]:
        """The bias-corrected factors of ``layer``.

        Returns:
            ``{"A": (d, d) or (d,) diagonal, "G": (o, o) or None, "U": (o, k) or
            None (G = U U^T), "shape": (o, d), "kind": one of LAYER_KINDS,
            "low_rank": bool, "updates": int}``.

        Raises:
            ValueError: unknown ``layer``.
        """
        lay = self._layers[self._check_layer(layer)]
        return {
            "A": lay.a,
            "G": lay.g,
            "U": lay.u,
            "shape": (lay.out_features, lay.in_features),
            "kind": lay.kind,
            "low_rank": lay.u is not None,
            "updates": lay.updates,
        }

    def to_matrix(self, layer: str, tensors: Mapping[str, Tensor]) -> Tensor:
        """``layer``'s parameters (dict by canonical name) as ``V: (o, d)``, bias the last column.

        ``vec(V)`` (column-major, ``V.T.reshape(-1)``) is the vector ``A (x) G`` acts on.

        Raises:
            ValueError: unknown ``layer``.
        """
        return self._layers[self._check_layer(layer)].to_matrix(tensors)

    def from_matrix(self, layer: str, V: Tensor) -> dict[str, Tensor]:
        """Inverse of :meth:`to_matrix`: ``V: (o, d)`` -> ``{parameter name: tensor}``.

        Raises:
            ValueError: unknown ``layer`` or ``V`` not ``(o, d)``.
        """
        lay = self._layers[self._check_layer(layer)]
        if not isinstance(V, Tensor) or V.shape != (lay.out_features, lay.in_features):
            raise ValueError(
                f"V must be a tensor of shape ({lay.out_features}, {lay.in_features}) for layer "
                f"{layer!r}"
            )
        return lay.from_matrix(V)

    # ------------------------------------------------------------ spectra

    def factor_eigenvalues(self, layer: str) -> tuple[Tensor, Tensor]:
        """Eigenvalues of the factors ``A`` and ``G`` of ``layer``, descending.

        A low-rank ``G = U U^T`` (``U: (o, k)``) gets its ``o - k`` zero eigenvalues
        appended. Eigenvalues below 0 (round-off of a PSD factor) are set to 0.

        Returns:
            ``(s_A (d,), s_G (o,))`` float64 CPU tensors.

        Raises:
            ValueError: unknown ``layer``.
        """
        s_a, s_g, zeros = self._layers[self._check_layer(layer)].factor_spectra()
        return s_a, torch.cat([s_g, s_g.new_zeros(zeros)])

    def eigenvalues(self, layer: str, k: int | None = None) -> Tensor:
        """Eigenvalues ``s_A,i s_G,j`` of ``A (x) G``, descending.

        With ``k``, only the top ``k`` are formed, from the top ``k`` of each
        factor (a product of non-negative numbers is among the ``k`` largest only
        if both of its factors are among theirs).

        Args:
            layer: a name in :attr:`layers`.
            k: number wanted (``None``: all ``o d``).

        Returns:
            ``(o d,)`` or ``(min(k, o d),)`` float64 CPU tensor.

        Raises:
            ValueError: unknown ``layer``; ``k < 1``.
        """
        lay = self._layers[self._check_layer(layer)]
        s_a, s_g, zeros = lay.factor_spectra()
        size = lay.out_features * lay.in_features
        if k is None:
            values = torch.outer(s_a, s_g).reshape(-1)
            values = torch.cat([values, values.new_zeros(zeros * s_a.numel())])
            return torch.sort(values, descending=True).values
        k = min(check_int("k", k), size)
        s_g = torch.cat([s_g, s_g.new_zeros(min(zeros, k))])
        values = torch.outer(s_a[:k], s_g[:k]).reshape(-1)
        return torch.topk(values, min(k, values.numel())).values

    def trace(self, layer: str | None = None) -> float:
        """``sum_l tr(A_l) tr(G_l)`` (``tr(G) = ||U||_F^2`` for a low-rank G).

        Args:
            layer: one layer, or the whole model (``None``).

        Returns:
            A float, loss per squared parameter unit.

        Raises:
            ValueError: unknown ``layer``.
        """
        return sum(
            self._layers[name].trace_a() * self._layers[name].trace_g()
            for name in self._selected(layer)
        )

    def logdet(self, damping: float, layer: str | None = None) -> float:
        """``sum_l sum_ij log(s_A,i s_G,j + damping)``, ``log det(F + damping I)``.

        Costs ``O(d r)`` per layer after the factor eigendecompositions
        (``r``: non-zero G eigenvalues); G's zero eigenvalues add
        ``d (o - r) log(damping)`` in closed form.

        Args:
            damping: ``>= 0``; ``0`` with a singular block gives ``-inf``.
            layer: one layer, or the whole model (``None``).

        Returns:
            A float (nats).

        Raises:
            TypeError / ValueError: bad ``damping``; unknown ``layer``.
        """
        damping = check_positive_float("damping", damping, allow_zero=True)
        total = 0.0
        for name in self._selected(layer):
            s_a, s_g, zeros = self._layers[name].factor_spectra()
            step = max(1, _CHUNK // max(1, s_a.numel()))
            for start in range(0, s_g.numel(), step):
                total += log_sum(torch.outer(s_g[start : start + step], s_a), damping)
            if zeros:
                total += log_sum(s_a.new_zeros(0), damping, zeros=zeros * s_a.numel())
        return total

    def _layer_mvp(self, layer: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        lay = self._layers[layer]
        return lay.from_matrix(lay.mvp(lay.to_matrix(tensors)))

