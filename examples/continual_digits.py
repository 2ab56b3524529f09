"""Continual learning on scikit-learn digits: forgetting damage, EWC and the K-FAC Laplace penalty.

Task A is digits 0-4, task B digits 5-9; one MLP (64 -> 64 -> 10, tanh) with a
shared 10-way head learns A with ``kfac_optim.KFAC`` (so the optimizer's
Kronecker factors give ``fm.KFACFisher.from_preconditioner`` without another
pass), then B with SGD (momentum 0.9), from the same start and batches:

- (a) plainly;
- (b) with the diagonal EWC penalty ``fm.ewc_penalty`` (exact GGN diagonal at theta_A);
- (c) with the K-FAC Laplace penalty ``fm.kfac_laplace_penalty``, once with the
  optimizer's running factors (empirical, an EMA over the end of training) and
  once with factors captured at theta_A with labels sampled from the model
  (``kfac_at``: 8 label samples per row, one capture pass).

Penalty strengths are set per Fisher so that ``k = lr * strength *
lambda_max(F)`` takes the values of ``--stiffness`` (heavy-ball SGD on the
penalty alone is stable for ``k < 2 (1 + momentum) = 3.8``; the Laplace choice
``strength = N_A`` gives ``k`` of 4 to 13 here and diverges). ``strength / N_A``
is reported.

Reported: task-A test loss / accuracy after B for each run; how well
``fm.forgetting_damage`` ranks the measured increase of task A's *training*
loss (the loss whose Fisher it is) over geometric checkpoints of run (a) and
pooled over the checkpoints of every stable run (Spearman; ``euclidean`` =
``||Delta||^2`` is the baseline), and ``(D / 2) / increase`` at the first step
(1 for an exact local quadratic model); a perturbation check: the same Gaussian
noise on the top-C% / random / bottom-C% hidden channels ranked by the
GGN-diagonal channel Fisher (``GroupFisher``), task-A test loss increase.

Run::

    python examples/continual_digits.py [--out benchmarks/results/continual_digits.json]

About 10 s on 2 CPU cores. Writes the JSON file and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import fisher_metrics as fm
import kfac_optim

ROOT = Path(__file__).resolve().parents[1]
PENALTY = {"ewc": fm.ewc_penalty, "laplace": fm.kfac_laplace_penalty}
DIVERGED = 1e4


def load_tasks(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """Standardised digits split into task A (0-4) and B (5-9), each 70 / 30 train / test."""
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.3, random_state=seed, stratify=digits.target
    )
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    tasks = {}
    for name, low in (("A", 0), ("B", 5)):
        tasks[name] = {}
        for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
            keep = (y >= low) & (y < low + 5)
            tasks[name][f"x_{split}"] = torch.tensor((x[keep] - mean) / std, dtype=torch.float32)
            tasks[name][f"y_{split}"] = torch.tensor(y[keep], dtype=torch.int64)
    return tasks


def batches(x: torch.Tensor, y: torch.Tensor, size: int, generator: torch.Generator):
    order = torch.randperm(x.shape[0], generator=generator)
    for start in range(0, x.shape[0], size):
        index = order[start : start + size]
        yield x[index], y[index]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    logits = model(x)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def train_a(tasks, args) -> tuple[nn.Module, kfac_optim.KFAC]:
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(64, args.hidden), nn.Tanh(), nn.Linear(args.hidden, 10))
    opt = kfac_optim.KFAC(  # the settings benchmarks/results/continual_digits.json was run with
        model,
        lr=0.1,
        momentum=0.9,
        base="sgd",
        damping=1e-3,
        damping_mode="exact",
        kl_clip=1e-3,
        factor_update_steps=1,
        inv_update_steps=10,
    )
    generator = torch.Generator().manual_seed(args.seed)
    a = tasks["A"]
    for _ in range(args.epochs_a):
        for x, y in batches(a["x_train"], a["y_train"], 64, generator):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model, opt


def kfac_at(model: nn.Module, x: torch.Tensor, samples: int, seed: int) -> fm.KFACFisher:
    """K-FAC factors at the current parameters, labels sampled from the model (true Fisher).

    One captured forward/backward over ``samples`` copies of ``x`` with labels
    ``y ~ softmax(f(x))``, ``factor_decay=0``: the factors of this pass only.
    """
    pre = kfac_optim.KFACPreconditioner(
        model, factor_update_steps=1, factor_decay=0.0, kl_clip=None
    )
    generator = torch.Generator().manual_seed(seed)
    logits = model(x.repeat(samples, 1))
    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=generator)[:, 0]
    F.cross_entropy(logits, y).backward()
    pre.step()
    model.zero_grad(set_to_none=True)
    fisher = fm.KFACFisher.from_preconditioner(pre)
    pre.remove()
    return fisher


def checkpoint_steps(total: int) -> list[int]:
    """Roughly geometric steps 1, 2, 3, 4, 6, 8, 11, ... up to ``total``."""
    return sorted({min(total, round(1.41**k)) for k in range(64) if round(1.41**k) <= total})


def train_b(model_a, tasks, args, penalty=None, checkpoints=None) -> tuple[nn.Module, bool]:
    """SGD with momentum on task B from task A's solution (same batches for every run).

    Returns the model and whether training diverged: a training loss that is not
    finite or above ``DIVERGED`` stops it (cross-entropy over 10 classes starts
    near ``log 10``; only a blown-up quadratic penalty gets there).
    """
    model = copy.deepcopy(model_a)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr_b, momentum=0.9)
    generator = torch.Generator().manual_seed(args.seed + 1)
    b, step = tasks["B"], 0
    steps_per_epoch = -(-b["y_train"].numel() // 64)
    keep = set(checkpoint_steps(args.epochs_b * steps_per_epoch))
    for _ in range(args.epochs_b):
        for x, y in batches(b["x_train"], b["y_train"], 64, generator):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if penalty is not None:
                loss = loss + penalty(model)
            if not torch.isfinite(loss) or float(loss.detach()) > DIVERGED:
                return model, True
            loss.backward()
            opt.step()
            step += 1
            if checkpoints is not None and step in keep:
                checkpoints.append((step, copy.deepcopy(model.state_dict())))
    return model, False


def damage_vs_loss(fishers, params_a, model_a, data_a, checkpoints) -> dict:
    """Spearman correlation of ``forgetting_damage`` with the measured task-A train-loss increase.

    Over the checkpoints of the plain run (a), and pooled over the checkpoints of
    every run that did not diverge; ``euclidean`` (``||Delta||^2``, the damage of
    an identity Fisher) is the baseline a Fisher has to beat.
    """
    probe = copy.deepcopy(model_a)
    base = evaluate(model_a, *data_a)[0]
    rows = []
    for run, states in checkpoints.items():
        for step, state in states:
            probe.load_state_dict(state)
            row = {"run": run, "step": step, "measured": evaluate(probe, *data_a)[0] - base}
            for name, fisher in fishers.items():
                damage = fm.forgetting_damage(fisher, params_a, state)
                row[name] = damage["total"]
            row["euclidean"] = damage["delta_norm"] ** 2
            rows.append(row)
    names = [*fishers, "euclidean"]
    plain = [r for r in rows if r["run"] == "plain"]

    def spearman(subset, name):
        return float(
            spearmanr([r[name] for r in subset], [r["measured"] for r in subset]).statistic
        )

    return {
        "plain_steps": [r["step"] for r in plain],
        "plain_measured_increase": [r["measured"] for r in plain],
        "plain_damage": {name: [r[name] for r in plain] for name in names},
        "pooled_checkpoints": len(rows),
        "correlation": {
            name: {
                "spearman_plain": spearman(plain, name),
                "spearman_pooled": spearman(rows, name),
                "half_damage_over_increase_step1": plain[0][name] / 2 / plain[0]["measured"],
            }
            for name in names
        },
    }


def perturbation_check(model_a, fisher, tasks, args) -> dict:
    """Task-A test loss increase: the same noise on the top-C% / random / bottom-C% hidden channels.

    A channel is a hidden unit: its weight row and bias entry in the first Linear;
    its importance is the GGN-diagonal Fisher summed over them (``GroupFisher``).
    The noise has norm ``epsilon`` per channel (``epsilon * sqrt(count)`` in all).
    """
    groups = fisher.groups(model_a)
    importance = groups.values["0.weight|channel"] + groups.values["0.bias|channel"]
    hidden = importance.numel()
    a = tasks["A"]
    base, _ = evaluate(model_a, a["x_test"], a["y_test"])
    out = {"epsilon_per_channel": args.epsilon, "trials": args.trials, "base_loss": base}
    out["by_fraction"] = {}
    generator = torch.Generator().manual_seed(args.seed + 2)
    order = torch.argsort(importance, descending=True)
    for fraction in (0.05, 0.1, 0.25):
        count = max(1, round(fraction * hidden))
        increases = {"top": [], "random": [], "bottom": []}
        for _ in range(args.trials):
            chosen = {
                "top": order[:count],
                "random": torch.randperm(hidden, generator=generator)[:count],
                "bottom": order[-count:],
            }
            noise = torch.randn(count, model_a[0].weight.shape[1] + 1, generator=generator)
            noise *= args.epsilon * count**0.5 / noise.norm()
            for kind, rows in chosen.items():
                model = copy.deepcopy(model_a)
                with torch.no_grad():
                    model[0].weight[rows] += noise[:, :-1]
                    model[0].bias[rows] += noise[:, -1]
                increases[kind].append(evaluate(model, a["x_test"], a["y_test"])[0] - base)
        row = {
            "channels": count,
            "importance_share_top": float(importance[order[:count]].sum() / importance.sum()),
        }
        for kind, values in increases.items():
            row[f"{kind}_mean"] = float(np.mean(values))
            row[f"{kind}_sem"] = float(np.std(values, ddof=1) / len(values) ** 0.5)
        out["by_fraction"][str(fraction)] = row
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/continual_digits.json"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--epochs-a", type=int, default=4)
    parser.add_argument("--epochs-b", type=int, default=10)
    parser.add_argument("--lr-b", type=float, default=0.05)
    parser.add_argument(
        "--stiffness",
        type=float,
        nargs="+",
        default=[0.3, 1.0, 3.0],
        help="penalty strengths as lr * strength * lambda_max(F) (SGD with momentum 0.9 on the "
        "penalty is stable below 3.8)",
    )
    parser.add_argument("--mc-samples", type=int, default=8)
    parser.add_argument("--epsilon", type=float, default=5.0, help="perturbation norm per channel")
    parser.add_argument("--trials", type=int, default=50)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest and deterministic
    tasks = load_tasks(args.seed)
    a = tasks["A"]
    data_a = (a["x_train"], a["y_train"])
    n_a = int(a["y_train"].numel())

    model_a, opt = train_a(tasks, args)
    params_a = copy.deepcopy(model_a.state_dict())
    opt.preconditioner.remove()  # stop capturing: task B uses plain SGD
    fishers = {
        "diag_ggn": fm.DiagonalFisher.collect(model_a, data_a, "ggn", task="A"),
        "diag_empirical": fm.DiagonalFisher.collect(model_a, data_a, "empirical", task="A"),
        "diag_mc": fm.DiagonalFisher.collect(
            model_a, data_a, "mc", task="A", mc_samples=args.mc_samples, seed=args.seed
        ),
        "kfac_optimizer": fm.KFACFisher.from_preconditioner(opt),
        "kfac_mc_at_A": kfac_at(model_a, a["x_train"], args.mc_samples, args.seed),
    }
    time_fishers = time.perf_counter() - start

    # Heavy-ball SGD on the quadratic penalty alone is stable while
    # lr * strength * lambda_max(F) < 2 (1 + momentum): each penalty gets the same margins.
    lambda_max = {name: float(f.top_k(1).values[0]) for name, f in fishers.items()}
    penalties = {"plain": (None, 0.0, 0.0)}
    for name in ("diag_ggn", "kfac_optimizer", "kfac_mc_at_A"):
        kind = "ewc" if name.startswith("diag") else "laplace"
        for stiffness in args.stiffness:
            strength = stiffness / (args.lr_b * lambda_max[name])
            penalties[f"{kind}_{name} k={stiffness:g}"] = (
                partial(PENALTY[kind], fishers[name], params_a, strength=strength),
                strength / n_a,
                stiffness,
            )
    runs, checkpoints = {}, {}
    loss_a0, acc_a0 = evaluate(model_a, a["x_test"], a["y_test"])
    train_loss_a0, _ = evaluate(model_a, *data_a)
    for name, (penalty, strength_over_n_a, stiffness) in penalties.items():
        t0 = time.perf_counter()
        checkpoints[name] = []
        model, diverged = train_b(model_a, tasks, args, penalty, checkpoints[name])
        loss_a, acc_a = evaluate(model, a["x_test"], a["y_test"])
        loss_b, acc_b = evaluate(model, tasks["B"]["x_test"], tasks["B"]["y_test"])
        runs[name] = {
            "strength_over_n_a": strength_over_n_a,
            "lr_strength_lambda_max": stiffness,
            "diverged": diverged,
            "task_a_test_loss": loss_a,
            "task_a_test_acc": acc_a,
            "task_b_test_loss": loss_b,
            "task_b_test_acc": acc_b,
            "damage_diag_ggn": fm.forgetting_damage(fishers["diag_ggn"], params_a, model)["total"],
            "seconds": time.perf_counter() - t0,
        }
        if diverged:
            del checkpoints[name]
    damage_study = damage_vs_loss(fishers, params_a, model_a, data_a, checkpoints)
    result = {
        "command": "python examples/continual_digits.py",
        "config": {k: v for k, v in vars(args).items() if k != "out"}
        | {"n_a_train": n_a, "b_optimizer": "SGD(momentum=0.9)"},
        "task_a_before_b": {"test_loss": loss_a0, "test_acc": acc_a0, "train_loss": train_loss_a0},
        "fisher_traces": {name: f.trace() for name, f in fishers.items()},
        "fisher_lambda_max": lambda_max,
        "runs": runs,
        "damage_vs_loss_increase": damage_study,
        "fisher_overlap_diag_ggn_vs_empirical": fm.fisher_overlap(
            fishers["diag_ggn"], fishers["diag_empirical"]
        )["overlap"],
        "fisher_overlap_kfac_optimizer_vs_mc_at_A": fm.fisher_overlap(
            fishers["kfac_optimizer"], fishers["kfac_mc_at_A"]
        )["overlap"],
        "perturbation": perturbation_check(model_a, fishers["diag_ggn"], tasks, args),
        "timing_s": {"train_a_and_fishers": time_fishers, "total": time.perf_counter() - start},
        "machine": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    before = result["task_a_before_b"]
    lines = [
        f"Task A before B: test loss {before['test_loss']:.3f}, accuracy {before['test_acc']:.3f}",
        "",
        "| run on task B (k = lr strength lambda_max) | strength / N_A | task A loss | "
        "task A acc | task B acc | damage (GGN diag) |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in result["runs"].items():
        note = " (diverged)" if run["diverged"] else ""
        lines.append(
            f"| {name}{note} | {run['strength_over_n_a']:.3g} | {run['task_a_test_loss']:.3f} | "
            f"{run['task_a_test_acc']:.3f} | "
            f"{run['task_b_test_acc']:.3f} | {run['damage_diag_ggn']:.3g} |"
        )
    study = result["damage_vs_loss_increase"]
    lines += [
        "",
        f"forgetting_damage vs measured task-A train-loss increase (Spearman): plain run "
        f"({len(study['plain_steps'])} checkpoints, steps {study['plain_steps'][0]}.."
        f"{study['plain_steps'][-1]}) and pooled over all stable runs "
        f"({study['pooled_checkpoints']} checkpoints); (D/2) / increase at step 1:",
        "",
        "| Fisher | Spearman (plain) | Spearman (pooled) | (D/2) / increase, step 1 |",
        "|---|---|---|---|",
    ]
    for name, c in study["correlation"].items():
        lines.append(
            f"| {name} | {c['spearman_plain']:.3f} | {c['spearman_pooled']:.3f} | "
            f"{c['half_damage_over_increase_step1']:.3g} |"
        )
    pert = result["perturbation"]
    lines += [
        "",
        f"Perturbation of hidden channels (noise norm {pert['epsilon_per_channel']} per channel, "
        f"{pert['trials']} trials): task-A test loss increase, mean ± s.e.m.",
        "",
        "| channels | top by Fisher | random | bottom by Fisher |",
        "|---|---|---|---|",
    ]
    for fraction, row in pert["by_fraction"].items():
        cells = [
            f"{row[f'{k}_mean']:.3f} ± {row[f'{k}_sem']:.3f}" for k in ("top", "random", "bottom")
        ]
        lines.append(f"| {float(fraction):.0%} ({row['channels']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
