"""Small, offline datasets for the demo and the benchmarks.

- Byte-level language modelling on the English text that ships with CPython
  (``pydoc_data.topics``: the help topics of the interactive ``help()``, about
  465k characters), with a deterministic held-out tail; or the same text in a
  byte-level BPE vocabulary (8k-16k ids) trained offline on the training part
  with the ``tokenizers`` package.
- Byte-level language modelling on another domain, for fine-tuning: the running
  interpreter's own standard-library sources (the top-level ``*.py`` files of
  ``sysconfig.get_paths()["stdlib"]``, sorted by name), held out by file.
- scikit-learn's bundled 8x8 ``digits`` (1797 images, 10 classes), with a
  stratified held-out split and inputs standardized on the training split.

Nothing here downloads anything. The BPE vocabulary (tokenizers) and digits
(scikit-learn) need the ``demo`` extra.
"""

from __future__ import annotations

import math
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._extras import require

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
    "BPE_EOS",
    "CodeData",
    "load_code_data",
    "stdlib_source_files",
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


BPE_EOS = "<|endoftext|>"
VOCABS = ("byte", "bpe")


@dataclass(frozen=True)
class LMData:
    """A token stream split into a training head and a held-out tail.

    Attributes:
        train: ``(n_train,)`` int64 token ids.
        val: ``(n_val,)`` int64 token ids; the last ``val_fraction`` of the stream.
        vocab_size: number of ids (257 for bytes).
        eos_id: the end-of-document id.
        token_bytes: ``(vocab_size,)`` int64, UTF-8 bytes each id stands for (the
            end-of-document id counts 1, like the byte vocabulary's): turns a loss in
            nats per token into bits per byte, comparable across vocabularies.
        tokenizer: the ``tokenizers.Tokenizer`` of a BPE vocabulary (None for bytes).
    """

    train: Tensor
    val: Tensor
    vocab_size: int = VOCAB_SIZE
    eos_id: int = EOS_ID
    token_bytes: Tensor | None = None
    tokenizer: Any = None

    def bits_per_byte(self, nats_per_token: float, tokens: Tensor) -> float:
        """``nats_per_token`` (mean over the predicted ids of ``tokens``' rows, i.e. all
        but the first of each row) as bits per UTF-8 byte of the predicted text."""
        predicted = tokens[..., 1:]
        nbytes = (predicted.numel() if self.token_bytes is None
                  else int(self.token_bytes[predicted].sum()))
        return nats_per_token * predicted.numel() / (nbytes * math.log(2))


def load_lm_data(val_fraction: float = 0.1, vocab: str = "byte",
                 bpe_vocab_size: int = 8192) -> LMData:
    """The demo corpus with its last ``val_fraction`` held out, in bytes or BPE ids.

    A contiguous tail (not random chunks) keeps the held-out text unseen: no training
    window can overlap it. ``vocab="byte"`` splits ``load_text_tokens()``; ``"bpe"`` cuts
    the same document stream (documents joined by ``BPE_EOS``) at the same fraction of
    characters, trains a byte-level BPE tokenizer (``tokenizers``, GPT-2 style) of
    ``bpe_vocab_size`` ids on the training part only, and encodes both parts with it.

    Raises:
        ValueError: ``val_fraction`` not in (0, 1), ``vocab`` not in ``("byte", "bpe")``,
            ``bpe_vocab_size`` not in [512, 65536].
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if vocab not in VOCABS:
        raise ValueError(f"vocab={vocab!r} is not accepted; accepted values: {VOCABS}")
    if vocab == "bpe":
        return _load_bpe_data(val_fraction, bpe_vocab_size)
    tokens = load_text_tokens()
    cut = int(round(len(tokens) * (1.0 - val_fraction)))
    return LMData(train=tokens[:cut], val=tokens[cut:])


def _load_bpe_data(val_fraction: float, vocab_size: int) -> LMData:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not (
            512 <= vocab_size <= 65536):
        raise ValueError(f"bpe_vocab_size must be an int in [512, 65536], got {vocab_size!r}")
    from pydoc_data.topics import topics

    tok = require("tokenizers", "demo", "the demo's BPE vocabulary (--vocab bpe)")
    Tokenizer, decoders, models = tok.Tokenizer, tok.decoders, tok.models
    pre_tokenizers, trainers = tok.pre_tokenizers, tok.trainers

    text = "".join(topics[key] + BPE_EOS for key in sorted(topics))
    cut = int(round(len(text) * (1.0 - val_fraction)))
    train_text, val_text = text[:cut], text[cut:]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(train_text.split(BPE_EOS), trainer=trainer)
    eos = tokenizer.token_to_id(BPE_EOS)
    size = tokenizer.get_vocab_size()
    # Byte-level ids: each character of a token's string is one byte of the text.
    token_bytes = torch.ones(size, dtype=torch.int64)
    for token, i in tokenizer.get_vocab().items():
        if i != eos:
            token_bytes[i] = len(token)

    def encode(part: str) -> Tensor:
        ids: list[int] = []
        for k, doc in enumerate(part.split(BPE_EOS)):
            if k:
                ids.append(eos)
            ids.extend(tokenizer.encode(doc).ids)
        return torch.tensor(ids, dtype=torch.int64)

    return LMData(train=encode(train_text), val=encode(val_text), vocab_size=size,
                  eos_id=eos, token_bytes=token_bytes, tokenizer=tokenizer)


@dataclass(frozen=True)
class CodeData(LMData):
    """``LMData`` of source files, split by file.

    Attributes:
        train_files, val_files: the files (paths relative to the standard library's
            directory) whose bytes make ``train`` and ``val``, in that order.
    """

    train_files: tuple[str, ...] = ()
    val_files: tuple[str, ...] = ()


def stdlib_source_files() -> list[Path]:
    """The top-level ``*.py`` files of this interpreter's standard library, sorted by name
    (about 170 files, 4.7 MB for CPython 3.11)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.is_file())


def _file_bytes(paths: list[Path]) -> Tensor:
    parts = []
    eos = torch.tensor([EOS_ID], dtype=torch.int64)
    for path in paths:
        raw = path.read_bytes()
        if raw:
            parts.append(torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.int64))
        parts.append(eos)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def load_code_data(val_every: int = 10) -> CodeData:
    """Byte ids of the standard library's sources (``stdlib_source_files``), split by file.

    Every ``val_every``-th file in name order (the 10th, 20th, ...) is held out, so no
    training window shares a file with the held-out text. Each file's raw bytes are
    followed by ``EOS_ID``, as in ``load_text_tokens``.

    Args:
        val_every: hold out one file in this many (>= 2).

    Returns:
        ``CodeData`` with ``(n,)`` int64 ``train`` and ``val`` in ``[0, VOCAB_SIZE)``.

    Raises:
        ValueError: ``val_every`` < 2, or fewer than ``val_every`` source files found.
    """
    if isinstance(val_every, bool) or not isinstance(val_every, int) or val_every < 2:
        raise ValueError(f"val_every must be an int >= 2, got {val_every!r}")
    files = stdlib_source_files()
    if len(files) < val_every:
        raise ValueError(f"found {len(files)} standard-library sources, need at least "
                         f"val_every={val_every}")
    held = [i % val_every == val_every - 1 for i in range(len(files))]
    train = [f for f, h in zip(files, held, strict=True) if not h]
    val = [f for f, h in zip(files, held, strict=True) if h]
    root = files[0].parent
    return CodeData(train=_file_bytes(train), val=_file_bytes(val),
                    train_files=tuple(str(f.relative_to(root)) for f in train),
                    val_files=tuple(str(f.relative_to(root)) for f in val))


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


def load_digits_data(val_fraction: float = 0.2, seed: int = 0,
                     scale: str = "standard") -> DigitsData:
    """scikit-learn's digits with a stratified held-out split.

    With ``scale="standard"`` pixels are standardized with the training split's mean and
    standard deviation (constant pixels get scale 1), so nothing of the held-out split
    leaks in; ``scale="unit"`` divides the raw intensities (0..16) by 16, into [0, 1]
    (autoencoder targets).

    Args:
        val_fraction: held-out fraction in (0, 1).
        seed: seed of the stratified shuffle.
        scale: ``"standard"`` or ``"unit"``.

    Raises:
        ValueError: ``val_fraction`` not in (0, 1), unknown ``scale``.
    """
    feature = "the demo's digits data (--task digits)"
    load_digits = require("sklearn.datasets", "demo", feature).load_digits
    train_test_split = require("sklearn.model_selection", "demo", feature).train_test_split
    StandardScaler = require("sklearn.preprocessing", "demo", feature).StandardScaler

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if scale not in ("standard", "unit"):
        raise ValueError(f"scale={scale!r}; accepted: ('standard', 'unit')")
    x, y = load_digits(return_X_y=True)
    x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=val_fraction, stratify=y,
                                              random_state=seed)
    scaler = StandardScaler().fit(x_tr)

    def as_x(a):
        a = scaler.transform(a) if scale == "standard" else a / 16.0
        return torch.tensor(a, dtype=torch.float32)

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
