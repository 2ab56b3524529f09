"""Group-level (output channel / attention head) reduction of a diagonal Fisher.

A group is a set of entries of one parameter tensor: an output channel of a
``Linear`` / ``Conv2d`` / Hugging Face ``Conv1D`` weight (with the matching bias
entry in its own group of the bias), a token row of an ``Embedding``, or the
slice of an attention projection that belongs to one head. The group value is
the *sum* of the diagonal Fisher over the group's entries,

    F_g = sum_{i in g} F_ii = (1/R) sum_r sum_{i in g} (d l_r / d theta_i)^2,

i.e. squares are taken per row (sample or token) and per entry before any
reduction; the square of a reduced gradient would miss every cancellation
between entries or rows. ``F_g`` is in loss units per squared parameter unit,
like the diagonal it comes from.

Keys are stable strings ``"<parameter name>|<kind>"`` with ``kind`` one of
:data:`GROUP_KINDS`, e.g. ``"transformer.h.3.attn.c_attn.weight|head"``; the
value is a tensor shaped like the groups:

- ``"head"``: ``(H,)`` for a query or output projection, ``(H_kv,)`` for a key or
  value projection, and ``(3, H)`` (rows q, k, v) for GPT-2's fused ``c_attn``
  (``(2, H)``, rows k, v, for its cross-attention ``c_attn``);
- ``"channel"``: ``(o,)`` output channels of a Linear / Conv2d / Conv1D weight or bias;
- ``"row"``: ``(V,)`` rows (tokens) of an Embedding;
- ``"param"``: ``(1,)`` the whole tensor (norm weights and other parameters).

Attention layers are recognised by their projection names: GPT-2 (``c_attn``
fused q/k/v and ``c_proj``, Conv1D), BERT (``self.query`` / ``self.key`` /
``self.value`` and ``output.dense``), LLaMA / Mistral / Qwen (``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``; ``out_proj`` for OPT / BART), T5 (``q``, ``k``,
``v``, ``o``) and DistilBERT (``q_lin`` ... ``out_lin``). The head count comes from
the attention module (``num_heads``, ``n_heads``, ``num_attention_heads``) or the
model config; the head size from the query projection's width; the key/value
head count ``H_kv`` from the key projection's width. With grouped-query
attention (``H_kv < H``) query head ``h`` reads key/value head
``floor(h / (H / H_kv))`` (Ainslie et al. 2023, "GQA", Sec. 2.2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Integral
from typing import NamedTuple

import torch
from torch import Tensor, nn

from kfac_optim.layers import layer_kind, matrix_shape

from ._validation import check_choice, check_int
from .representation import FisherRepresentation

__all__ = [
    "AttentionSpec",
    "BLOCKS",
    "GROUP_KINDS",
    "GroupFisher",
    "GroupScore",
    "Grouping",
    "attention_layers",
    "diagonal_of",
    "gqa_kv_head",
    "head_scores",
    "param_groupings",
]

GROUP_KINDS = ("head", "channel", "row", "param")
BLOCKS = ("Q", "K", "V", "O")
NORMALIZATIONS = ("sum", "mean")


def gqa_kv_head(head: int, num_heads: int, num_kv_heads: int) -> int:
    """Key/value head read by query ``head``: ``floor(head / (H / H_kv))``.

    Args:
        head: query head index in ``[0, H)``.
        num_heads: ``H``, query heads.
        num_kv_heads: ``H_kv``, key/value heads; must divide ``H``.

    Raises:
        TypeError / ValueError: non-integers, ``H_kv`` not dividing ``H``, or
            ``head`` out of range.
    """
    num_heads = check_int("num_heads", num_heads)
    num_kv_heads = check_int("num_kv_heads", num_kv_heads)
    head = check_int("head", head, minimum=0)
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_kv_heads must divide num_heads; got num_heads={num_heads}, "
            f"num_kv_heads={num_kv_heads}"
        )
    if head >= num_heads:
        raise ValueError(f"head must lie in [0, {num_heads}); got {head}")
    return head // (num_heads // num_kv_heads)


@dataclass(frozen=True)
class Grouping:
    """How a parameter's entries form groups: reshape to ``view``, sum the dims not in ``keep``.

    Attributes:
        kind: one of :data:`GROUP_KINDS`.
        view: shape the parameter is reshaped to (same number of entries).
        keep: dims of ``view`` that index the groups (in order).
    """

    kind: str
    view: tuple[int, ...]
    keep: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the group values (``view`` restricted to ``keep``)."""
        return tuple(self.view[d] for d in self.keep)

    @property
    def num_groups(self) -> int:
        return math.prod(self.shape)

    @property
    def size(self) -> int:
        """Entries per group (every group of a parameter has the same size)."""
        return math.prod(self.view) // self.num_groups

    @property
    def _drop(self) -> tuple[int, ...]:
        return tuple(d for d in range(len(self.view)) if d not in self.keep)

    def reduce(self, x: Tensor) -> Tensor:
        """Sum ``x`` (shaped like the parameter) over each group: ``(*shape,)``."""
        y = x.reshape(self.view)
        return y.sum(dim=self._drop) if self._drop else y

    def reduce_batched(self, x: Tensor) -> Tensor:
        """:meth:`reduce` of each ``x[i]`` for ``x: (N, *parameter shape)``: ``(N, *shape)``."""
        y = x.reshape(x.shape[0], *self.view)
        drop = tuple(d + 1 for d in self._drop)
        return y.sum(dim=drop) if drop else y

    def rows(self, x: Tensor) -> Tensor:
        """The entries of ``x`` (shaped like the parameter) by group: ``(num_groups, size)``."""
        order = (*self.keep, *self._drop)
        return x.reshape(self.view).permute(order).reshape(self.num_groups, self.size)

    def expand(self, values: Tensor, shape: torch.Size) -> Tensor:
        """Broadcast group ``values`` (``(*shape,)``) to every entry of the parameter."""
        sizes = [self.view[d] if d in self.keep else 1 for d in range(len(self.view))]
        return values.reshape(sizes).expand(self.view).reshape(shape)

    def group_ids(self, shape: torch.Size, device: torch.device | None = None) -> Tensor:
        """Flat group index of every entry: an int64 tensor shaped like the parameter."""
        ids = torch.arange(self.num_groups, device=device)
        return self.expand(ids, shape)


@dataclass(frozen=True)
class AttentionSpec:
    """One attention layer: head counts and where each head lives in the projections.

    Attributes:
        name: the attention module's name (e.g. ``"transformer.h.0.attn"``;
            ``"bert.encoder.layer.0.attention"`` for BERT).
        num_heads: ``H`` query heads.
        num_kv_heads: ``H_kv`` key/value heads (``H`` without grouped-query attention).
        head_dim: entries per head along the projection's head axis.
        blocks: ``{"Q" | "K" | "V" | "O": ((parameter name, offset), ...)}``: the
            parameters of each block and the offset of head 0 in the flattened
            group values of that parameter's ``"|head"`` key (non-zero only for
            fused projections: ``c_attn`` k heads start at ``H``, v heads at ``2 H``).
    """

    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    blocks: dict[str, tuple[tuple[str, int], ...]] = field(default_factory=dict)

    def kv_head(self, head: int) -> int:
        """Key/value head of query ``head`` (:func:`gqa_kv_head`)."""
        return gqa_kv_head(head, self.num_heads, self.num_kv_heads)

    def block_head(self, block: str, head: int) -> int:
        """Head index inside ``block`` read by query ``head`` (its kv head for K and V)."""
        check_choice("block", block, BLOCKS)
        return self.kv_head(head) if block in ("K", "V") else check_int("head", head, minimum=0)


class GroupScore(NamedTuple):
    """One group in a ranking: its key, its index in the key's values, and its value."""

    key: str
    index: tuple[int, ...]
    value: float


# --------------------------------------------------------------------------- structure


def _num_heads(module: nn.Module, model: nn.Module, name: str, override: int | None) -> int:
    if override is not None:
        return override
    holders = [module, getattr(module, "self", None)]
    for holder in holders:
        for attr in ("num_heads", "n_heads", "num_attention_heads", "n_head"):
            value = getattr(holder, attr, None)
            if isinstance(value, Integral) and not isinstance(value, bool) and value > 0:
                return int(value)
    for config in (getattr(module, "config", None), getattr(model, "config", None)):
        for attr in ("num_attention_heads", "num_heads", "n_head"):
            value = getattr(config, attr, None)
            if isinstance(value, Integral) and not isinstance(value, bool) and value > 0:
                return int(value)
    raise ValueError(
        f"cannot find the number of heads of attention module {name!r} (no num_heads / "
        "n_heads / num_attention_heads attribute or config entry): pass num_heads"
    )


def _children(module: nn.Module, names: tuple[str, ...]) -> list[nn.Module] | None:
    """The submodules at dotted ``names`` if all exist and are K-FAC layer types."""
    found = []
    for dotted in names:
        try:
            child = module.get_submodule(dotted)
        except AttributeError:
            return None
        if layer_kind(child) not in ("linear", "conv1d"):
            return None
        found.append(child)
    return found


_SEPARATE = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),  # LLaMA, Mistral, Qwen, Gemma
    ("q_proj", "k_proj", "v_proj", "out_proj"),  # OPT, BART, Whisper
    ("self.query", "self.key", "self.value", "output.dense"),  # BERT, RoBERTa
    ("q", "k", "v", "o"),  # T5
    ("q_lin", "k_lin", "v_lin", "out_lin"),  # DistilBERT
)


def _out_width(module: nn.Module) -> int:
    """Output features of a Linear (weight ``(o, d)``) or Conv1D (weight ``(d, o)``)."""
    return matrix_shape(layer_kind(module), module.weight.shape)[0]


def _in_width(module: nn.Module) -> int:
    return matrix_shape(layer_kind(module), module.weight.shape)[1]


def _head_grouping(module: nn.Module, heads: int, head_dim: int, *, output: bool) -> Grouping:
    """Head groups of a projection weight: along its outputs, or its inputs (``output=True``)."""
    kind = layer_kind(module)
    o, d = _out_width(module), _in_width(module)
    if not output:  # q / k / v: heads along the output features
        if kind == "linear":
            return Grouping("head", (heads, head_dim, d), (0,))
        return Grouping("head", (d, heads, head_dim), (1,))
    if kind == "linear":  # o-projection: heads along the input features
        return Grouping("head", (o, heads, head_dim), (1,))
    return Grouping("head", (heads, head_dim, o), (0,))


def _match_attention(
    name: str, module: nn.Module, model: nn.Module, canonical: dict[int, str], num_heads
) -> tuple[AttentionSpec, dict[str, Grouping]] | None:
    """The spec and head groupings of ``module`` if it is a recognised attention layer."""
    fused = _children(module, ("c_attn", "c_proj"))
    if fused is not None and all(layer_kind(m) == "conv1d" for m in fused):
        c_attn, c_proj = fused
        query = _children(module, ("q_attn",))  # GPT-2 cross-attention: q apart, k/v fused
        heads = _num_heads(module, model, name, num_heads)
        parts = 2 if query else 3
        width = _out_width(query[0]) if query else _out_width(c_attn) // parts
        if _out_width(c_attn) != parts * width or width % heads:
            raise ValueError(
                f"attention module {name!r}: c_attn width {_out_width(c_attn)} is not "
                f"{parts} x heads ({heads}) x head_dim"
            )
        head_dim = width // heads
        d = _in_width(c_attn)
        groupings = {
            canonical[id(c_attn.weight)]: Grouping("head", (d, parts, heads, head_dim), (1, 2)),
            canonical[id(c_proj.weight)]: _head_grouping(c_proj, heads, head_dim, output=True),
        }
        fused_params = [canonical[id(c_attn.weight)]]
        if c_attn.bias is not None:
            groupings[canonical[id(c_attn.bias)]] = Grouping(
                "head", (parts, heads, head_dim), (0, 1)
            )
            fused_params.append(canonical[id(c_attn.bias)])
        blocks = {"O": ((canonical[id(c_proj.weight)], 0),)}
        names = ("K", "V") if query else ("Q", "K", "V")
        for j, block in enumerate(names):
            blocks[block] = tuple((p, j * heads) for p in fused_params)
        if query:
            q = query[0]
            groupings[canonical[id(q.weight)]] = _head_grouping(q, heads, head_dim, output=False)
            qparams = [canonical[id(q.weight)]]
            if q.bias is not None:
                groupings[canonical[id(q.bias)]] = Grouping("head", (heads, head_dim), (0,))
                qparams.append(canonical[id(q.bias)])
            blocks["Q"] = tuple((p, 0) for p in qparams)
        spec = AttentionSpec(name, heads, heads, head_dim, {b: blocks[b] for b in BLOCKS})
        return spec, groupings
    for pattern in _SEPARATE:
        found = _children(module, pattern)
        if found is None:
            continue
        q, k, v, o = found
        holder = (
            module.get_submodule(pattern[0].rpartition(".")[0]) if "." in pattern[0] else module
        )
        heads = _num_heads(holder, model, name, num_heads)
        width = _out_width(q)
        if width % heads:
            raise ValueError(
                f"attention module {name!r}: query width {width} is not a multiple of the "
                f"number of heads {heads} (pass num_heads)"
            )
        head_dim = width // heads
        kv_width = _out_width(k)
        if kv_width % head_dim or heads % (kv_width // head_dim) or _out_width(v) != kv_width:
            raise ValueError(
                f"attention module {name!r}: key/value widths ({kv_width}, {_out_width(v)}) are "
                f"not a divisor count of heads x head_dim ({head_dim})"
            )
        kv_heads = kv_width // head_dim
        groupings, blocks = {}, {}
        for block, proj, count in (("Q", q, heads), ("K", k, kv_heads), ("V", v, kv_heads)):
            params = [canonical[id(proj.weight)]]
            groupings[params[0]] = _head_grouping(proj, count, head_dim, output=False)
            if getattr(proj, "bias", None) is not None:
                params.append(canonical[id(proj.bias)])
                groupings[params[1]] = Grouping("head", (count, head_dim), (0,))
            blocks[block] = tuple((p, 0) for p in params)
        o_weight = canonical[id(o.weight)]
        groupings[o_weight] = _head_grouping(o, heads, head_dim, output=True)
        blocks["O"] = ((o_weight, 0),)
        return AttentionSpec(name, heads, kv_heads, head_dim, blocks), groupings
    return None


def _default_grouping(module: nn.Module, local: str, p: Tensor) -> Grouping:
    """Output channels of Linear / Conv2d / Conv1D weights and biases, Embedding rows, or whole."""
    kind = layer_kind(module)
    if kind == "embedding" and local == "weight":
        return Grouping("row", tuple(p.shape[:1]) + (p[0].numel(),), (0,))
    if kind in ("linear", "conv2d") and local == "weight":
        return Grouping("channel", (p.shape[0], p[0].numel()), (0,))
    if kind == "conv1d" and local == "weight":
        return Grouping("channel", tuple(p.shape), (1,))
    if kind in ("linear", "conv2d", "conv1d") and local == "bias" and p.dim() == 1:
        return Grouping("channel", tuple(p.shape), (0,))
    return Grouping("param", (1, p.numel()), (0,))


def param_groupings(
    model: nn.Module, *, attention: bool = True, num_heads: int | None = None
) -> tuple[dict[str, Grouping], list[AttentionSpec]]:
    """The grouping of every parameter of ``model`` and its recognised attention layers.

    Args:
        model: the model (canonical ``named_parameters()`` names; a tied tensor
            takes the grouping of the first layer module that owns it).
        attention: group attention projections by head (``False``: by output
            channel like any Linear / Conv1D).
        num_heads: ``H`` for every attention layer (default: read from each
            attention module or the model config).

    Returns:
        ``({parameter name: Grouping}, [AttentionSpec])`` in model order.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: an attention layer whose widths do not split into heads, or
            whose head count cannot be found (pass ``num_heads``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(attention, bool):
        raise TypeError(f"attention must be True or False; got {attention!r}")
    if num_heads is not None:
        num_heads = check_int("num_heads", num_heads)
    canonical = {id(p): name for name, p in model.named_parameters()}
    groupings: dict[str, Grouping] = {}
    specs: list[AttentionSpec] = []
    if attention:
        for name, module in model.named_modules():
            match = _match_attention(name, module, model, canonical, num_heads)
            if match is not None:
                specs.append(match[0])
                for param, grouping in match[1].items():
                    groupings.setdefault(param, grouping)
    for _, module in model.named_modules():
        for local, p in module.named_parameters(recurse=False):
            name = canonical[id(p)]
            # A shared tensor (tied embedding / output bias) takes the first layer grouping.
            if name not in groupings or groupings[name].kind == "param":
                groupings[name] = _default_grouping(module, local, p)
    order = {name: i for i, name in enumerate(canonical.values())}
    return dict(sorted(groupings.items(), key=lambda item: order[item[0]])), specs


def attention_layers(model: nn.Module, *, num_heads: int | None = None) -> list[AttentionSpec]:
    """The recognised attention layers of ``model`` (see the module docstring).

    Raises:
        TypeError / ValueError: as for :func:`param_groupings`.
    """
    return param_groupings(model, num_heads=num_heads)[1]


# --------------------------------------------------------------------------- representation


def diagonal_of(fisher: object, argname: str = "fisher") -> dict[str, Tensor]:
    """``{parameter name: F_ii}`` (detached) of a DiagonalFisher / GroupFisher.

    Raises:
        TypeError: ``fisher`` is not a representation with ``.diagonal()``.
    """
    diagonal = getattr(fisher, "diagonal", None)
    if isinstance(fisher, FisherRepresentation) and callable(diagonal):
        return {name: value.detach() for name, value in diagonal().items()}
    raise TypeError(
        f"{argname} must be a DiagonalFisher or GroupFisher (a representation with .diagonal()); "
        f"got {type(fisher).__name__}"
    )


def head_scores(spec: AttentionSpec, flat: Mapping[str, Tensor]) -> Tensor:
    """Per query head: ``I_h = Q[h] + O[h] + (K[kv(h)] + V[kv(h)]) / (H / H_kv)``, ``(H,)`` float64.

    Args:
        spec: the attention layer.
        flat: ``{parameter name: flattened "|head" group values}`` for the
            parameters of ``spec.blocks`` (offsets as in :class:`AttentionSpec`).

    A shared key/value head is split evenly among the ``H / H_kv`` query heads
    that read it (``kv(h) = floor(h / (H / H_kv))``), so ``sum_h I_h`` is the total.
    """
    share = spec.num_heads // spec.num_kv_heads
    heads = torch.arange(spec.num_heads)
    total = torch.zeros(spec.num_heads, dtype=torch.float64)
    for block, params in spec.blocks.items():
        shared = block in ("K", "V")
        index = heads // share if shared else heads
        for name, offset in params:
            total += flat[name].to("cpu", torch.float64)[offset + index] / (share if shared else 1)
    return total


class GroupFisher(FisherRepresentation):
    """Channel / head sums of a diagonal Fisher, also a (group-constant) diagonal representation.

    Values: ``{"<name>|<kind>": group sums}`` (see the module docstring). As a
    :class:`~fisher_metrics.representation.FisherRepresentation` every entry of
    group ``g`` gets the group mean ``F_g / |g|``: the diagonal Fisher averaged
    within each group, which keeps the trace and is exact when the diagonal is
    constant on each group. Products, quadratic forms and damage use that.

    Build it with :meth:`from_diagonal` (or ``DiagonalFisher.groups(model)``).

    Attributes:
        values: ``{key: group sums}``, float64 on CPU.
        groupings: ``{parameter name: Grouping}``.
        keys: ``{parameter name: key}``.
        attention: recognised attention layers (:class:`AttentionSpec`).
        layers, layer_params, param_names, param_shapes, aliases, dtype, device:
            see :class:`~fisher_metrics.representation.FisherRepresentation`
            (those of the source diagonal; dtype float64, device CPU).
        task, fisher_type: copied from the source when it has them.
    """

    def __init__(
        self,
        values: Mapping[str, Tensor],
        groupings: Mapping[str, Grouping],
        source: FisherRepresentation,
        attention: list[AttentionSpec],
    ) -> None:
        self.groupings = dict(groupings)
        self.keys = {name: f"{name}|{g.kind}" for name, g in self.groupings.items()}
        self.values = {self.keys[name]: values[name] for name in self.groupings}
        self.attention = list(attention)
        self.layers = list(source.layers)
        self.layer_params = {layer: list(names) for layer, names in source.layer_params.items()}
        self.param_names = list(source.param_names)
        self.param_shapes = dict(source.param_shapes)
        self.aliases = dict(source.aliases)
        self.dtype = torch.float64
        self.device = torch.device("cpu")
        self.task = getattr(source, "task", None)
        self.fisher_type = getattr(source, "fisher_type", None)

    @classmethod
    def from_diagonal(
        cls,
        fisher: FisherRepresentation,
        model: nn.Module,
        *,
        attention: bool = True,
        num_heads: int | None = None,
    ) -> GroupFisher:
        """Reduce a diagonal Fisher to channel / head groups (square-then-reduce: sums of ``F_ii``).

        Args:
            fisher: a :class:`~fisher_metrics.DiagonalFisher` (anything with
                ``.diagonal()``, parameter-shaped entries ``F_ii``).
            model: the model the Fisher belongs to (module types and attention layout).
            attention, num_heads: see :func:`param_groupings`.

        Returns:
            A :class:`GroupFisher` over the same parameters.

        Raises:
            TypeError: ``fisher`` has no diagonal; ``model`` is not a module.
            ValueError: a parameter of ``fisher`` is not one of ``model``'s (or
                has another shape); see :func:`param_groupings`.
        """
        diagonal = diagonal_of(fisher)
        groupings, specs = param_groupings(model, attention=attention, num_heads=num_heads)
        lookup = dict(model.named_parameters())
        chosen, values = {}, {}
        for name, d in diagonal.items():
            if name not in groupings or lookup[name].shape != d.shape:
                raise ValueError(
                    f"fisher parameter {name!r} (shape {tuple(d.shape)}) is not a parameter of "
                    "model with that shape (Fisher of another model?)"
                )
            chosen[name] = groupings[name]
            values[name] = groupings[name].reduce(d.detach().to("cpu", torch.float64))
        covered = set(chosen)
        specs = [s for s in specs if all(p in covered for b in s.blocks.values() for p, _ in b)]
        return cls(values, chosen, fisher, specs)

    # ------------------------------------------------------------ representation

    def diagonal(self) -> dict[str, Tensor]:
        """Per-entry values ``F_g / |g|`` (group means), shaped like the parameters, float64."""
        return {name: self._entries(name) for name in self.param_names}

    def _entries(self, name: str) -> Tensor:
        grouping = self.groupings[name]
        means = self.values[self.keys[name]] / grouping.size
        return grouping.expand(means, self.param_shapes[name])

    def eigenvalues(self, layer: str, k: int | None = None) -> Tensor:
        """The group-mean entries of ``layer``'s parameters, descending (float64 CPU)."""
        values = torch.cat(
            [self._entries(n).reshape(-1) for n in self.layer_params[self._check_layer(layer)]]
        )
        values = torch.sort(values, descending=True).values
        return values if k is None else values[: check_int("k", k)]

    def _layer_mvp(self, layer: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: self._entries(name) * tensors[name] for name in self.layer_params[layer]}

    def trace(self, layer: str | None = None) -> float:
        """Sum of the group values (equals the trace of the source diagonal)."""
        return float(
            sum(
                float(self.values[self.keys[name]].sum())
                for layer_name in self._selected(layer)
                for name in self.layer_params[layer_name]
            )
        )

    # ------------------------------------------------------------ rankings

    def top_groups(
        self,
        k: int,
        *,
        kind: str | None = None,
        key: str | None = None,
        normalize: str = "sum",
    ) -> list[GroupScore]:
        """The ``k`` most important groups (channels, heads, ...) across keys.

        Args:
            k: number wanted (``>= 1``; fewer if fewer groups match).
            kind: restrict to one of :data:`GROUP_KINDS` (``None``: every kind).
            key: restrict to one key (e.g. ``"fc1.weight|channel"``).
            normalize: ``"sum"`` ranks by ``F_g`` (the group's share of the
                trace); ``"mean"`` by ``F_g / |g|`` (comparable across group sizes).

        Returns:
            :class:`GroupScore` list, descending by value (ties: model order).

        Raises:
            TypeError / ValueError: bad ``k``, ``kind``, ``normalize``; unknown ``key``.
        """
        k = check_int("k", k)
        check_choice("normalize", normalize, NORMALIZATIONS)
        if kind is not None:
            check_choice("kind", kind, GROUP_KINDS)
        if key is not None and key not in self.values:
            raise ValueError(
                f"key must be one of the group keys, e.g. {list(self.values)[:4]}; got {key!r}"
            )
        scores: list[GroupScore] = []
        for name, grouping in self.groupings.items():
            this = self.keys[name]
            if (kind is not None and grouping.kind != kind) or (key is not None and this != key):
                continue
            values = self.values[this] / (grouping.size if normalize == "mean" else 1)
            flat = values.reshape(-1)
            top = torch.topk(flat, min(k, flat.numel()))
            indices = torch.stack(torch.unravel_index(top.indices, grouping.shape), dim=1)
            for value, index in zip(top.values.tolist(), indices.tolist(), strict=True):
                scores.append(GroupScore(this, tuple(index), value))
        order = sorted(range(len(scores)), key=lambda i: -scores[i].value)
        return [scores[i] for i in order[:k]]

    def head_importance(self) -> dict[str, Tensor]:
        """Per query head of every attention layer: ``(H,)`` float64.

        ``I_h = F_Q[h] + F_O[h] + (F_K[kv(h)] + F_V[kv(h)]) / (H / H_kv)``, with
        ``kv(h) = floor(h / (H / H_kv))``: a shared key/value head's Fisher is
        split evenly among the query heads that read it, so ``sum_h I_h`` is the
        Fisher trace of the head-grouped projection parameters.
        """
        flat = {name: self.values[key].reshape(-1) for name, key in self.keys.items()}
        return {spec.name: head_scores(spec, flat) for spec in self.attention}

    def top_heads(self, k: int) -> list[GroupScore]:
        """The ``k`` most important query heads over all attention layers (:meth:`head_importance`).

        Returns:
            :class:`GroupScore` with ``key = "<attention layer>|head"`` and ``index = (h,)``.

        Raises:
            TypeError / ValueError: bad ``k``; no attention layer was recognised.
        """
        k = check_int("k", k)
        importance = self.head_importance()
        if not importance:
            raise ValueError(
                "no attention layer was recognised in the model (see fisher_metrics.groups)"
            )
        scores = [
            GroupScore(f"{layer}|head", (h,), float(v))
            for layer, values in importance.items()
            for h, v in enumerate(values.tolist())
        ]
        return sorted(scores, key=lambda s: -s.value)[:k]
