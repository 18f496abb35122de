"""Training runs through ``Stoker(strategy=...)`` for test_sharding.py and
checkpoint/test_sharded.py (not a test module).

    python fsdp_job.py SPEC.json OUT.pt                               # one process
    python -m torch.distributed.run --standalone --nproc-per-node 2 fsdp_job.py SPEC.json OUT.pt

SPEC is a JSON list of runs, done one after the other in this process set; each is a dict:
``name``; ``strategy`` ("auto" | "ddp" | "fsdp"); ``accumulate`` (2 micro-batches per step
under ``stoker.accumulate``); ``tokens`` (ragged labels, ``backward(loss, tokens=n)``); ``ac``
(activation checkpointing); ``precision`` ("fp32" | "bf16"); ``dropout``; ``steps``;
``run_dir`` + ``every`` (record and checkpoint every that many steps there; resume="auto" from
it); ``no_pickle`` (pickle and torch.load raise while prepare() resumes). Rank 0 writes
``{name: {"losses", "norms", "weights", "grads0", "start"}}``; "start" is the step it resumed
from.

Every run sees the same global batch of 8 rows per step, split over processes and micro-batches
by the step number (not a loader: a resumed run continues at ``stoker.step``); the recorded
loss is the global token mean, so every strategy should give the same numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from stoker import Stoker
from stoker.models import Encoder, EncoderConfig
from stoker.records import RecordConfig

GLOBAL_BATCH, SEQ, VOCAB, STEPS = 8, 12, 48, 20


def data(tokens: bool) -> tuple[Tensor, Tensor]:
    """ids [20 * 8, 12]; labels = the next id (learnable), -100 where a token doesn't count."""
    g = torch.Generator().manual_seed(0)
    n = STEPS * GLOBAL_BATCH
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    labels = (ids + 1) % VOCAB
    if tokens:  # row i keeps a fraction 0.1 .. 1.0 of its tokens (rows shuffled), >= 1
        keep = torch.rand(n, SEQ, generator=g) < torch.linspace(0.1, 1.0, n).roll(n // 3)[:, None]
        keep[:, 0] = True
        labels = labels.masked_fill(~keep, -100)
    return ids, labels


@contextlib.contextmanager
def no_unpickling() -> Iterator[None]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("unpickling during load")

    saved = pickle.load, pickle.loads, pickle.Unpickler, torch.load
    pickle.load = pickle.loads = torch.load = refuse  # type: ignore[assignment]
    pickle.Unpickler = refuse  # type: ignore[assignment,misc]
    try:
        yield
    finally:
        pickle.load, pickle.loads, pickle.Unpickler, torch.load = saved  # type: ignore[misc]


def full(t: Tensor) -> Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def full_weights(model: nn.Module) -> dict[str, Tensor]:
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: full(v) for k, v in sd.items()}


def run(spec: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    k = 2 if spec.get("accumulate") else 1
    weighted = spec.get("tokens", False)
    ids, labels = data(weighted)
    run_dir = spec.get("run_dir")
    stoker = Stoker(
        device="cpu",
        precision=spec.get("precision", "fp32"),
        strategy=spec["strategy"],
        activation_checkpointing=bool(spec.get("ac")),
        accumulation_steps=k,
        seed=0,
        record=RecordConfig(directory=run_dir, tee_console=False) if run_dir else False,
        checkpoint=spec.get("every"),
        doctor=False,
    )
    torch.manual_seed(0)
    cfg = EncoderConfig(
        vocab_size=VOCAB,
        max_len=SEQ,
        dim=32,
        layers=2,
        heads=2,
        ffn_dim=64,
        dropout=spec.get("dropout", 0.0),
    )
    model: nn.Module = Encoder(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    # prepare() resumes: loading must not unpickle (saving may: DCP's plan exchange does)
    with no_unpickling() if spec.get("no_pickle") else contextlib.nullcontext():
        model, optimizer = stoker.prepare(model, optimizer)
    out: dict[str, Any] = {"losses": [], "norms": [], "start": stoker.step}
    for step in range(stoker.step, spec.get("steps", STEPS)):
        rows = slice(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH)
        # This rank's rows of the step, then its k micro-batches: [8 / world / k, SEQ] each.
        mine = [t[rows].chunk(world)[rank].chunk(k) for t in (ids, labels)]
        total = torch.zeros(())
        for x, y in zip(*mine, strict=True):
            with stoker.accumulate(model):
                logits = model(x)  # [b, SEQ, VOCAB]
                token_sum = F.cross_entropy(
                    logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum"
                )
                n = (y != -100).sum()
                if weighted:
                    stoker.backward(token_sum / n, tokens=n)
                else:  # every micro-batch has the same number of tokens
                    stoker.backward(token_sum / n)
            total = total + token_sum.detach()
        if step == out["start"]:
            out["grads0"] = {
                name.replace("_checkpoint_wrapped_module.", ""): full(p.grad)
                for name, p in stoker.unwrap(model).named_parameters()
            }
        norm = stoker.clip_grad_norm_(0.5)
        optimizer.step()
        optimizer.zero_grad()
        count = (labels[rows] != -100).sum()
        out["losses"].append(stoker.reduce(total, "sum") / count)
        out["norms"].append(norm)
    stoker.close()
    out["losses"] = torch.stack(out["losses"]) if out["losses"] else torch.zeros(0)
    out["norms"] = torch.stack(out["norms"]) if out["norms"] else torch.zeros(0)
    out["weights"] = full_weights(stoker.unwrap(model))
    return out


# -- for the tests: launching this job ------------------------------------------------------


def launch(
    tmp: Path, specs: list[dict[str, Any]], nproc: int, tag: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs this job on ``specs`` in ``nproc`` processes (1: plain python, no torch.distributed);
    the results go to ``tmp/out-TAG.pt``."""
    spec_file, out = tmp / f"spec-{tag}.json", tmp / f"out-{tag}.pt"
    spec_file.write_text(json.dumps(specs))
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [sys.executable, *(launcher if nproc > 1 else []), __file__, str(spec_file), str(out)]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=240, env={**os.environ, **(env or {})}
    )


def run_job(tmp: Path, specs: list[dict[str, Any]], nproc: int, tag: str) -> dict[str, Any]:
    """:func:`launch`, which must succeed; returns rank 0's results."""
    done = launch(tmp, specs, nproc, tag)
    # A native abort names its cause far above torchrun's summary: keep those lines too.
    cause = [line for line in done.stderr.splitlines() if "terminate" in line or "what()" in line]
    assert done.returncode == 0, "\n".join([*cause, (done.stdout + done.stderr)[-4000:]])
    return torch.load(tmp / f"out-{tag}.pt", weights_only=True)


def main() -> None:
    with open(sys.argv[1]) as f:
        specs = json.load(f)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # one group for every run of the spec (each Stoker uses it, none owns it)
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # as torchrun sets for each process: the runs share 2 cores
    warnings.filterwarnings("ignore", "FSDP2-wrapped module", UserWarning)  # logits are a view
    results = {spec["name"]: run(spec, rank, world) for spec in specs}
    if rank == 0:
        torch.save(results, sys.argv[2])
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
