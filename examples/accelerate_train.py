"""Train the demo GPT-2 LM with K-FAC under Hugging Face Accelerate.

Launch (2 processes on a CPU machine; on GPUs drop --cpu):

    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_train.py --cpu
    torchrun --nproc_per_node 2 examples/accelerate_train.py --cpu

(Measured: ``accelerate launch --cpu --num_processes 2`` starts one process, so the CPU
recipe is ``--multi_gpu`` plus ``Accelerator(cpu=True)``.) ``accelerator.prepare`` wraps
the model in DDP and K-FAC in ``AcceleratedOptimizer``; the preconditioner reduces its
factor statistics across ranks exactly. ``--grad-accum k`` uses
``accelerator.accumulate``: statistics from every micro-batch, one K-FAC step per k.

``--resume-check`` also verifies, in the same launch, that
``accelerator.save_state`` / ``load_state`` halfway continues exactly as the
uninterrupted run, and writes ``{out}/accelerate_result.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from accelerate import Accelerator

from kfac_optim import KFAC
from kfac_optim.demo import build_lm_model, default_hparams
from kfac_optim.demo.data import load_lm_data


def batch_for(tokens: torch.Tensor, step: int, micro: int, rank: int, batch: int, seq: int):
    """Deterministic per-(step, micro-batch, rank) batch of token chunks."""
    g = torch.Generator().manual_seed(10_000 * step + 100 * micro + rank)
    starts = torch.randint(0, tokens.numel() - seq - 1, (batch,), generator=g)
    return torch.stack([tokens[s: s + seq] for s in starts.tolist()])


def build(args, accelerator):
    torch.manual_seed(args.seed)
    model = build_lm_model(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                           seq_len=args.seq_len)
    hp = default_hparams("lm", "kfac")  # the demo's K-FAC: defaults at AdamW's lr
    hp.update({k: v for k, v in vars(args).items() if k in hp and v is not None})
    opt = KFAC(model, **hp, accumulation_steps=accelerator.gradient_accumulation_steps)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    return accelerator.prepare(model, opt, sched)


def train(accelerator, model, opt, sched, tokens, args, steps: range) -> float:
    loss = torch.tensor(float("nan"))
    k = accelerator.gradient_accumulation_steps
    for step in steps:
        for micro in range(k):
            ids = batch_for(tokens, step, micro, accelerator.process_index, args.batch_size,
                            args.seq_len).to(accelerator.device)
            with accelerator.accumulate(model):
                loss = model(input_ids=ids, labels=ids).loss
                accelerator.backward(loss)
                opt.step()
                sched.step()
                opt.zero_grad()
    return float(accelerator.reduce(loss.detach(), reduction="mean"))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="Accelerator(cpu=True)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--lr", type=float, help="default: the demo's tuned K-FAC value")
    p.add_argument("--damping", type=float)
    p.add_argument("--kl-clip", type=float)
    p.add_argument("--factor-update-steps", type=int)
    p.add_argument("--inv-update-steps", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume-check", action="store_true")
    p.add_argument("--out", default="runs/accelerate")
    args = p.parse_args(argv)

    accelerator = Accelerator(cpu=args.cpu, gradient_accumulation_steps=args.grad_accum)
    tokens = load_lm_data().train
    model, opt, sched = build(args, accelerator)
    final_loss = train(accelerator, model, opt, sched, tokens, args, range(args.steps))
    result = {"world_size": accelerator.num_processes, "steps": args.steps,
              "grad_accum": args.grad_accum, "final_train_loss": final_loss}
    if args.resume_check:
        reference = [p.detach().clone() for p in accelerator.unwrap_model(model).parameters()]
        accelerator.free_memory()
        half = args.steps // 2
        with tempfile.TemporaryDirectory() as tmp:
            # every rank must see the same directory: under the run's --out when distributed
            ckpt_dir = tmp if accelerator.num_processes == 1 else os.path.join(args.out, "ckpt")
            model, opt, sched = build(args, accelerator)
            train(accelerator, model, opt, sched, tokens, args, range(half))
            accelerator.save_state(ckpt_dir)
            accelerator.free_memory()
            model, opt, sched = build(args, accelerator)
            accelerator.load_state(ckpt_dir)
            train(accelerator, model, opt, sched, tokens, args, range(half, args.steps))
        resumed = [p.detach() for p in accelerator.unwrap_model(model).parameters()]
        result["resume_max_param_diff"] = max(
            float((a - b).abs().max()) for a, b in zip(reference, resumed, strict=True))
    if accelerator.is_main_process:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "accelerate_result.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        os._exit(0)  # measured: gloo workers sometimes abort at interpreter exit
