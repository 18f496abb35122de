"""Checkpoint save / load throughput and the time the training loop is blocked per checkpoint.

The state is a ~100M-parameter model (24 x Linear(2048, 2048), fp32) with its AdamW state
(exp_avg, exp_avg_sq): about 1.2 GB per checkpoint. Comparisons, interleaved per round:

- ``save``: ``stoker.checkpoint.save`` (synchronous: write + SHA-256 + fsync + atomic rename)
  against ``Checkpointer(async_save=True).save`` — the time until it returns, i.e. the copy
  of the state into reused host buffers; the background write is then waited for *outside*
  the measured time. Target: async blocked time <= 10% of a synchronous save.
- ``load``: ``load`` with checksum verification, without, and ``verify`` alone, from a
  checkpoint just written (warm page cache: this measures stoker's code, not the disk).
- ``loop cost``: N training steps alone against an async checkpoint + the same N steps while
  it writes in the background: the difference is everything a checkpoint costs the loop,
  including the writer's competition for the cores (on 2 cores it is not free).

The clock of this bench excludes cleanup (deleting the previous checkpoint) and waiting for
background writes; everything else a candidate does is timed.

    python benchmarks/checkpoint.py              # ~2-4 min on 2 cores, writes ~20 GB in total
    python benchmarks/checkpoint.py --quick      # 12M parameters, smoke test
    python benchmarks/checkpoint.py --dir /fast/disk
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from rich.table import Table

from stoker.bench import Bench, BenchConfig, Candidate, bench_parser
from stoker.checkpoint import CheckpointConfig, Checkpointer, load, save, verify

TARGET_ASYNC_BLOCKED = 0.10  # async blocked time / sync save time

_excluded = [0.0]


def clock() -> float:
    """perf_counter minus the time spent inside ``excluded()`` blocks."""
    return time.perf_counter() - _excluded[0]


@contextlib.contextmanager
def excluded() -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _excluded[0] += time.perf_counter() - t0


def build(width: int, layers: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_step(model, opt, width)  # creates the AdamW state
    return model, opt


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, width: int) -> None:
    x = torch.randn(8, width)
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir())


def main() -> None:
    parser = bench_parser(__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    parser.add_argument("--steps", type=int, default=None, help="training steps in 'loop cost'")
    args = parser.parse_args()
    width, layers = (1024, 12) if args.quick else (2048, 24)
    # Each round writes ~5 checkpoints of 1.2 GB: fewer rounds than the harness default.
    if args.repeats is None and not args.quick:
        args.repeats = 5
    if args.warmup is None:
        args.warmup = 1
    config = BenchConfig.from_args(args)
    model, opt = build(width, layers)
    params = sum(p.numel() for p in model.parameters())
    state = {"model": model, "optimizer": opt, "step": 0}
    root = Path(args.dir or tempfile.mkdtemp(prefix="stoker-bench-checkpoint-"))
    root.mkdir(parents=True, exist_ok=True)

    probe = save(root / "probe", state)
    nbytes = checkpoint_bytes(probe)
    # Training steps in "loop cost": about as long as one synchronous save.
    t0 = time.perf_counter()
    save(root / "probe", state)
    sync_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(3):
        train_step(model, opt, width)
    step_s = (time.perf_counter() - t0) / 3
    steps = args.steps or max(2, round(sync_s / step_s))

    bench = Bench(
        "checkpoint",
        config,
        meta={
            "parameters": params,
            "checkpoint_bytes": nbytes,
            "model": f"{layers} x Linear({width}, {width}) fp32 + AdamW state",
            "directory": str(root),
            "loop_cost_steps": steps,
            "train_step_s": step_s,
        },
        clock=clock,
    )

    counter = [0]
    last_sync: list[Path] = []

    def sync_save() -> None:
        with excluded():
            for p in last_sync:
                shutil.rmtree(p, ignore_errors=True)
            last_sync.clear()
            counter[0] += 1
        last_sync.append(save(root / "sync" / f"step-{counter[0]:08d}", state))

    ckpt = Checkpointer(root / "async", CheckpointConfig(async_save=True, keep_last=1))

    def async_save() -> None:
        counter[0] += 1
        ckpt.save(counter[0], state)
        with excluded():
            ckpt.wait()

    bench.compare(
        f"save ({nbytes / 1e9:.2f} GB, {params / 1e6:.0f}M params + AdamW)",
        [
            Candidate("sync save", sync_save, work=nbytes),
            Candidate("async save: loop blocked", async_save),
        ],
        baseline="sync save",
        unit="byte",
    )

    loaded = save(root / "load-source", state)

    def load_verified() -> None:
        load(loaded, state)

    def load_unverified() -> None:
        load(loaded, state, verify_checksums=False)

    def verify_only() -> None:
        verify(loaded)

    bench.compare(
        "load (warm page cache)",
        [
            Candidate("load + verify", load_verified, work=nbytes),
            Candidate("load, no verify", load_unverified, work=nbytes),
            Candidate("verify only", verify_only, work=nbytes),
        ],
        baseline="load + verify",
        unit="byte",
    )

    def train_only() -> None:
        for _ in range(steps):
            train_step(model, opt, width)

    def train_while_saving() -> None:
        counter[0] += 1
        ckpt.save(counter[0], state)
        for _ in range(steps):
            train_step(model, opt, width)
        with excluded():
            ckpt.wait()

    bench.compare(
        f"loop cost: {steps} training steps",
        [
            Candidate("train", train_only),
            Candidate("async checkpoint + train", train_while_saving),
        ],
        baseline="train",
    )
    ckpt.close()

    save_cmp, load_cmp, loop_cmp = bench.comparisons[-3:]
    sync_t = save_cmp["sync save"].median_s
    blocked_t = save_cmp["async save: loop blocked"].median_s
    ratio = save_cmp["async save: loop blocked"].ratio
    loop_extra = loop_cmp["async checkpoint + train"].median_s - loop_cmp["train"].median_s
    summary = Table(title="checkpoint: summary (medians)", title_justify="left")
    summary.add_column("measure")
    summary.add_column("value", justify="right")
    summary.add_row("checkpoint size", f"{nbytes / 1e9:.2f} GB ({params / 1e6:.1f}M params)")
    summary.add_row("sync save throughput", f"{nbytes / sync_t / 1e9:.2f} GB/s ({sync_t:.2f} s)")
    load_t = load_cmp["load + verify"].median_s
    load_rate = f"{nbytes / load_t / 1e9:.2f} GB/s ({load_t:.2f} s)"
    summary.add_row("load + verify throughput", load_rate)
    summary.add_row("loop blocked, sync save", f"{sync_t:.3f} s")
    summary.add_row("loop blocked, async save", f"{blocked_t:.3f} s")
    verdict = "meets" if ratio <= TARGET_ASYNC_BLOCKED else "MISSES"
    summary.add_row(
        "async / sync blocked time",
        f"{ratio:.3f} ({verdict} the <= {TARGET_ASYNC_BLOCKED:.2f} target)",
    )
    summary.add_row(
        f"loop slowdown over {steps} steps while writing",
        f"{loop_extra:.3f} s ({loop_extra / sync_t:.2f} x a sync save)",
    )
    bench.meta.update(
        async_blocked_ratio=ratio,
        sync_save_gb_s=nbytes / sync_t / 1e9,
        load_verify_gb_s=nbytes / load_t / 1e9,
        async_loop_cost_s=loop_extra,
    )
    if bench.console is not None:
        bench.console.print(summary)
    bench.save()
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
