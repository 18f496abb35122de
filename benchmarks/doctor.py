"""Doctor overhead: step time with the doctor attached, outside and inside its profiled window.

Three comparisons against the same loop without the doctor (a 256-2048-256 MLP, bf16 autocast,
fused AdamW, batches from a DataLoader, so every always-on listener is exercised):

- ``outside``: the doctor attached after its window finished — what every step of a run pays
  (target <= 1 %). Each sample also pays one attach/detach, so this is an upper bound;
- ``window``: one complete profiled window of 5 steps, including starting and stopping
  torch.profiler and summarising its events, per step;
- ``window + attribution``: the same plus the 2 steps after it that run under the call-site
  recorder: the whole cost of a doctor run, per step, probes excluded.

Then the rules' accuracy: for planted problems whose clean twin applies exactly the suggested
fix (tests/doctor/planted/), the saving a rule estimated against the step time measured with the
fix applied (unprofiled warm-up steps of both scripts, median of ``--accuracy-rounds`` runs).

    python benchmarks/doctor.py            # full run
    python benchmarks/doctor.py --quick    # smoke test
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from stoker.bench import Bench, Candidate, bench_parser
from stoker.doctor import Doctor, DoctorConfig, diagnose_script

parser = bench_parser("Doctor overhead inside and outside its profiled window.", repeats=15)
parser.add_argument("--batch", type=int, default=256)
parser.add_argument("--steps", type=int, default=20, help="steps per sample outside the window")
parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
parser.add_argument("--accuracy-rounds", type=int, default=3, help="0 skips the accuracy table")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)
steps = 5 if args.quick else args.steps
bench = Bench.from_args(
    "doctor",
    args,
    meta={"batch": args.batch, "steps_per_sample": steps, "threads": torch.get_num_threads()},
)

torch.manual_seed(0)
data = TensorDataset(torch.randn(64 * args.batch, 256), torch.randn(64 * args.batch, 256))
loader = DataLoader(
    data, sampler=BatchSampler(RandomSampler(data), args.batch, True), batch_size=None
)
model = nn.Sequential(nn.Linear(256, 2048), nn.GELU(), nn.Linear(2048, 256))
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
batches = iter(())


def train(n: int) -> None:
    global batches
    for _ in range(n):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.mse_loss(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()


# A doctor that has finished its window: attaching it again only adds the listeners.
finished = Doctor(DoctorConfig(warmup_steps=1, window_steps=2, attribution_steps=1, probes=False))
finished.attach()
train(4)
finished.detach()
assert finished.done


def outside() -> None:
    finished.attach()
    try:
        train(steps)
    finally:
        finished.detach()


def run_doctor(window: int, attribution: int) -> None:
    doctor = Doctor(
        DoctorConfig(
            warmup_steps=0, window_steps=window, attribution_steps=attribution, probes=False
        )
    ).attach()
    try:
        train(window + attribution)
    finally:
        doctor.detach()


WINDOW, ATTRIBUTION = 5, 2
bench.compare(
    "outside the window",
    [
        Candidate("plain", lambda: train(steps), work=steps),
        Candidate("doctor attached", outside, work=steps),
    ],
    baseline="plain",
    unit="steps",
)
bench.compare(
    "profiled window",
    [
        Candidate("plain", lambda: train(WINDOW), work=WINDOW),
        Candidate("doctor window", lambda: run_doctor(WINDOW, 0), work=WINDOW),
    ],
    baseline="plain",
    unit="steps",
)
TOTAL = WINDOW + ATTRIBUTION
bench.compare(
    "window + attribution",
    [
        Candidate("plain", lambda: train(TOTAL), work=TOTAL),
        Candidate("doctor window+attribution", lambda: run_doctor(WINDOW, ATTRIBUTION), work=TOTAL),
    ],
    baseline="plain",
    unit="steps",
)

# --- accuracy: estimated saving vs the saving measured with the fix applied ------------------
PLANTED = Path(__file__).resolve().parent.parent / "tests" / "doctor" / "planted"
# recompiles is left out: its planted script compiles during the warm-up steps these step
# times come from, while the doctor's estimate is about the steady state of its window.
TWIN_IS_THE_FIX = (
    "fp32_matmul",
    "unfused_optimizer",
    "many_small_ops",
    "grad_zeroing",
    "eval_without_no_grad",
    "cpu_threads",
)
rounds = 1 if args.quick else args.accuracy_rounds
threads = torch.get_num_threads()
config = DoctorConfig(warmup_steps=8, window_steps=3, attribution_steps=2, stop_after_window=True)
rows = []
for name in TWIN_IS_THE_FIX if rounds else ():
    code = name.replace("_", "-")
    estimates, savings, bad_ms, clean_ms = [], [], [], []
    fired = 0
    for _ in range(rounds):
        bad = diagnose_script(PLANTED / f"{name}.py", [], config)
        if name == "cpu_threads":  # the fix is the default thread count, whatever --threads
            torch.set_num_threads(len(os.sched_getaffinity(0)))
        clean = diagnose_script(PLANTED / f"{name}.py", ["--clean"], config)
        torch.set_num_threads(threads)
        found = [f for f in bad.findings if f.code == code]
        fired += bool(found)
        estimates.append(max((f.share or 0.0) for f in found) if found else 0.0)
        b, c = bad.summary["unprofiled_step_ms"], clean.summary["unprofiled_step_ms"]
        bad_ms.append(b)
        clean_ms.append(c)
        savings.append(1 - c / b)
    rows.append(
        {
            "code": code,
            "fired": fired,
            "estimated_saving": statistics.median(estimates),
            "measured_saving": statistics.median(savings),
            "step_ms_planted": statistics.median(bad_ms),
            "step_ms_fixed": statistics.median(clean_ms),
        }
    )
if rows:
    table = Table(
        title=f"doctor: estimated vs measured saving ({rounds} runs, medians, "
        f"{torch.get_num_threads()} threads)"
    )
    for col in ("code", "fired", "estimated", "measured (fix applied)", "planted ms", "fixed ms"):
        table.add_column(col, justify="left" if col == "code" else "right")
    for r in rows:
        table.add_row(
            r["code"],
            f"{r['fired']}/{rounds}",
            f"{100 * r['estimated_saving']:.0f}%",
            f"{100 * r['measured_saving']:.0f}%",
            f"{r['step_ms_planted']:.1f}",
            f"{r['step_ms_fixed']:.1f}",
        )
    Console(width=120).print(table)
    bench.meta["accuracy"] = rows
bench.save()
