"""Machine instructions and simulated cache misses stoker adds to a small model's step, per part.

``overhead.py`` times the whole step, and on a shared 2-core machine it resolves about 2 µs.
This counts instead: the step runs under valgrind's callgrind, which executes the same code on
a simulated CPU and counts instructions and cache misses exactly, with no noise from the
neighbours. Counts are not time (a miss to memory costs more than a hit), but a part of the
step that adds no instructions and no misses adds no time, and what does shows here.

On ``overhead.py``'s MLP (64-128-10, batch 32, fused AdamW, fp32), one process:

- ``raw``: plain PyTorch; ``raw#2``: an identical copy, the noise floor of the counts;
- ``forward``: only the forward through the prepared model;
- ``backward``: only ``stoker.backward(loss)``;
- ``optimizer``: only the prepared optimizer's ``step()``/``zero_grad()``;
- ``stoker``: all three (``record``, ``meters`` and ``preemption`` off: what is left is the
  step owner and the wrappers).

Each variant has its own model and optimizer; after a warm-up, each runs ``--steps`` steps per
round, in turn, for ``--repeats`` rounds, with the cycle collector off; the table gives each
variant's per-step counts (the median over rounds) and their difference from ``raw``. Needs
valgrind and a C compiler (Debian: ``apt-get install valgrind gcc``); ~3 min on a 2-core Zen 3.

    python benchmarks/step_instructions.py
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

# The client requests callgrind answers to (valgrind/callgrind.h's macros, as functions).
_CONTROL_C = """
#include <valgrind/callgrind.h>
void start(void) { CALLGRIND_START_INSTRUMENTATION; }
void stop(void) { CALLGRIND_STOP_INSTRUMENTATION; }
void zero(void) { CALLGRIND_ZERO_STATS; }
void dump(const char *label) { CALLGRIND_DUMP_STATS_AT(label); }
"""
# Zen 3's L1 caches and L2 (callgrind simulates two levels; "LL" here is the 512 KiB L2).
_CACHES = ["--I1=32768,8,64", "--D1=32768,8,64", "--LL=524288,8,64"]
_EVENTS = {
    "Ir": "instructions",
    "I1mr": "L1i misses",
    "D1mr": "L1d read misses",
    "D1mw": "L1d write misses",
    "ILmr": "L2 instr misses",
    "DLmr": "L2 read misses",
    "DLmw": "L2 write misses",
}
VARIANTS = ("raw", "raw#2", "forward", "backward", "optimizer", "stoker")


def _steps() -> dict[str, Callable[[], None]]:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from stoker import Stoker

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))

    def make(forward: bool, backward: bool, optimizer: bool) -> Callable[[], None]:
        user = copy.deepcopy(base)
        opt = torch.optim.AdamW(user.parameters(), lr=2e-3, weight_decay=0.01, fused=True)
        stoker = Stoker(device="cpu", doctor=False, record=False, meters=False, preemption=False)
        model, prepared = stoker.prepare(user, opt)
        fwd = model if forward else user
        step_opt = prepared if optimizer else opt

        def step() -> None:
            loss = F.cross_entropy(fwd(x), y)
            if backward:
                stoker.backward(loss)
            else:
                loss.backward()
            step_opt.step()
            step_opt.zero_grad()

        return step

    parts = {
        "raw": (False, False, False),
        "raw#2": (False, False, False),
        "forward": (True, False, False),
        "backward": (False, True, False),
        "optimizer": (False, False, True),
        "stoker": (True, True, True),
    }
    return {name: make(*flags) for name, flags in parts.items()}


def child(args: argparse.Namespace) -> None:
    """Under callgrind: run the variants, one dump per variant and round."""
    import torch

    torch.set_num_threads(1)
    control = ctypes.CDLL(args.child)
    steps = _steps()
    for fn in steps.values():
        for _ in range(args.warmup):
            fn()
    gc.collect()
    gc.disable()  # a collection lands in whichever variant crosses its threshold
    control.start()
    for fn in steps.values():  # instrumentation on: its first steps warm the simulated caches
        for _ in range(3):
            fn()
    for r in range(args.repeats):
        for name, fn in steps.items():
            control.zero()
            for _ in range(args.steps):
                fn()
            control.dump(f"{name}|{r}".encode())
    control.stop()


def _totals(path: Path) -> tuple[str, dict[str, int]] | None:
    label, events, totals = None, None, None
    with path.open(errors="replace") as f:
        for line in f:
            if line.startswith("desc: Trigger: Client Request: "):
                label = line.split(": ", 3)[-1].strip()
            elif line.startswith("events:"):
                events = line.split()[1:]
            elif line.startswith(("totals:", "summary:")):
                totals = [int(v) for v in line.split()[1:]]
    if label is None or events is None or totals is None:
        return None
    return label, dict(zip(events, totals, strict=False))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="steps per variant and round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds (%(default)s)")
    parser.add_argument("--warmup", type=int, default=60, help="steps before counting")
    parser.add_argument("--out", default=None, help="write the per-step counts as JSON here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    missing = [tool for tool in ("valgrind", "cc") if shutil.which(tool) is None]
    if missing or not Path("/usr/include/valgrind/callgrind.h").exists():
        print(
            "step_instructions.py needs valgrind, its headers and a C compiler "
            f"(missing: {', '.join(missing) or 'valgrind/callgrind.h'}); "
            "on Debian: apt-get install valgrind gcc",
            file=sys.stderr,
        )
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        source, library = Path(tmp) / "control.c", Path(tmp) / "control.so"
        source.write_text(_CONTROL_C)
        subprocess.run(["cc", "-O1", "-shared", "-fPIC", "-o", library, source], check=True)
        out = Path(tmp) / "callgrind.out"
        cmd = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no", "--cache-sim=yes",
            *_CACHES, f"--callgrind-out-file={out}", sys.executable, __file__,
            "--child", str(library), "--steps", str(args.steps),
            "--repeats", str(args.repeats), "--warmup", str(args.warmup),
        ]  # fmt: skip
        print(f"counting under callgrind ({len(VARIANTS)} variants x {args.repeats} rounds)...")
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            return done.returncode
        rounds: dict[str, list[dict[str, int]]] = {name: [] for name in VARIANTS}
        for path in sorted(Path(tmp).glob("callgrind.out.*")):
            found = _totals(path)
            if found is not None:
                rounds[found[0].split("|")[0]].append(found[1])
    per_step = {
        name: {e: statistics.median(r[e] for r in runs) / args.steps for e in _EVENTS}
        for name, runs in rounds.items()
    }
    _print(per_step)
    if args.out:
        Path(args.out).write_text(json.dumps({"steps": args.steps, "per_step": per_step}))
    return 0


def _print(per_step: dict[str, dict[str, float]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="per step: raw's counts; every other row, its difference from raw")
    table.add_column("variant")
    for label in _EVENTS.values():
        table.add_column(label, justify="right")
    raw = per_step["raw"]
    for name, counts in per_step.items():
        cells = [
            f"{counts[e]:,.0f}" if name == "raw" else f"{counts[e] - raw[e]:+,.0f}" for e in _EVENTS
        ]
        table.add_row(name, *cells)
    Console(width=max(Console().width, 110)).print(table)


if __name__ == "__main__":
    sys.exit(main())
