"""Small, offline datasets for the demo and the benchmarks.

- Byte-level language modelling on the English text that ships with CPython
  (``pydoc_data.topics``: the help topics of the interactive ``help()``, about
  465k characters), with a deterministic held-out tail.
- scikit-learn's bundled 8x8 ``digits`` (1797 images, 10 classes), with a
  stratified held-out split and inputs standardized on the training split.

Nothing here downloads anything.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "EOS_ID",
    "VOCAB_SIZE",
    "DigitsData",
    "digits_batches",
    "LMData",
    "lm_batches",
    "lm_eval_chunks",
    "load_digits_data",
    "load_lm_data",
    "load_text_tokens",
]

EOS_ID = 256
VOCAB_SIZE = 257  # 256 byte values + an end-of-document id


def load_text_tokens() -> Tensor:
    """Byte ids of every ``pydoc_data.topics`` entry, in sorted key order.

    Each entry is UTF-8 encoded and followed by ``EOS_ID``, so documents are
    separated by a token the model can learn.

    Returns:
        ``(n,)`` int64 tensor with values in ``[0, VOCAB_SIZE)`` (n is about 466k).
    """
    from pydoc_data.topics import topics

    ids: list[int] = []
    for key in sorted(topics):
        ids.extend(topics[key].encode("utf-8"))
        ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.int64)


@dataclass(frozen=True)
class LMData:
    """A token stream split into a training head and a held-out tail.

    Attributes:
        train: ``(n_train,)`` int64 token ids.
        val: ``(n_val,)`` int64 token ids; the last ``val_fraction`` of the stream.
    """

    train: Tensor
    val: Tensor


def load_lm_data(val_fraction: float = 0.1) -> LMData:
    """Deterministic split of ``load_text_tokens()``: the last ``val_fraction`` is held out.

    A contiguous tail (not random chunks) keeps the held-out text unseen: no training
    window can overlap it.

    Raises:
        ValueError: ``val_fraction`` not in (0, 1).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    tokens = load_text_tokens()
    cut = int(round(len(tokens) * (1.0 - val_fraction)))
    return LMData(train=tokens[:cut], val=tokens[cut:])


def lm_batches(tokens: Tensor, batch_size: int, seq_len: int, seed: int) -> Iterator[Tensor]:
    """Endless batches of random contiguous windows, reproducible from ``seed``.

    Args:
        tokens: ``(n,)`` token ids, ``n > seq_len``.
        batch_size, seq_len: batch shape.
        seed: seeds a private ``torch.Generator`` (the global RNG is untouched).

    Yields:
        ``(batch_size, seq_len)`` int64 windows ``tokens[o : o + seq_len]``.

    Raises:
        ValueError: ``tokens`` shorter than ``seq_len + 1``.
    """
    if len(tokens) <= seq_len:
        raise ValueError(f"need more than seq_len={seq_len} tokens, got {len(tokens)}")
    gen = torch.Generator().manual_seed(seed)
    arange = torch.arange(seq_len)
    while True:
        starts = torch.randint(0, len(tokens) - seq_len + 1, (batch_size,), generator=gen)
        yield tokens[starts[:, None] + arange]


def lm_eval_chunks(tokens: Tensor, seq_len: int, max_chunks: int | None = None) -> Tensor:
    """Non-overlapping ``seq_len`` windows covering ``tokens`` from the start.

    Args:
        tokens: ``(n,)`` token ids.
        seq_len: window length.
        max_chunks: keep at most this many windows, evenly spaced over the text
            (None: all of them).

    Returns:
        ``(k, seq_len)`` int64, ``k = min(n // seq_len, max_chunks)``.
    """
    k = len(tokens) // seq_len
    chunks = tokens[: k * seq_len].reshape(k, seq_len)
    if max_chunks is not None and k > max_chunks:
        chunks = chunks[torch.linspace(0, k - 1, max_chunks).round().long()]
    return chunks


@dataclass(frozen=True)
class DigitsData:
    """Standardized digits split. ``x_*``: ``(n, 64)`` float32; ``y_*``: ``(n,)`` int64."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor


def load_digits_data(val_fraction: float = 0.2, seed: int = 0) -> DigitsData:
    """scikit-learn's digits with a stratified held-out split.

    Pixels are standardized with the training split's mean and standard deviation
    (constant pixels get scale 1), so nothing of the held-out split leaks in.

    Args:
        val_fraction: held-out fraction in (0, 1).
        seed: seed of the stratified shuffle.

    Raises:
        ValueError: ``val_fraction`` not in (0, 1).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    x, y = load_digits(return_X_y=True)
    x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=val_fraction, stratify=y,
                                              random_state=seed)
    scaler = StandardScaler().fit(x_tr)

    def as_x(a):
        return torch.tensor(scaler.transform(a), dtype=torch.float32)

    def as_y(a):
        return torch.tensor(a, dtype=torch.int64)

    return DigitsData(as_x(x_tr), as_y(y_tr), as_x(x_va), as_y(y_va))


def digits_batches(
    x: Tensor, y: Tensor, batch_size: int, seed: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless shuffled mini-batches (reshuffled every epoch), reproducible from ``seed``.

    Args:
        x: ``(n, ...)`` inputs; y: ``(n,)`` labels.
        batch_size: rows per batch (the last, smaller batch of an epoch is dropped).
        seed: seeds a private ``torch.Generator``.

    Yields:
        ``(x_batch, y_batch)``.

    Raises:
        ValueError: ``batch_size`` larger than ``n``.
    """
    n = len(x)
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            yield x[idx], y[idx]
