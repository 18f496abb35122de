"""FSDP2 against DDP at 2 processes: memory held per process, step time, the largest model a
memory budget trains, and what activation checkpointing costs.

Everything runs the default MLM step (the ``Encoder``, synthetic full rows, 15% of positions
predicted, AdamW) on 2 processes (torchrun, gloo, CPU), each process on its own batch:

- ``state bytes``: per process, the bytes of parameters, gradients and optimizer state,
  *measured* from the tensors' local storage after a step (DTensor shards' local tensors,
  each storage counted once: DDP runs with ``gradient_as_bucket_view=True``, so its
  gradients are views of its all-reduce buckets and counted there). Expect FSDP ~ 1/2 of DDP.
- ``step``: time per training step of ``ddp``, ``ddp+ac``, ``fsdp``, ``fsdp+ac`` (``+ac`` =
  activation checkpointing of every block), interleaved in the same processes; the ratios
  ``fsdp/ddp`` and ``+ac/without`` are the claims.
- ``fit``: for ``ddp``, ``fsdp``, ``fsdp+ac``, the largest ``EncoderConfig`` width (dim; ffn
  4 x dim, heads of 64) whose training (a few steps) keeps each process's peak RSS
  (``ru_maxrss``: the whole process, torch and gloo included) under ``--budget-mb``. Each trial
  is a fresh pair of processes; widths double until one does not fit, then bisect. FSDP
  models are built on the meta device and materialised shard by shard, so no process ever
  holds the whole model.

    python benchmarks/shard.py                        # ~15-30 min on 2 cores
    python benchmarks/shard.py --budget-mb 3000 --layers 8
    python benchmarks/shard.py --quick                # smoke test, ~2-3 min: numbers not claims
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from stoker.bench import Bench, Candidate, Comparison, bench_parser, summarize

STRATEGIES = ("ddp", "ddp+ac", "fsdp", "fsdp+ac")
FIT_STRATEGIES = ("ddp", "fsdp", "fsdp+ac")


# ------------------------------------------------------------------- one process of the pair


def mlm_batch(args: Any, rank: int) -> dict[str, Tensor]:
    from stoker.data.mlm import mask_tokens

    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(8, args.vocab, (args.batch, args.seq), generator=g)  # [B, T]
    valid = torch.ones_like(ids, dtype=torch.bool)
    masked, positions, labels = mask_tokens(ids, valid, vocab_size=args.vocab, generator=g)
    return {"input_ids": masked, "positions": positions, "labels": labels}


def build(args: Any, strategy: str, width: int, base: nn.Module | None = None) -> nn.Module:
    """The encoder of this width under ``strategy``; FSDP models start on the meta device."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    from stoker.models import Encoder, EncoderConfig
    from stoker.runtime.sharding import activation_checkpointing, shard_model

    cfg = EncoderConfig(
        vocab_size=args.vocab,
        max_len=args.seq,
        dim=width,
        layers=args.layers,
        heads=max(1, width // 64),
        ffn_dim=4 * width,
    )
    sharded = strategy.startswith("fsdp")
    if base is not None:
        model = copy.deepcopy(base)
    elif sharded:
        with torch.device("meta"):
            model = Encoder(cfg)
    else:
        model = Encoder(cfg)
    if strategy.endswith("+ac"):
        activation_checkpointing(model)
    if not sharded:
        return DistributedDataParallel(model, gradient_as_bucket_view=True)
    shard_model(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    if base is None:  # materialise this process's shards only, then initialise them
        model.to_empty(device="cpu")
        with torch.no_grad():
            for module in model.modules():
                if module is not model and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            model.out_bias.zero_()  # type: ignore[operator]
    return model


def make_step(model: nn.Module, batch: dict[str, Tensor]) -> Callable[[], None]:
    from stoker.data.mlm import mlm_loss

    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)

    def step() -> None:
        logits = model(batch["input_ids"], predict_positions=batch["positions"])
        mlm_loss(logits, batch["labels"])[0].backward()
        optimizer.step()
        optimizer.zero_grad()

    step.optimizer = optimizer  # type: ignore[attr-defined]
    return step


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the storages behind this process's parameters, gradients and optimizer state.

    Each storage is counted once, whole (an FSDP shard's padding, a DDP bucket), in the first
    category that reaches it.
    """
    seen: set[int] = set()

    def nbytes(t: Tensor | None) -> int:
        if t is None:
            return 0
        local = t.to_local() if isinstance(t, DTensor) else t
        storage = local.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()

    params = list(model.parameters())
    out = {
        "params": sum(nbytes(p) for p in params),
        "grads": sum(nbytes(p.grad) for p in params),
        "optimizer": sum(
            nbytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)
        ),
    }
    out["total"] = sum(out.values())
    return out


def child_step(args: Any) -> None:
    """Memory accounting, then the interleaved step-time comparison; rank 0 writes JSON."""
    from stoker.data.mlm import mlm_loss
    from stoker.models import Encoder, EncoderConfig

    rank = dist.get_rank()
    batch = mlm_batch(args, rank)
    torch.manual_seed(0)
    cfg = EncoderConfig.preset(args.preset, vocab_size=args.vocab, max_len=args.seq)
    base = Encoder(cfg)
    steps = {s: make_step(build(args, s, cfg.dim, base), batch) for s in STRATEGIES}
    memory: dict[str, Any] = {}
    for name in ("ddp", "fsdp"):
        model = build(args, name, cfg.dim, base)  # a fresh copy: its gradients are kept
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
        logits = model(batch["input_ids"], predict_positions=batch["positions"])
        mlm_loss(logits, batch["labels"])[0].backward()
        optimizer.step()  # the optimizer state exists now; gradients are not zeroed
        memory[name] = state_bytes(model, optimizer)
        del model, optimizer
    bench = Bench.from_args("shard", args, meta={"state_bytes": memory})
    if rank != 0:
        bench.console = None
    tokens = args.batch * args.seq * dist.get_world_size()  # per step, both processes
    # number=1 and fixed rounds: both processes run the same calls in the same order.
    bench.compare(
        f"step ({args.preset}, 2 processes)",
        [Candidate(name, steps[name], work=tokens) for name in STRATEGIES],
        baseline="ddp",
        unit="tokens",
    )
    if rank == 0:
        bench.save(args.child_json)


def child_fit(args: Any) -> None:
    """A few steps at ``--width``; rank 0 writes every process's peak RSS (MB)."""
    model = build(args, args.strategy, args.width)
    step = make_step(model, mlm_batch(args, dist.get_rank()))
    for _ in range(args.fit_steps):
        step()
    peak = torch.tensor(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)  # KB->MB
    peaks = [torch.zeros(()) for _ in range(dist.get_world_size())]
    dist.all_gather(peaks, peak)
    if dist.get_rank() == 0:
        # numel of a DTensor is its global size: the model's size under every strategy.
        params = sum(p.numel() for p in model.parameters())
        result = {"peak_rss_mb": [float(p) for p in peaks], "parameters": params}
        Path(args.child_json).write_text(json.dumps(result))


# --------------------------------------------------------------------------- the launcher


def torchrun(args: Any, extra: list[str], out: Path) -> dict[str, Any] | None:
    """Runs this script as a pair of processes; their JSON, or None if they failed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += [__file__, *forwarded(args), *extra, "--child-json", str(out)]
    out.unlink(missing_ok=True)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.trial_timeout)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        # torch 2.13's gloo sometimes aborts a process at interpreter exit ("terminate called
        # without an active exception", ~1 run in 10 here, DDP as FSDP): the result, written
        # by rank 0 after every rank's steps, stands.
        if out.exists() and "terminate called without an active exception" in done.stderr:
            print(f"  trial {' '.join(extra)}: a process aborted at exit, after its result")
            return json.loads(out.read_text())
        print(f"  trial {' '.join(extra)} failed: {' | '.join(tail)}")
        return None
    return json.loads(out.read_text())


def forwarded(args: Any) -> list[str]:
    out = ["--vocab", str(args.vocab), "--seq", str(args.seq), "--batch", str(args.batch)]
    out += ["--layers", str(args.layers), "--preset", args.preset, "--clock", args.clock]
    out += ["--fit-steps", str(args.fit_steps)]
    if args.quick:
        out.append("--quick")
    for name in ("warmup", "repeats"):
        if getattr(args, name) is not None:
            out += [f"--{name}", str(getattr(args, name))]
    return out


def largest_fit(args: Any, strategy: str, tmp: Path) -> dict[str, Any]:
    """Doubling then bisection over widths that are multiples of ``--width-step``."""
    trials: dict[int, dict[str, Any] | None] = {}

    def fits(width: int) -> bool:
        out = tmp / f"fit-{strategy}-{width}.json"
        extra = ["--child", "fit", "--strategy", strategy, "--width", str(width)]
        result = torchrun(args, extra, out)
        trials[width] = result
        ok = result is not None and max(result["peak_rss_mb"]) <= args.budget_mb
        peak = "failed" if result is None else f"{max(result['peak_rss_mb']):.0f} MB"
        print(f"  {strategy:8s} width {width:5d}: peak RSS {peak} -> {'fits' if ok else 'no'}")
        return ok

    unit, lo, hi = args.width_step, 0, None  # lo fits (0 = none yet), hi does not
    width = unit
    while hi is None and width <= args.max_width:
        if fits(width):
            lo, width = width, width * 2
        else:
            hi = width
    if hi is None:
        hi = min(width, args.max_width + unit)
    while hi - lo > unit and len(trials) < args.max_trials:
        mid = (lo + hi) // 2 // unit * unit
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    best = trials.get(lo) or {}
    return {
        "width": lo,
        "parameters": best.get("parameters", 0),
        "peak_rss_mb": max(best.get("peak_rss_mb", [0.0])),
        "capped": lo >= args.max_width,
        "trials": {str(w): r for w, r in sorted(trials.items())},
    }


def _paired(comp: Comparison, a: str, b: str) -> str:
    s = summarize(x / y for x, y in zip(comp[a].seconds, comp[b].seconds, strict=True))
    return f"{s.median:.3f} ({s.median_lo:.3f}-{s.median_hi:.3f})"


def report(bench: Bench, fits: dict[str, Any], args: Any) -> None:
    console = bench.console or Console()
    memory = bench.meta["state_bytes"]
    table = Table(title="state bytes per process (measured from local storages), 2 processes")
    for col in ("strategy", "params", "grads", "optimizer", "total", "/ ddp"):
        table.add_column(col, justify="right")
    for name, m in memory.items():
        ratio = m["total"] / memory["ddp"]["total"]
        cells = [f"{m[k] / 2**20:.2f} MiB" for k in ("params", "grads", "optimizer", "total")]
        table.add_row(name, *cells, f"{ratio:.3f}")
    console.print(table)

    comp = bench.comparisons[0]
    console.print(bench.table(comp))
    table = Table(title="step time ratios (median of same-round ratios, 95% CI)")
    for col in ("fsdp / ddp", "ddp+ac / ddp", "fsdp+ac / fsdp"):
        table.add_column(col, justify="right")
    table.add_row(
        _paired(comp, "fsdp", "ddp"),
        _paired(comp, "ddp+ac", "ddp"),
        _paired(comp, "fsdp+ac", "fsdp"),
    )
    console.print(table)

    if fits:
        table = Table(
            title=f"largest width that trains under {args.budget_mb} MB peak RSS per process "
            f"({args.layers} layers, batch {args.batch} x {args.seq} per process)"
        )
        for col in ("strategy", "width", "parameters", "peak RSS", "params / ddp"):
            table.add_column(col, justify="right")
        base = fits["ddp"]["parameters"] or 1
        for name, f in fits.items():
            width = f"{f['width']}" + (" (cap)" if f["capped"] else "")
            table.add_row(
                name,
                width,
                f"{f['parameters'] / 1e6:.2f} M",
                f"{f['peak_rss_mb']:.0f} MB",
                f"{f['parameters'] / base:.2f}",
            )
        console.print(table)


def main() -> int:
    parser = bench_parser(__doc__.splitlines()[0], warmup=2, repeats=10)
    parser.add_argument("--preset", default="tiny", help="encoder for the step time (%(default)s)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (128)")
    parser.add_argument("--batch", type=int, default=None, help="rows per process (32)")
    parser.add_argument("--layers", type=int, default=None, help="layers in the fit search (8)")
    parser.add_argument("--budget-mb", type=float, default=None, help="per process (2000)")
    parser.add_argument("--width-step", type=int, default=None, help="width grid (64)")
    parser.add_argument("--max-width", type=int, default=None, help="search cap (4096)")
    parser.add_argument("--max-trials", type=int, default=12, help="per strategy")
    parser.add_argument("--fit-steps", type=int, default=3)
    parser.add_argument("--no-fit", action="store_true", help="skip the budget search")
    parser.add_argument("--trial-timeout", type=float, default=900.0, help="seconds")
    parser.add_argument("--child", choices=("step", "fit"), help=argparse.SUPPRESS)
    parser.add_argument("--child-json", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", choices=STRATEGIES, help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    quick = args.quick
    args.seq = args.seq or (32 if quick else 128)
    args.batch = args.batch or (4 if quick else 32)
    args.layers = args.layers or (2 if quick else 8)
    args.budget_mb = args.budget_mb or (700.0 if quick else 2000.0)
    args.width_step = args.width_step or (32 if quick else 64)
    args.max_width = args.max_width or (64 if quick else 4096)
    if quick:
        args.vocab = min(args.vocab, 1024)

    if args.child:
        dist.init_process_group("gloo")
        try:
            (child_step if args.child == "step" else child_fit)(args)
        finally:
            dist.destroy_process_group()
        return 0

    meta = {k: getattr(args, k) for k in ("preset", "vocab", "seq", "batch", "layers")}
    meta |= {"budget_mb": args.budget_mb, "processes": 2, "backend": "gloo"}
    bench = Bench.from_args("shard", args, meta=meta)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "step.json"
        if torchrun(args, ["--child", "step"], out) is None:
            return 1
        bench.include(out)
        bench.meta["state_bytes"] = json.loads(out.read_text())["meta"]["state_bytes"]
        fits = {}
        if not args.no_fit:
            for strategy in FIT_STRATEGIES:
                fits[strategy] = largest_fit(args, strategy, Path(tmp))
        bench.meta["fit"] = fits
    report(bench, fits, args)
    bench.save()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
