"""Command line: ``python -m fisher_metrics report --model PATH [--data ...] --out DIR``.

What ``PATH``, ``--data`` and ``--out`` accept and what is written: :data:`REPORT_DESCRIPTION`
(the plain-text ``report --help`` description); the report itself:
:func:`fisher_metrics.reporting.report`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

STATE_FILES = ("kfac_state.pt", "kfac_preconditioner.pt")
FISHER_TYPES = ("mc", "empirical")  # fisher_metrics.fit.FISHER_TYPES (not imported: no torch)
DTYPES = ("float32", "float64")
REPORT_DESCRIPTION = """\
Post-hoc curvature report of a Hugging Face model: per-layer K-FAC metrics from its
K-FAC factors plus exact Lanczos checks on a small data set.

--model is either a save_pretrained directory (a causal LM, or the class its config.json
names in architectures, e.g. BertForSequenceClassification), or an output directory of
python -m kfac_optim.demo (it holds kfac_model/ and kfac_preconditioner.pt). The K-FAC
state (a torch.save of KFACPreconditioner.state_dict()) is given by --kfac-state or found
as kfac_state.pt or kfac_preconditioner.pt in it or next to it. Without one, the factors
are fitted from --data in one pass (fisher_metrics.fit_factors: Monte-Carlo Fisher by
default, --fisher empirical for the data labels), and --save-factors FILE saves them as a
K-FAC state that a later report (--kfac-state FILE) reads.

--data is 'pydoc' (the demo corpus: byte-level ids, or the vocabulary of the
tokenizer.json saved with the model), a UTF-8 text file (byte-level ids), or a .pt file
holding a (B, S) integer tensor of token ids, or a dict of (B, ...) tensors with
input_ids and labels (e.g. (B,) class labels for a sequence classifier; attention_mask
optional).

Written to --out: report.json, report.md, report.html (self-contained: plots embedded)
and the plots as PNG files (spectra.png, slq.png, bars.png) that report.md links.
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's default shown (unless its help states it, or it is a required option or a
    flag); the description's line breaks kept."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default" in text or action.required or action.nargs == 0:
            return text
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fisher_metrics",
        description="Curvature metrics for PyTorch models (fisher_metrics).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser(
        "report",
        help="post-hoc curvature report from stored K-FAC factors plus exact Lanczos checks",
        description=REPORT_DESCRIPTION,
        formatter_class=_HelpFormatter,
    )
    rep.add_argument("--model", required=True,
                     help="save_pretrained directory or kfac_optim.demo output directory")
    rep.add_argument("--kfac-state", default=None, help="torch.save of KFACPreconditioner."
                     "state_dict() (default: kfac_state.pt or kfac_preconditioner.pt by --model)")
    rep.add_argument("--fisher", choices=FISHER_TYPES, default=None,
                     help="Fisher type of factors fitted without a K-FAC state (default mc)")
    rep.add_argument("--save-factors", default=None, metavar="FILE",
                     help="save the fitted factors (a K-FAC state) to FILE")
    rep.add_argument("--data", default="pydoc", help="'pydoc', a text file, or a .pt id tensor")
    rep.add_argument("--out", default="fisher_report", help="output directory")
    rep.add_argument("--seq-len", type=int, default=None,
                     help="tokens per window (default: min(64, n_positions))")
    rep.add_argument("--num-sequences", type=int, default=8, help="windows of text used")
    rep.add_argument("--batch-size", type=int, default=4, help="windows per batch")
    rep.add_argument("--k", type=int, default=10, help="whole-model K-FAC eigenvalues listed")
    rep.add_argument("--exact-max-iter", type=int, default=20, help="Lanczos steps per layer")
    rep.add_argument("--no-exact", action="store_true", help="skip per-layer exact checks")
    rep.add_argument("--slq-probes", type=int, default=4, help="SLQ probes (0: skip)")
    rep.add_argument("--slq-steps", type=int, default=20, help="Lanczos steps per SLQ probe")
    rep.add_argument("--hessian-k", type=int, default=3, help="Hessian/GGN eigenvalues (0: skip)")
    rep.add_argument("--dtype", choices=DTYPES, default=None,
                     help="dtype of the exact products (default: the model's)")
    rep.add_argument("--seed", type=int, default=0, help="seed of Lanczos starts and SLQ probes")
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


def _resolve_paths(model_path: Path, state: str | None) -> tuple[Path, Path | None]:
    """``(model directory, K-FAC state file or None: fit the factors)`` from ``--model`` /
    ``--kfac-state``."""
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
    return model_dir, None


def _load_data(spec: str, model, args: argparse.Namespace):
    import torch

    from kfac_optim.layers import is_causal_lm

    from .data import lm_batches
    from .reporting import default_data

    sizes = dict(num_sequences=args.num_sequences, batch_size=args.batch_size)
    if not is_causal_lm(model) and not spec.endswith(".pt"):
        raise ValueError(f"--data {spec!r} gives causal-LM text batches, but the model is a "
                         f"{type(model).__name__}: pass --data FILE.pt holding a dict of "
                         "'input_ids', 'labels' (and 'attention_mask') tensors")
    if spec == "pydoc":
        return default_data(model, seq_len=args.seq_len, **sizes)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--data must be 'pydoc', a text file or a .pt file; got {spec!r}")
    if path.suffix == ".pt":
        ids = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(ids, dict):
            if not {"input_ids", "labels"} <= set(ids) or not all(
                    isinstance(v, torch.Tensor) and len(v) == len(ids["input_ids"])
                    for v in ids.values()):
                raise ValueError("--data .pt dict must hold (B, ...) tensors with 'input_ids' "
                                 f"and 'labels' (same B); got keys {sorted(ids)}")
            chunks = {key: value.split(args.batch_size) for key, value in ids.items()}
            parts = zip(*chunks.values(), strict=True)
            return [dict(zip(chunks, part, strict=True)) for part in parts]
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
            raise ValueError("--data .pt file must hold a (B, S) integer tensor of token ids, "
                             "or a dict with 'input_ids' and 'labels'")
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


def _model_class(transformers, model_dir: Path):
    """The class named first in ``config.json``'s ``architectures`` (a transformers
    ``...For...`` model class), else ``AutoModelForCausalLM``."""
    names = json.loads((model_dir / "config.json").read_text()).get("architectures") or []
    cls = getattr(transformers, names[0], None) if names else None
    if names and not (isinstance(cls, type) and hasattr(cls, "from_pretrained")):
        raise ValueError(f"--model: config.json names architecture {names[0]!r}, which this "
                         f"transformers ({transformers.__version__}) does not have")
    return cls or transformers.AutoModelForCausalLM


def run_report(args: argparse.Namespace) -> list:
    """Load the model, K-FAC state and data named by ``args`` and write the report."""
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be an integer >= 1; got {args.threads}")
    model_dir, state_path = _resolve_paths(Path(args.model), args.kfac_state)
    import torch

    from kfac_optim._extras import require

    from .reporting import report

    feature = "python -m fisher_metrics report"
    transformers = require("transformers", "hf", feature)
    require("matplotlib.figure", "report", feature)
    for flag, value in (("--save-factors", args.save_factors), ("--fisher", args.fisher)):
        if value is not None and state_path is not None:
            raise ValueError(f"{flag} applies to fitted factors, but a K-FAC state was given or "
                             f"found ({str(state_path)!r}): nothing is fitted")

    torch.set_num_threads(default_threads() if args.threads is None else args.threads)

    model = _model_class(transformers, model_dir).from_pretrained(model_dir).eval()
    data = _load_data(args.data, model, args)
    if state_path is None:
        from .fit import fit_factors

        fisher = args.fisher or "mc"
        print(f"no K-FAC state ({' or '.join(STATE_FILES)}) found: fitting the factors from "
              f"--data ({fisher} Fisher)", file=sys.stderr)
        state = fit_factors(model, data, fisher=fisher, seed=args.seed)
        if args.save_factors is not None:
            Path(args.save_factors).parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, args.save_factors)
            print(f"saved the fitted factors to {args.save_factors}", file=sys.stderr)
    else:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
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
    print(f"wrote {args.out}/report.json, report.md, report.html and the PNG plots")
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
