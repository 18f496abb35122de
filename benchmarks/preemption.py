"""Preemption: time from the signal to the process exit with its checkpoint written, and what
handling preemption costs per step.

1. ``signal -> exit``: a training job (this script with ``--job``: the default MLM, the ``tiny``
   encoder at batch 32 x 128, or a ~100M-parameter encoder, ``base`` with a 16k vocabulary at
   batch 4 x 128; AdamW; ``precision="auto"``) runs a few steps, gets SIGTERM in the middle of a
   step, and the time until the process has exited is measured, against torchrun's default 30 s
   grace (the agent SIGKILLs its workers after it). Each sample is checked: the status is
   ``preempted`` and the checkpoint of the recorded step verifies. The save's own share comes
   from ``record.json`` (``checkpoint_seconds``). The job runs as a user's would (run record,
   end-of-run HTML report) except the doctor, whose profiling window would still be running.
2. ``per-step overhead``: the same MLM training step through a ``Stoker`` with
   ``preemption=False`` and with the default, interleaved in one process; then the same in a
   2-process gloo DDP job (``--nproc 2``; the ranks exchange through an async all-reduce about
   once a second of training). Two ranks on two cores make the ratio noisy, so the DDP part
   also gives a direct bound: the exchanges' own time in the loop (timed inside the listener)
   plus a whole synchronous round trip of the same all-reduce per exchange, as a share of the
   time in steps.
   Target: ratio <= 1.01.

    python benchmarks/preemption.py              # ~5-10 min on 2 cores
    python benchmarks/preemption.py --quick      # smoke test: a ~9M stand-in for the 100M model
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.table import Table

from stoker import Stoker
from stoker.bench import Bench, Candidate, bench_parser
from stoker.checkpoint import verify
from stoker.models import Encoder, EncoderConfig

TORCHRUN_GRACE_S = 30.0
TARGET_OVERHEAD = 1.01
SEQ = 128
MODELS = {  # name: (preset, vocab, batch)
    "default MLM (tiny)": ("tiny", 8192, 32),
    "~100M encoder (base)": ("base", 16384, 4),
}
QUICK_LARGE = ("small", 16384, 4)  # --quick: a stand-in for the 100M model


# -- the job (a child process) -------------------------------------------------------------------
def job(preset: str, vocab: int, batch: int) -> None:
    stoker = Stoker(precision="auto", seed=0, doctor=False)
    config = EncoderConfig.preset(preset, vocab_size=vocab, max_len=SEQ)
    model = Encoder(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer = stoker.prepare(model, optimizer)
    g = torch.Generator().manual_seed(0)
    while True:
        ids = torch.randint(0, vocab, (batch, SEQ), generator=g)
        labels = torch.where(torch.rand(ids.shape, generator=g) < 0.15, ids, -100)
        logits = model(ids)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        stoker.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"step {stoker.step} {time.perf_counter()}", flush=True)


def signal_to_exit(preset: str, vocab: int, batch: int, warm_steps: int) -> dict[str, float]:
    """One sample: start the job, SIGTERM it mid-step after ``warm_steps``, time the exit."""
    run_dir = Path(tempfile.mkdtemp(prefix="stoker-bench-preempt-")) / "run"
    env = {**os.environ, "STOKER_RUN_DIR": str(run_dir), "STOKER_DOCTOR": "0"}
    argv = [sys.executable, __file__, "--job", preset, str(vocab), str(batch)]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None
    times = []
    for line in proc.stdout:
        times.append(float(line.split()[2]))
        if len(times) == warm_steps:
            break
    else:
        raise SystemExit(f"the job ended before step {warm_steps}: {proc.stderr.read()[-2000:]}")  # type: ignore[union-attr]
    intervals = sorted(b - a for a, b in itertools.pairwise(times[1:]))  # not the first step
    step_s = intervals[len(intervals) // 2]
    time.sleep(step_s / 2)  # mid-step
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    exit_s = time.perf_counter() - t0
    record = json.loads((run_dir / "record.json").read_text())
    if proc.returncode != 143 or record.get("status") != "preempted":
        raise SystemExit(f"not preempted (exit {proc.returncode}): {err[-2000:]}")
    step = record["preempted"]["step"]
    checkpoint = run_dir / "checkpoints" / f"step-{step:08d}"
    verify(checkpoint)
    size = sum(f.stat().st_size for f in checkpoint.iterdir())
    return {
        "exit_s": exit_s,
        "save_s": float(record["checkpoint_seconds"]["seconds"]),
        "step_s": step_s,
        "bytes": float(size),
    }


# -- per-step overhead ---------------------------------------------------------------------------
def overhead(bench: Bench, quick: bool, label: str) -> tuple[Stoker, float]:
    """Interleaved: the MLM step through a Stoker without and with preemption handling.
    Returns the "on" Stoker and the seconds its steps took (warm-up rounds included)."""
    preset, vocab, batch = MODELS["default MLM (tiny)"]
    batch = 8 if quick else batch
    config = EncoderConfig.preset(preset, vocab_size=vocab, max_len=SEQ)
    g = torch.Generator().manual_seed(dist.get_rank() if dist.is_initialized() else 0)
    ids = torch.randint(0, vocab, (batch, SEQ), generator=g)
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.15, ids, -100)

    def make(preemption: bool):
        stoker = Stoker(
            device="cpu", precision="auto", record=False, doctor=False, preemption=preemption
        )
        torch.manual_seed(0)
        model = Encoder(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model, optimizer = stoker.prepare(model, optimizer)

        def step() -> None:
            logits = model(ids)
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
            stoker.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return stoker, step

    off, off_step = make(False)
    on, on_step = make(True)
    in_steps = 0.0  # the "on" candidate's time in its steps, warm-up rounds included

    def on_step_timed() -> None:
        nonlocal in_steps
        started = time.perf_counter()
        on_step()
        in_steps += time.perf_counter() - started

    bench.compare(
        f"per-step overhead, {label}",
        [Candidate("preemption off", off_step), Candidate("preemption on", on_step_timed)],
        baseline="preemption off",
        number=2 if quick else 5,  # explicit: every rank must run the same number of steps
    )
    on.close()
    off.close()
    return on, in_steps


def ddp_overhead(rank: int, world: int, port: int, args_json: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
    )
    os.environ.update(LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    args = json.loads(args_json)
    dist.init_process_group("gloo")
    from stoker.bench import BenchConfig

    config = BenchConfig(
        warmup=args["warmup"], repeats=args["repeats"], quick=args["quick"], out_dir=None
    )
    bench = Bench("preemption-ddp", config, quiet=rank != 0)
    on, in_steps = overhead(bench, args["quick"], f"{world}-process DDP (gloo, 1 thread each)")
    # The direct bound: what the exchanges cost the loop's thread (timed inside the listener),
    # plus, for the gloo thread's share, a whole synchronous round trip of the same all-reduce
    # per exchange (more than its asynchronous work: it includes waiting for the other rank).
    assert on.preemption is not None
    group = dist.new_group(backend="gloo")
    buffer = torch.zeros(2, dtype=torch.int64)
    trips = []
    for _ in range(200):
        started = time.perf_counter()
        dist.all_reduce(buffer, op=dist.ReduceOp.MAX, group=group)
        trips.append(time.perf_counter() - started)
    trip = sorted(trips)[len(trips) // 2]
    exchanges, loop_s = on.preemption.exchanges, on.preemption.exchange_seconds
    bench.meta["ddp_exchanges"] = {
        "exchanges": exchanges,
        "loop_seconds": loop_s,
        "round_trip_s": trip,
        "seconds_in_steps": in_steps,
        "loop_share": loop_s / in_steps,
        "bound_share": (loop_s + exchanges * trip) / in_steps,
    }
    if rank == 0:
        bench.save(out)
    dist.destroy_process_group()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--job":
        job(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = bench_parser(__doc__.splitlines()[0], repeats=11)
    parser.add_argument("--samples", type=int, default=None, help="signal->exit runs per model")
    parser.add_argument(
        "--nproc", type=int, default=2, help="processes of the DDP overhead (0: none)"
    )
    args = parser.parse_args()
    quick = args.quick
    bench = Bench.from_args("preemption", args)

    # 1. signal -> exit
    models = dict(MODELS)
    if quick:
        models.pop("~100M encoder (base)")
        models["~9M stand-in (small; --quick)"] = QUICK_LARGE
    samples = args.samples or (1 if quick else 3)
    table = Table(
        title=f"SIGTERM -> process exit with the checkpoint written ({samples} runs each)"
    )
    for column in [
        "model",
        "params",
        "checkpoint",
        "step",
        "save",
        "signal -> exit",
        "of 30 s grace",
    ]:
        table.add_column(column, justify="right")
    results = {}
    for name, (preset, vocab, batch) in models.items():
        params = Encoder(
            EncoderConfig.preset(preset, vocab_size=vocab, max_len=SEQ)
        ).num_parameters()
        runs = [signal_to_exit(preset, vocab, batch, warm_steps=6) for _ in range(samples)]
        exits = sorted(r["exit_s"] for r in runs)
        median = exits[len(exits) // 2]
        results[name] = {"params": params, "batch": batch, "runs": runs, "median_exit_s": median}
        table.add_row(
            name,
            f"{params / 1e6:.1f}M",
            f"{runs[0]['bytes'] / 1e9:.2f} GB",
            f"{sorted(r['step_s'] for r in runs)[len(runs) // 2]:.2f} s",
            f"{sorted(r['save_s'] for r in runs)[len(runs) // 2]:.2f} s",
            f"{median:.2f} s ({exits[0]:.2f}-{exits[-1]:.2f})",
            f"{100 * median / TORCHRUN_GRACE_S:.0f}%",
        )
    bench.meta["signal_to_exit"] = results
    if bench.console is not None:
        bench.console.print(table)

    # 2. per-step overhead: one process, then DDP
    overhead(bench, quick, "one process")
    if args.nproc > 1:
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = Path(tempfile.mkdtemp(prefix="stoker-bench-preempt-")) / "ddp.json"
        rounds = {"warmup": bench.config.warmup, "repeats": bench.config.repeats, "quick": quick}
        mp.spawn(
            ddp_overhead, args=(args.nproc, port, json.dumps(rounds), str(out)), nprocs=args.nproc
        )
        bench.include(out)
        bench.meta["ddp_exchanges"] = exchanges = json.loads(out.read_text())["meta"][
            "ddp_exchanges"
        ]
        if bench.console is not None:
            n = max(1, exchanges["exchanges"])
            bench.console.print(
                f"{args.nproc}-process DDP, rank 0: {exchanges['exchanges']} exchanges in "
                f"{exchanges['seconds_in_steps']:.0f} s of steps, "
                f"{1e6 * exchanges['loop_seconds'] / n:.0f} us each in the loop "
                f"({100 * exchanges['loop_share']:.3f}% of the step time); with a whole "
                f"synchronous round trip ({1e6 * exchanges['round_trip_s']:.0f} us) added per "
                f"exchange for the gloo thread's share: {100 * exchanges['bound_share']:.3f}% "
                f"(target <= {100 * (TARGET_OVERHEAD - 1):.0f}%)"
            )
    if bench.console is not None:
        for comparison in bench.comparisons:
            ratio = comparison["preemption on"].ratio
            verdict = "met" if ratio is not None and ratio <= TARGET_OVERHEAD else "NOT met"
            bench.console.print(
                f"{comparison.name}: preemption on / off = {ratio:.4f} (target <= "
                f"{TARGET_OVERHEAD}: {verdict})"
                + ("  [--quick: smoke test, not a result]" if quick else "")
            )
    bench.save()


if __name__ == "__main__":
    main()
