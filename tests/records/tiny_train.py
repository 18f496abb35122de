"""A tiny deterministic training script that records itself (used by the records tests).

python tiny_train.py --lr 0.05 --steps 20 [--fail] [--hang]
"""

import argparse
import time

import torch

from stoker.records import RecordConfig, start_run

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--fail", action="store_true", help="raise after training")
parser.add_argument("--hang", action="store_true", help="sleep after training (to be killed)")
args = parser.parse_args()

torch.manual_seed(0)
run = start_run(RecordConfig(name="tiny", flush_seconds=0.05), user_config=args, seeds={"torch": 0})
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=args.lr)
x = torch.randn(64, 4)
y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
for step in range(1, args.steps + 1):
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    run.log({"loss": loss, "lr": args.lr}, step=step)
print(f"final loss {loss.item():.6f}")
if args.fail:
    raise RuntimeError("the run failed on purpose")
if args.hang:
    print("hanging", flush=True)
    time.sleep(600)
