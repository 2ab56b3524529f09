"""Thread count vs time of the report and the estimators, with and without a busy process.

Command::

    python benchmarks/threads.py [--repeats 1] [--out benchmarks/results/threads.json]

Workloads (float64 where the model is):

- ``report``: ``fm.build_report`` (what ``python -m fisher_metrics report`` computes,
  without writing files) on a GPT-2 (1 layer, width 16, 257 byte ids) after 2 real
  ``kfac_optim`` steps, 4 windows of 16 bytes, with ``exact_max_iter=6``,
  ``slq_probes=2``, ``slq_steps=6``, ``hessian_k=1`` (the budgets of the report tests);
- ``estimators``: ``fm.hutchinson`` (30 probes) and ``fm.xtrace`` (30 products) on the
  GGN of the ``gpt2-lm`` problem of ``benchmarks/spectra.py``.

Thread settings: torch's default (``torch.get_num_threads()`` at start, which is the
number of cores unless ``OMP_NUM_THREADS`` is set), 1, 2, and the CLI default
(``fisher_metrics.__main__.default_threads()``), each run ``--repeats`` times,
interleaved, in one process; once on the machine as it is, once beside a busy loop
(``python -c 'while True: pass'``, started and stopped here). The machine's load
average is recorded: on a shared machine other processes count too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from spectra import gpt2_problem

import fisher_metrics as fm
import kfac_optim
from fisher_metrics.__main__ import default_threads
from fisher_metrics.data import EOS_ID, corpus_tokens, lm_batches


def report_workload():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=257, n_positions=32,
                        bos_token_id=EOS_ID, eos_token_id=EOS_ID)
    model = GPT2LMHeadModel(config)
    pre = kfac_optim.KFACPreconditioner(model, kl_clip=None, factor_update_steps=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for batch in lm_batches(corpus_tokens(), seq_len=16, num_sequences=8, batch_size=4):
        opt.zero_grad()
        model(**batch).loss.backward()
        pre.step()
        opt.step()
    pre.remove()
    state = pre.state_dict()
    data = lm_batches(corpus_tokens(), seq_len=16, num_sequences=4, batch_size=4)
    model.eval()

    def run():
        fm.build_report(model, data, kfac=state, exact_max_iter=6, slq_probes=2,
                        slq_steps=6, hessian_k=1, progress=False)

    return run


def estimator_workload():
    model, data = gpt2_problem()
    op = fm.make_operator(model, data, "ggn")

    def run():
        fm.hutchinson(op, num_samples=30)
        fm.xtrace(op, num_matvecs=30)

    return run


def measure(workloads, settings, repeats) -> dict:
    times = {w: {s: [] for s in settings} for w in workloads}
    for _ in range(repeats):
        for w, run in workloads.items():
            for name, threads in settings.items():
                torch.set_num_threads(threads)
                start = time.perf_counter()
                run()
                times[w][name].append(time.perf_counter() - start)
                print(f"  {w} at {name}: {times[w][name][-1]:.2f} s", flush=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "threads.json"))
    args = parser.parse_args()
    default = torch.get_num_threads()
    settings = {f"torch default ({default})": default, "1": 1, "2": 2}
    workloads = {"report": report_workload(), "estimators": estimator_workload()}
    for run in workloads.values():  # first-call overheads
        torch.set_num_threads(1)
        run()
    results = {}
    for condition in ("as is", "beside a busy loop"):
        busy = None
        if condition != "as is":
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            cli = default_threads()
            chosen = dict(settings, **{f"CLI default ({cli})": cli})
            load = os.getloadavg()
            times = measure(workloads, chosen, args.repeats)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
        results[condition] = {"load_average_before": load, "cli_default": cli, "seconds": times}
        for w, per in times.items():
            cells = "  ".join(f"{s}: {statistics.median(v):6.2f} s" for s, v in per.items())
            print(f"{condition:<19} {w:<10} {cells}", flush=True)
    env = {"torch": torch.__version__, "platform": platform.platform(), "cpus": os.cpu_count(),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python benchmarks/threads.py", "env": env,
                               "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
