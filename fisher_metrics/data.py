"""A tiny offline text corpus for the report's default data.

The text is ``pydoc_data.topics`` (the help topics that ship with CPython, about
465k characters), UTF-8 encoded byte by byte (ids 0..255) with an end-of-document
id 256 after each topic, in sorted topic order: the corpus and tokenisation of
``python -m kfac_optim.demo``, re-implemented here so that the report does not
depend on the demo (``kfac_optim.demo`` needs the ``demo`` extra). A model saved
with its own ``tokenizers`` vocabulary (``tokenizer.json``, as ``python -m
kfac_optim.demo --vocab bpe`` saves it) gets the same text in that vocabulary
(:func:`tokenizer_corpus_tokens`; needs the ``hf`` extra). Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from kfac_optim._extras import require

from ._validation import check_int

__all__ = ["BYTE_VOCAB_SIZE", "EOS_ID", "byte_tokens", "corpus_tokens", "lm_batches",
           "tokenizer_corpus_tokens"]

EOS_ID = 256
BYTE_VOCAB_SIZE = 257


def byte_tokens(text: str, *, eos_id: int | None = None) -> Tensor:
    """UTF-8 bytes of ``text`` as ids ``0..255`` (``(n,)`` int64), optionally then ``eos_id``.

    Raises:
        TypeError: ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str; got {type(text).__name__}")
    ids = list(text.encode("utf-8"))
    if eos_id is not None:
        ids.append(int(eos_id))
    return torch.tensor(ids, dtype=torch.int64)


def corpus_tokens(source: str | Path = "pydoc", *, eos: bool = True) -> Tensor:
    """Byte ids of the default corpus (``"pydoc"``) or of a UTF-8 text file.

    Args:
        source: ``"pydoc"`` (every ``pydoc_data.topics`` entry, sorted by key,
            each followed by :data:`EOS_ID` when ``eos``) or a path to a text file.
        eos: append :data:`EOS_ID` after each pydoc topic (ids then lie in
            ``[0, 257)``); without it ids lie in ``[0, 256)``.

    Returns:
        ``(n,)`` int64 tensor of token ids.

    Raises:
        ValueError: ``source`` is neither ``"pydoc"`` nor an existing file, or the file is empty.
    """
    eos_id = EOS_ID if eos else None
    if isinstance(source, str) and source == "pydoc":
        from pydoc_data.topics import topics

        return torch.cat([byte_tokens(topics[key], eos_id=eos_id) for key in sorted(topics)])
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"source must be 'pydoc' or an existing text file; got {str(source)!r}")
    tokens = byte_tokens(path.read_text(encoding="utf-8", errors="replace"))
    if tokens.numel() == 0:
        raise ValueError(f"the text file {str(path)!r} is empty")
    return tokens


def tokenizer_corpus_tokens(tokenizer_file: str | Path, eos_token: str = "<|endoftext|>"
                            ) -> Tensor:
    """The pydoc corpus in a ``tokenizers`` vocabulary: every topic (sorted by key) encoded
    with the tokenizer saved in ``tokenizer_file``, each followed by ``eos_token``'s id.

    Returns:
        ``(n,)`` int64 token ids.

    Raises:
        ValueError: the file does not exist, or the vocabulary has no ``eos_token``.
        ImportError: ``tokenizers`` (the ``hf`` extra) is not installed.
    """
    from pydoc_data.topics import topics

    Tokenizer = require("tokenizers", "hf", "fisher_metrics.data.tokenizer_corpus_tokens").Tokenizer

    path = Path(tokenizer_file)
    if not path.is_file():
        raise ValueError(f"tokenizer_file {str(path)!r} does not exist")
    tokenizer = Tokenizer.from_file(str(path))
    eos = tokenizer.token_to_id(eos_token)
    if eos is None:
        raise ValueError(f"the tokenizer in {str(path)!r} has no {eos_token!r} token")
    ids: list[int] = []
    for key in sorted(topics):
        ids.extend(tokenizer.encode(topics[key]).ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def lm_batches(
    tokens: Tensor, *, seq_len: int = 32, num_sequences: int = 8, batch_size: int = 4
) -> list[dict[str, Tensor]]:
    """Causal-LM dict batches: ``num_sequences`` windows spread evenly over ``tokens``.

    Args:
        tokens: ``(n,)`` token ids, ``n >= seq_len``.
        seq_len: tokens per window.
        num_sequences: windows in all (fewer if the text is short).
        batch_size: windows per batch.

    Returns:
        A list of ``{"input_ids": (b, seq_len), "attention_mask": (b, seq_len),
        "labels": (b, seq_len)}`` batches (labels equal the ids; Hugging Face
        causal LMs shift them by one).

    Raises:
        TypeError / ValueError: bad sizes, or fewer than ``seq_len`` tokens.
    """
    if not isinstance(tokens, Tensor) or tokens.dim() != 1 or tokens.is_floating_point():
        raise TypeError("tokens must be a 1-D integer torch.Tensor of token ids")
    seq_len = check_int("seq_len", seq_len, minimum=2)
    num_sequences = check_int("num_sequences", num_sequences)
    batch_size = check_int("batch_size", batch_size)
    if tokens.numel() < seq_len:
        raise ValueError(f"need at least seq_len = {seq_len} tokens; got {tokens.numel()}")
    last = tokens.numel() - seq_len
    count = min(num_sequences, last + 1)
    starts = torch.linspace(0, last, count).round().long()
    windows = tokens[starts[:, None] + torch.arange(seq_len)]
    return [
        {
            "input_ids": chunk,
            "attention_mask": torch.ones_like(chunk),
            "labels": chunk.clone(),
        }
        for chunk in windows.split(batch_size)
    ]
