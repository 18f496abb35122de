"""Run by test_preemption.py (no tests here): a small stoker job that signals itself.

    python preempt_job.py OUT [--steps 30] [--signal-at K] [--signal SIGTERM] [--signal-rank R]
                              [--storm] [--no-record] [--async-save] [--wait-for-signal K]
                              [--agree-every SECONDS] [--strategy auto|fsdp]

Trains with a prepared shuffled DataLoader, dropout, an in-loop ``torch.randint`` draw (the
RNG moves between the step and the next micro-batch, as in nanoGPT), a scheduler and tracked
state, so a checkpoint is exact only if it holds everything as of its step. With
``--signal-at K`` the process of rank R sends itself the signal in the middle of step K (after
the forward, before ``optimizer.step()``). ``--storm``: from then on a thread sends the signal
again every 2 ms until the process exits (signals during the save). ``--wait-for-signal K``:
from step K on, every step sleeps 50 ms (an outside signal, e.g. to ``stoker run``, lands
mid-run). ``--agree-every``: PreemptionConfig's ``agree_every_s`` (default 0 here: the ranks
exchange at every step, so the stop step is known exactly). Rank 0 prints ``step N`` after
each step and writes the final weights and optimizer state to OUT.
"""

import argparse
import os
import signal
import threading
import time

import torch
import torch.nn.functional as F

from stoker import PreemptionConfig, Stoker
from stoker.checkpoint import CheckpointConfig

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--signal-at", type=int, default=None)
parser.add_argument("--signal", default="SIGTERM")
parser.add_argument("--signal-rank", type=int, default=0)
parser.add_argument("--storm", action="store_true")
parser.add_argument("--no-record", action="store_true")
parser.add_argument("--async-save", action="store_true")
parser.add_argument("--wait-for-signal", type=int, default=None)
parser.add_argument("--agree-every", type=float, default=0.0, help="PreemptionConfig's")
parser.add_argument("--strategy", default="auto", help="Stoker's (fsdp: OUT holds rank 0's shards)")
args = parser.parse_args()

torch.set_num_threads(1)
stoker = Stoker(
    device="cpu",
    precision="fp32",
    seed=0,
    record=not args.no_record,
    checkpoint=CheckpointConfig(every_steps=7, async_save=args.async_save),
    doctor=False,
    preemption=PreemptionConfig(agree_every_s=args.agree_every),
    strategy=args.strategy,
)
data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randn(64, 1))
loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
model = torch.nn.Sequential(
    torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1)
)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
progress = {"noise_sum": torch.zeros(())}
model, optimizer, loader, scheduler = stoker.prepare(
    model, optimizer, loader, scheduler=scheduler, state={"progress": progress}
)
number = getattr(signal, args.signal)


def storm() -> None:
    while True:
        time.sleep(0.002)
        os.kill(os.getpid(), number)


while stoker.step < args.steps:
    for x, y in loader:
        noise = torch.randint(0, 3, (1,)).float() * 0.01  # the RNG moves after the step
        progress["noise_sum"] += noise.squeeze()
        loss = F.mse_loss(model(x + noise), y)
        stoker.backward(loss)
        if args.signal_at == stoker.step + 1 and stoker.rank == args.signal_rank:
            os.kill(os.getpid(), number)
            if args.storm:
                threading.Thread(target=storm, daemon=True).start()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if stoker.is_main:
            print(f"step {stoker.step}", flush=True)
        if args.wait_for_signal is not None and stoker.step >= args.wait_for_signal:
            time.sleep(0.05)
        if stoker.step == args.steps:
            break


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor: this rank's shard


if stoker.is_main:
    state = {f"model.{k}": local(v) for k, v in stoker.unwrap(model).state_dict().items()}
    for i, s in enumerate(optimizer.state_dict()["state"].values()):
        state.update({f"opt{i}.{k}": local(v) for k, v in s.items() if torch.is_tensor(v)})
    state["noise_sum"] = progress["noise_sum"]
    state["resumed_from"] = torch.tensor(-1 if stoker.resumed_from is None else stoker.resumed_from)
    torch.save(state, args.out)
