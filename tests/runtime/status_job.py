"""Run by test_run_status.py: a short stoker run that ends the way argv[1] says (no tests here).

finished          returns normally
error             an uncaught RuntimeError
stoker-error      an uncaught StokerError (printed as one line)
checkpoint-raise  a checkpoint save fails under CheckpointConfig(on_error="raise")
interrupt         SIGINT (Ctrl-C) mid-run
"""

import os
import signal
import sys
import time

import torch

from stoker import Stoker, StokerError
from stoker.checkpoint import CheckpointConfig

mode = sys.argv[1]
stoker = Stoker(
    device="cpu", precision="fp32", seed=0, checkpoint=CheckpointConfig(on_error="raise")
)
model = torch.nn.Linear(4, 1)
model, optimizer = stoker.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
for _ in range(3):
    stoker.backward(model(torch.randn(8, 4)).square().mean())
    optimizer.step()
    optimizer.zero_grad()
if mode == "error":
    raise RuntimeError("the loss went to the moon")
if mode == "stoker-error":
    raise StokerError("batch_size=0 is not a batch size; use 1 or more")
if mode == "checkpoint-raise":
    assert stoker.run_dir is not None
    (stoker.run_dir / "checkpoints").write_text("a file where the checkpoints directory goes")
    stoker.save_checkpoint()
if mode == "interrupt":
    # A shell's background job inherits SIGINT ignored, and Python then keeps it ignored: make
    # it a Ctrl-C wherever the test runs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)  # the KeyboardInterrupt arrives here
