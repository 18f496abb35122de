"""Run by test_kill_during_save.py (no tests here): saves a checkpoint at every step, forever.

    python save_kill_job.py DIR [--async-save]

The state of step k is known from k alone (every weight is its index pattern + k, the step
counter is k), so a checkpoint that verifies but holds anything else is caught. Prints
``ready`` once saving starts and ``saved K`` when checkpoint K is complete on disk (with
``--async-save``: when the next save has waited for it), until SIGKILLed.
"""

import sys

import torch
from torch import nn

from stoker.checkpoint import CheckpointConfig, Checkpointer

directory = sys.argv[1]
async_save = "--async-save" in sys.argv
torch.set_num_threads(1)
model = nn.Sequential(nn.Linear(512, 1024), nn.Linear(1024, 512))  # 1.05M params, ~4 MB
base = {
    k: torch.arange(v.numel(), dtype=v.dtype).reshape(v.shape)
    for k, v in model.state_dict().items()
}
state = {"model": model, "progress": {"step": 0}}
checkpointer = Checkpointer(
    directory, CheckpointConfig(every_steps=1, keep_last=3, async_save=async_save)
)
print("ready", flush=True)
for step in range(1, 100_000):
    with torch.no_grad():
        for name, value in model.state_dict().items():
            value.copy_(base[name] + step)
    state["progress"] = {"step": step}
    checkpointer.maybe_save(step, state)
    # Synchronous: this step's checkpoint is complete. Async: save(step) first waited for the
    # previous one's background write.
    print(f"saved {step if not async_save else step - 1}", flush=True)
