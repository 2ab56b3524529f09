"""Time and peak memory of fitting K-FAC factors for the report (``fisher_metrics.fit_factors``)
on a GPT-2 of about 100M parameters with a 50257-token vocabulary.

    OMP_NUM_THREADS=1 python benchmarks/report_fit.py [--n-layer 8] [--num-sequences 16]
        [--seq-len 64] [--batch-size 4] [--threads 1] [--no-report]

Stages, in one process, in this order (``ru_maxrss`` is the process's peak so far, so each
stage's figure is the peak up to its end):

1. baseline: one training-style pass over the same batches (``model(**batch).loss.backward()``
   per batch, gradients kept), the cost of a plain epoch over the report data;
2. fit: ``fit_factors(model, batches)`` (MC Fisher; the head's G low-rank, ``U``: 50257 x N);
3. report (unless ``--no-report``): the K-FAC half of the report (``build_report`` with the
   exact checks, SLQ and the Hessian comparison off): factor eigendecompositions, capacity.

The model is built from a config (random weights; nothing downloaded); the data is the
byte-level pydoc corpus. Times are wall seconds and ratios to the baseline pass; memory is
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux), which, unlike tracemalloc,
sees torch's allocations. Writes ``benchmarks/results/report_fit.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "report_fit.json"


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--num-sequences", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-report", action="store_true")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import GPT2Config, GPT2LMHeadModel

    import fisher_metrics as fm
    from fisher_metrics.data import corpus_tokens, lm_batches

    rss = {"start": peak_mib()}
    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.n_layer, n_embd=args.n_embd, n_head=12,
                        vocab_size=args.vocab, n_positions=max(128, args.seq_len))
    model = GPT2LMHeadModel(config).eval()
    params = sum(p.numel() for p in model.parameters())
    batches = lm_batches(corpus_tokens(), seq_len=args.seq_len,
                         num_sequences=args.num_sequences, batch_size=args.batch_size)
    rss["model"] = peak_mib()

    started = time.perf_counter()
    for batch in batches:
        model(**batch).loss.backward()
    baseline_s = time.perf_counter() - started
    model.zero_grad(set_to_none=True)
    rss["baseline"] = peak_mib()

    started = time.perf_counter()
    state = fm.fit_factors(model, batches, fisher="mc")
    fit_s = time.perf_counter() - started
    rss["fit"] = peak_mib()
    head = state["layers"]["lm_head"]
    u_shape = list(head["G"]["cols"].shape) if head["G_low_rank"] else None

    report_s = None
    if not args.no_report:
        started = time.perf_counter()
        result = fm.build_report(model, batches, kfac=state, exact=False, slq_probes=0,
                                 hessian_k=0, progress=False)
        report_s = time.perf_counter() - started
        rss["report"] = peak_mib()
        assert result["meta"]["factors"]["source"] == "fitted"

    tokens = sum(b["input_ids"].numel() for b in batches)
    out = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/report_fit.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if k not in ("out", "no_report")) + (" --no-report" if args.no_report else ""),
        "model": f"GPT2LMHeadModel n_layer={args.n_layer} n_embd={args.n_embd} "
                 f"vocab={args.vocab}",
        "num_params": params,
        "num_batches": len(batches),
        "tokens": tokens,
        "loss_rows": state["fit"]["num_rows"],
        "threads": args.threads,
        "lm_head_low_rank_U": u_shape,
        "baseline_pass_s": baseline_s,
        "fit_s": fit_s,
        "fit_over_baseline": fit_s / baseline_s,
        "report_kfac_s": report_s,
        "peak_rss_mib": rss,
        "fit_peak_over_baseline_peak": rss["fit"] / rss["baseline"],
        "load_average": list(os.getloadavg()),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    print(f"{'stage':<12}{'seconds':>10}{'peak RSS MiB':>15}")
    print(f"{'model':<12}{'':>10}{rss['model']:>15.0f}")
    print(f"{'baseline':<12}{baseline_s:>10.1f}{rss['baseline']:>15.0f}")
    print(f"{'fit':<12}{fit_s:>10.1f}{rss['fit']:>15.0f}   ({fit_s / baseline_s:.2f}x baseline)")
    if report_s is not None:
        print(f"{'report':<12}{report_s:>10.1f}{rss['report']:>15.0f}")
    print(f"{params / 1e6:.1f}M parameters, {len(batches)} batches, {tokens} tokens, "
          f"lm_head U {u_shape}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
