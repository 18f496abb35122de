"""Doctor overhead: step time with the doctor attached, outside and inside its profiled window.

Three comparisons against the same loop without the doctor (a 256-2048-256 MLP, bf16 autocast,
fused AdamW, batches from a DataLoader, so every always-on listener is exercised):

- ``outside``: the doctor attached after its window finished — what every step of a run pays
  (target <= 1 %). Each sample also pays one attach/detach, so this is an upper bound;
- ``window``: one complete profiled window of 5 steps, including starting and stopping
  torch.profiler and summarising its events, per step;
- ``window + attribution``: the same plus the 2 steps after it that run under the call-site
  recorder: the whole cost of a doctor run, per step, probes excluded.

    python benchmarks/doctor.py            # full run
    python benchmarks/doctor.py --quick    # smoke test
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from stoker.bench import Bench, Candidate, bench_parser
from stoker.doctor import Doctor, DoctorConfig

parser = bench_parser("Doctor overhead inside and outside its profiled window.", repeats=15)
parser.add_argument("--batch", type=int, default=256)
parser.add_argument("--steps", type=int, default=20, help="steps per sample outside the window")
parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
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
bench.save()
