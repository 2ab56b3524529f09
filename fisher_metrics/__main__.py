"""Command line: ``python -m fisher_metrics report --model PATH [--data ...] --out DIR``.

``PATH`` is either

- a ``save_pretrained`` directory of a Hugging Face causal LM, with the K-FAC
  state (``torch.save(pre.state_dict())``) given by ``--kfac-state FILE`` or found
  as ``kfac_state.pt`` / ``kfac_preconditioner.pt`` in it or next to it; or
- an output directory of ``python -m kfac_optim.demo`` (it holds
  ``kfac_model/`` and ``kfac_preconditioner.pt``).

``--data`` is ``pydoc`` (default: the demo corpus, byte-level, or in the vocabulary of
the ``tokenizer.json`` saved with the model, as ``--vocab bpe`` demo runs save it), a UTF-8 text
file (byte-level ids), or a ``.pt`` file holding a ``(B, S)`` integer tensor of
token ids. The report (``report.json``, ``report.md``, ``report.html``) goes to
``--out``; see :func:`fisher_metrics.reporting.report`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

STATE_FILES = ("kfac_state.pt", "kfac_preconditioner.pt")
DTYPES = ("float32", "float64")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fisher_metrics",
        description="Curvature metrics for PyTorch models (fisher_metrics).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser(
        "report",
        help="post-hoc curvature report from stored K-FAC factors plus exact Lanczos checks",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rep.add_argument("--model", required=True, help="save_pretrained or demo out dir")
    rep.add_argument("--kfac-state", default=None, help="torch.save of pre.state_dict()")
    rep.add_argument("--data", default="pydoc", help="'pydoc', a text file, or a .pt id tensor")
    rep.add_argument("--out", default="fisher_report", help="output directory")
    rep.add_argument("--seq-len", type=int, default=None, help="tokens per window")
    rep.add_argument("--num-sequences", type=int, default=8, help="windows of text used")
    rep.add_argument("--batch-size", type=int, default=4, help="windows per batch")
    rep.add_argument("--k", type=int, default=10, help="whole-model K-FAC eigenvalues listed")
    rep.add_argument("--exact-max-iter", type=int, default=20, help="Lanczos steps per layer")
    rep.add_argument("--no-exact", action="store_true", help="skip per-layer exact checks")
    rep.add_argument("--slq-probes", type=int, default=4, help="SLQ probes (0: skip)")
    rep.add_argument("--slq-steps", type=int, default=20, help="Lanczos steps per SLQ probe")
    rep.add_argument("--hessian-k", type=int, default=3, help="Hessian/GGN eigenvalues (0: skip)")
    rep.add_argument("--dtype", choices=DTYPES, default=None, help="dtype of exact products")
    rep.add_argument("--seed", type=int, default=0)
    rep.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: OMP_NUM_THREADS if set, else the cores not busy "
        "with other processes; see default_threads)",
    )
    rep.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def _busy_elsewhere() -> float | None:
    """Runnable processes other than this one now (``/proc/loadavg``), else the 1-min load."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
        return max(0, running - 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def default_threads() -> int:
    """The CLI's torch CPU thread count when ``--threads`` is not given.

    ``OMP_NUM_THREADS`` when set (torch reads it already). Otherwise
    ``max(1, min(torch default, cores - busy))``: the cores this process may use
    (``os.sched_getaffinity``) less the processes that are running beside it
    (``/proc/loadavg``; the 1-minute load average where that file is missing),
    capped at torch's default. OpenMP threads that share a core with a busy
    process stall each other at every parallel region (reported: 71.8 s for the
    report at torch's default against 16.9 s with ``--threads 1`` beside one other
    process; measured in benchmarks/README.md, "Threads"). Without any load
    information: torch's default.

    Returns:
        An integer >= 1.
    """
    import torch

    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    default = torch.get_num_threads()
    busy = _busy_elsewhere()
    if busy is None:
        return default
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(default, int((cores or 1) - round(busy))))


def _resolve_paths(model_path: Path, state: str | None) -> tuple[Path, Path]:
    """``(model directory, K-FAC state file)`` from ``--model`` / ``--kfac-state``."""
    if not model_path.is_dir():
        raise ValueError(f"--model must be a directory; {str(model_path)!r} is not one")
    model_dir, search = model_path, [model_path, model_path.parent]
    if (model_path / "kfac_model").is_dir():
        model_dir, search = model_path / "kfac_model", [model_path]
    config = model_dir / "config.json"
    if not config.is_file():
        raise ValueError(
            f"--model: no config.json in {str(model_dir)!r}; expected a save_pretrained directory "
            "or a kfac_optim.demo output directory (with kfac_model/)"
        )
    if "model_type" not in json.loads(config.read_text()):
        raise ValueError(
            f"--model: {str(model_dir)!r} is not a Hugging Face model (its config.json has no "
            "model_type; digits models of the demo are not supported by the CLI: call "
            "fisher_metrics.report(model, data, kfac=state) from Python)"
        )
    if state is not None:
        state_path = Path(state)
        if not state_path.is_file():
            raise ValueError(f"--kfac-state: no such file {state!r}")
        return model_dir, state_path
    for folder in search:
        for name in STATE_FILES:
            if (folder / name).is_file():
                return model_dir, folder / name
    raise ValueError(
        f"no K-FAC state found ({' or '.join(STATE_FILES)} in {[str(f) for f in search]}): pass "
        "--kfac-state FILE (a torch.save of KFACPreconditioner.state_dict())"
    )


def _load_data(spec: str, model, args: argparse.Namespace):
    import torch

    from .data import lm_batches
    from .reporting import default_data

    sizes = dict(num_sequences=args.num_sequences, batch_size=args.batch_size)
    if spec == "pydoc":
        return default_data(model, seq_len=args.seq_len, **sizes)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--data must be 'pydoc', a text file or a .pt file; got {spec!r}")
    if path.suffix == ".pt":
        ids = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
            raise ValueError("--data .pt file must hold a (B, S) integer tensor of token ids")
        return [
            {"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "labels": chunk}
            for chunk in ids.split(args.batch_size)
        ]
    from .data import corpus_tokens

    vocab = getattr(model.config, "vocab_size", 0)
    if vocab < 256:
        raise ValueError(f"--data text files are byte-level (ids 0..255): vocab_size {vocab} < 256")
    positions = getattr(model.config, "n_positions", None) or 64
    seq_len = args.seq_len or min(64, int(positions))
    return lm_batches(corpus_tokens(path), seq_len=seq_len, **sizes)


def run_report(args: argparse.Namespace) -> list:
    """Load the model, K-FAC state and data named by ``args`` and write the report."""
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be an integer >= 1; got {args.threads}")
    model_dir, state_path = _resolve_paths(Path(args.model), args.kfac_state)
    import torch

    from kfac_optim._extras import require

    from .reporting import report

    feature = "python -m fisher_metrics report"
    AutoModelForCausalLM = require("transformers", "hf", feature).AutoModelForCausalLM
    require("matplotlib.figure", "report", feature)

    torch.set_num_threads(default_threads() if args.threads is None else args.threads)

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    data = _load_data(args.data, model, args)
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    table = report(
        model,
        data,
        kfac=state,
        out=args.out,
        k=args.k,
        exact=not args.no_exact,
        exact_max_iter=args.exact_max_iter,
        slq_probes=args.slq_probes,
        slq_steps=args.slq_steps,
        hessian_k=args.hessian_k,
        dtype=dtype,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print((Path(args.out) / "report.md").read_text())
    print(f"wrote {args.out}/report.json, report.md, report.html")
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns 0 on success, exits with status 2 and a message on bad input."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        run_report(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
