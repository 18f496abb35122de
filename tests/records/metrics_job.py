"""Logs metrics every step until killed, for the SIGKILL tests (no tests here).

    python metrics_job.py logger FLUSH_SECONDS PATH    # a MetricsLogger alone, ~1 ms steps
    python metrics_job.py stoker STEPS                 # a Stoker loop, checkpoint every 10 steps

Prints ``step N`` (flushed) after each step's ``log``: what the process did before it died.
In ``stoker`` mode the run's metrics are flushed only by the checkpoints (flush_seconds=600),
so what survives a SIGKILL is what the checkpoints wrote.
"""

import sys
import time

import torch

mode = sys.argv[1]
if mode == "logger":
    from stoker.records import MetricsLogger

    logger = MetricsLogger(sys.argv[3], flush_seconds=float(sys.argv[2]))
    loss = torch.tensor(1.0)
    step = 0
    while True:
        step += 1
        logger.log({"loss": loss}, step=step)
        print(f"step {step} {time.time()}", flush=True)
        # A ~1 ms step that, like torch's kernels, releases the GIL. (A pure-Python spin here
        # starved the writer thread for up to 1.5 s now and then: see MetricsLogger's notes.)
        time.sleep(0.001)
else:
    from stoker import Stoker
    from stoker.checkpoint import CheckpointConfig
    from stoker.records import RecordConfig

    torch.set_num_threads(1)
    stoker = Stoker(
        device="cpu",
        precision="fp32",
        seed=0,
        doctor=False,
        checkpoint=CheckpointConfig(every_steps=10, keep_last=None),
        record=RecordConfig(flush_seconds=600, save_code=False, tee_console=False),
    )
    model = torch.nn.Linear(4, 1)
    model, optimizer = stoker.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    while stoker.step < int(sys.argv[2]):
        loss = model(x).square().mean()
        stoker.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        stoker.log({"loss": loss})
        print(f"step {stoker.step}", flush=True)
        time.sleep(0.01)
