"""Train a masked-language model on the Python standard library's own source, with stoker.

    python examples/train_mlm.py                       # the README's main job, CPU, minutes
    python examples/train_mlm.py --steps 20            # a smoke run
    stoker run --nproc 2 examples/train_mlm.py         # the same loop on two processes
    stoker run --nproc 2 examples/train_mlm.py --strategy fsdp   # ... with the model sharded
    python examples/train_mlm.py --recipe fast         # seq-len warm-up, WSD, lr 5e-3

A plain PyTorch loop: stoker appears in five places (Stoker, prepare, accumulate, backward,
clip_grad_norm_). The corpus is one document per top-level definition of the stdlib; the
tokenizer (byte-level BPE) is trained on first use and cached.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from stoker import Stoker
from stoker.checkpoint import CheckpointConfig
from stoker.data.accounting import TokenCounter
from stoker.data.loaders import mlm_loader, model_inputs
from stoker.data.mlm import mlm_accuracy, mlm_loss, unigram_baseline
from stoker.data.seqlen import SequenceLengthWarmup
from stoker.data.tokenizer import load_token_documents, load_tokenizer
from stoker.models import Encoder, EncoderConfig
from stoker.schedules import one_cycle, warmup_cosine, warmup_stable_decay

CALIBRATE = 20  # steps timed to fit the number of steps to --budget-minutes
PLAIN_LR = 2e-3
# `stoker tune lr` (the smoothed loss's minimum) on this job: 4.98e-3 on an EPYC Zen 3 and a
# Zen 5 alike (the range test reads the loss, not the clock). Over 900 steps with
# sequence-length warm-up and cosine it ended at 24.7% mean accuracy over 4 seeds, 2e-3 at
# 19.5% over 2 (README, "Faster to the same accuracy").
FAST_LR = 5e-3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "base"])
    p.add_argument("--max-len", type=int, default=128, help="tokens per row")
    p.add_argument("--batch-size", type=int, default=32, help="rows per micro-batch per process")
    p.add_argument(
        "--layout",
        default="pack",
        choices=["pack", "pad"],
        help="pack documents into full rows (default) or pad each batch to its longest",
    )
    p.add_argument("--accumulation-steps", type=int, default=1)
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps (at most)")
    p.add_argument(
        "--budget-minutes",
        type=float,
        default=4.5,
        help="train at most this long: fewer steps where a step is slow (0: exactly --steps)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"peak LR (plain: {PLAIN_LR:g}; fast: {FAST_LR:g}, `stoker tune lr`'s peak for the "
        "tiny preset at batch 32: re-run it for another model or batch size)",
    )
    p.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    p.add_argument("--precision", default="auto", help="fp32 | bf16 | fp16 | auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument(
        "--strategy",
        default="auto",
        choices=["auto", "ddp", "fsdp"],
        help="several processes: replicate the model (ddp) or shard it (fsdp)",
    )
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute each encoder block's activations in the backward (less memory)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-batches", type=int, default=100, help="validation batches (0: all)")
    p.add_argument("--log-every", type=int, default=25, help="steps between progress updates")
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps (0: only at the end)")
    # Time to accuracy (benchmarks/time_to_accuracy.py): recipes and mid-training evaluation.
    p.add_argument(
        "--recipe",
        default="plain",
        choices=["plain", "fast"],
        help="plain: warm-up + cosine at full length; fast: sequence-length warm-up and "
        "warm-up-stable-decay at the LR finder's peak (--lr), what came closest in "
        "benchmarks/time_to_accuracy.py, where one-cycle did not help (exactly --steps: no "
        "--budget-minutes)",
    )
    p.add_argument(
        "--schedule",
        choices=["cosine", "one-cycle", "wsd"],
        help="LR schedule (by recipe; wsd: warm-up, stable, linear decay over the last 20%%)",
    )
    p.add_argument(
        "--seq-warmup",
        type=float,
        default=None,
        help="fraction of --steps with short rows (0: off; fast recipe: 0.3)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--eval-every", type=int, default=0, help="validate every N steps (0: end)")
    p.add_argument(
        "--target-accuracy",
        type=float,
        default=None,
        help="stop once a --eval-every validation reaches this masked-token accuracy",
    )
    args = p.parse_args(argv)
    fast = args.recipe == "fast"
    if args.lr is None:
        args.lr = FAST_LR if fast else PLAIN_LR
    if args.schedule is None:
        # fast: warm-up-stable-decay reached the target on 4 seeds of 4 where cosine reached it
        # on 2 (README); one-cycle lost to cosine (time_to_accuracy.py).
        args.schedule = "wsd" if fast else "cosine"
    if args.seq_warmup is None:
        args.seq_warmup = 0.3 if fast else 0.0
    if args.schedule == "one-cycle" or args.seq_warmup > 0:
        args.budget_minutes = 0.0  # both schedules are laid out over exactly --steps
    return args


@torch.no_grad()
def evaluate(model, loader, stoker: Stoker, max_batches: int) -> tuple[float, float]:
    """Masked-token accuracy and mean loss on the validation split (all ranks' shards)."""
    model.eval()
    correct = counted = loss_sum = torch.zeros((), device=stoker.device)
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        logits = model(**model_inputs(batch))
        loss, n = mlm_loss(logits, batch["labels"])
        hits, total = mlm_accuracy(logits, batch["labels"])
        correct, counted, loss_sum = correct + hits, counted + total, loss_sum + loss * n
    model.train()
    correct, counted, loss_sum = (stoker.reduce(t, "sum") for t in (correct, counted, loss_sum))
    return (correct / counted).item(), (loss_sum / counted).item()


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    # FSDP warns that the encoder's logits are a view (an in-place op on them would skip its
    # backward hook); this loop never modifies them in place.
    warnings.filterwarnings("ignore", "FSDP2-wrapped module", UserWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    stoker = Stoker(
        device=args.device,
        precision=args.precision,
        compile=args.compile,
        accumulation_steps=args.accumulation_steps,
        seed=args.seed,
        config=args,
        checkpoint=CheckpointConfig(every_steps=args.checkpoint_every or None),
        strategy=args.strategy,
        activation_checkpointing=args.activation_checkpointing,
    )
    console = Console(stderr=True, quiet=not stoker.is_main)

    # Data: the stdlib source, split by file-path hash, tokenized once and cached.
    tokenizer = load_tokenizer(progress=stoker.is_main)
    vocab_size = tokenizer.get_vocab_size()
    train_docs = load_token_documents("train", tokenizer=tokenizer, progress=stoker.is_main)
    val_docs = load_token_documents("validation", tokenizer=tokenizer, progress=stoker.is_main)
    shape = {"vocab_size": vocab_size, "max_len": args.max_len, "batch_size": args.batch_size}
    seq_warmup = None
    if args.seq_warmup > 0:  # short rows first, full length after that fraction of the steps
        seq_warmup = SequenceLengthWarmup.from_fraction(args.seq_warmup, args.steps, start_len=32)
    train_loader = mlm_loader(
        train_docs,
        **shape,
        layout=args.layout,
        seed=args.seed,
        rank=stoker.rank,
        length_schedule=seq_warmup,
        num_workers=args.workers,
    )
    val_loader = mlm_loader(
        val_docs, **shape, layout=args.layout, shuffle=False, seed=1234, rank=stoker.rank
    )

    config = EncoderConfig.preset(args.preset, vocab_size=vocab_size, max_len=args.max_len)
    model = Encoder(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, fused=True)
    # How many steps: --steps, or fewer if they would not fit --budget-minutes at the speed of
    # the first steps (decided once, after CALIBRATE timed steps; kept in checkpoints so that a
    # resumed run follows the same schedule).
    plan = {"steps": args.steps, "decided": args.budget_minutes <= 0 or args.steps <= 2 * CALIBRATE}
    warmup = min(args.warmup, args.steps // 10)
    if args.schedule == "one-cycle":
        scheduler = one_cycle(optimizer, total_steps=args.steps)
    elif args.schedule == "wsd":
        scheduler = warmup_stable_decay(
            optimizer, warmup_steps=warmup, total_steps=lambda: plan["steps"]
        )
    else:
        scheduler = warmup_cosine(optimizer, warmup_steps=warmup, total_steps=lambda: plan["steps"])
    model, optimizer, train_loader, val_loader, scheduler = stoker.prepare(
        model, optimizer, train_loader, val_loader, scheduler=scheduler, state={"plan": plan}
    )
    console.print(
        f"stoker: {config.dim}x{config.layers} encoder ({model_size(stoker.unwrap(model))}), "
        f"{len(train_docs)} train documents, {stoker.settings}",
        soft_wrap=True,
    )

    # The loop. Loss and token counts stay on the device; the progress bar reads them every
    # --log-every steps (one host sync per interval, none per step).
    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[speed]} tok/s"),
        TextColumn("MFU {task.fields[mfu]}"),
        TimeRemainingColumn(),
        console=console,
        disable=not stoker.is_main,
    )
    loss_sum = predicted = tokens = torch.zeros((), device=stoker.device)
    ragged = TokenCounter()  # padding and rank imbalance, counted on the device
    seen = 0
    calibration: tuple[int, float] | None = None  # (step, time) the budget's timing starts at
    evals: list[tuple[int, float, float]] = []  # (step, training seconds so far, accuracy)
    eval_seconds = 0.0  # spent validating mid-training: not training time
    started = window_start = time.perf_counter()
    with progress:
        task = progress.add_task(
            "train", total=plan["steps"], completed=stoker.step, loss="-", speed="-", mfu="-"
        )
        while stoker.step < plan["steps"]:
            for batch in train_loader:
                with stoker.accumulate(model):
                    logits = model(**model_inputs(batch))
                    loss, n = mlm_loss(logits, batch["labels"])
                    stoker.backward(loss, tokens=n)
                    stoker.clip_grad_norm_(1.0)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                loss_sum, predicted = loss_sum + loss.detach() * n, predicted + n
                valid = batch["valid"].sum()
                tokens = tokens + valid
                if stoker.meters is not None:  # the meters' tokens/s: input tokens, not masked
                    stoker.meters.count_tokens(valid)
                ragged.update(batch)
                if not stoker.sync_gradients:
                    continue
                stoker.log({"loss": loss.detach(), "lr": scheduler.get_last_lr()[0]})
                progress.advance(task)
                if not plan["decided"]:  # steps 0-1 allocate and warm up: time from step 2
                    if calibration is None and stoker.step >= 2:
                        calibration = (stoker.step, time.perf_counter())
                    elif calibration is not None and stoker.step - calibration[0] >= CALIBRATE:
                        per_step = (time.perf_counter() - calibration[1]) / CALIBRATE
                        # every rank must decide the same: their mean (one collective, once)
                        timed = torch.tensor(per_step, device=stoker.device)
                        per_step = stoker.reduce(timed, "mean").item()
                        fit = int(60 * args.budget_minutes / per_step)
                        plan.update(steps=max(stoker.step, min(args.steps, fit)), decided=True)
                        progress.update(task, total=plan["steps"])
                        if plan["steps"] < args.steps:
                            console.print(
                                f"stoker: {1e3 * per_step:.0f} ms per step here: "
                                f"{plan['steps']} steps fit --budget-minutes "
                                f"{args.budget_minutes:g}"
                            )
                if stoker.step % args.log_every == 0 or stoker.step == plan["steps"]:
                    window_tokens = stoker.reduce(tokens, "sum").item()
                    seen += window_tokens
                    speed = window_tokens / (time.perf_counter() - window_start)
                    loss_avg = stoker.reduce(loss_sum, "sum") / stoker.reduce(predicted, "sum")
                    # tokens/s and MFU from stoker's meters once they have a window (the meters
                    # count the main rank's tokens: with several processes, all ranks' above)
                    meters = stoker.meters.read() if stoker.meters is not None else {}
                    if stoker.world_size == 1:
                        speed = meters.get("tokens_per_s", speed)
                    mfu = f"{meters['mfu']:.1%}" if "mfu" in meters else "-"
                    progress.update(
                        task, loss=f"{loss_avg.item():.3f}", speed=f"{speed:,.0f}", mfu=mfu
                    )
                    loss_sum = predicted = tokens = torch.zeros((), device=stoker.device)
                    window_start = time.perf_counter()
                if args.eval_every and stoker.step % args.eval_every == 0:
                    paused = time.perf_counter()
                    accuracy, _ = evaluate(model, val_loader, stoker, args.eval_batches)
                    evals.append((stoker.step, paused - started - eval_seconds, accuracy))
                    eval_seconds += time.perf_counter() - paused
                    window_start += time.perf_counter() - paused
                    if args.target_accuracy is not None and accuracy >= args.target_accuracy:
                        plan["steps"] = stoker.step  # reached: stop here
                if stoker.step >= plan["steps"]:
                    break
    train_seconds = time.perf_counter() - started - eval_seconds
    data = ragged.summary()
    stoker.log({"padding_fraction": data.padding_fraction, "rank_imbalance": data.imbalance})
    if stoker.doctor is not None:
        stoker.doctor.set_accounting(data)  # for its padding-waste / rank-imbalance rules

    accuracy, val_loss = evaluate(model, val_loader, stoker, args.eval_batches)
    baseline = unigram_baseline(train_docs, val_docs, vocab_size=vocab_size)
    results = {
        "steps": stoker.step,
        "train_seconds": train_seconds,
        "tokens_per_second": seen / train_seconds,
        "val_accuracy": accuracy,
        "val_loss": val_loss,
        "val_perplexity": math.exp(val_loss),
        "unigram_accuracy": baseline.accuracy,
        "unigram_loss": baseline.loss,
        "padding_fraction": data.padding_fraction,
        "evals": evals,
    }
    console.print(
        f"validation masked-token accuracy {accuracy:.1%} (loss {val_loss:.3f}) vs unigram "
        f"baseline {baseline.accuracy:.1%} (loss {baseline.loss:.3f}); "
        f"{stoker.step} steps in {train_seconds:.0f} s, {seen / train_seconds:,.0f} tokens/s, "
        f"{data.padding_fraction:.1%} padding",
        soft_wrap=True,
    )
    return results


def model_size(model: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters"


if __name__ == "__main__":
    main()
