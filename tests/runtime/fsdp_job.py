"""Training runs for test_sharding.py and checkpoint/test_sharded.py (not a test module).

    python fsdp_job.py SPEC.json OUT.pt                               # one process, no dist
    python -m torch.distributed.run --standalone --nproc-per-node 2 fsdp_job.py SPEC.json OUT.pt

SPEC is a JSON list of runs, done one after the other in this process set; each is a dict:
``name``; ``strategy`` ("single" | "ddp" | "fsdp"); ``accumulate`` (2 micro-batches per step,
DDP ``no_sync`` / FSDP ``set_requires_gradient_sync(False)`` on the first); ``tokens``
(ragged labels, loss = sum of token losses / global token count); ``ac`` (activation
checkpointing); ``precision`` ("fp32" | "bf16"); ``dropout``; ``steps``; ``save_at`` +
``save_dir`` (save_sharded after that many steps); ``resume`` (load_sharded from that
directory, then train from step ``start``); ``no_pickle`` (pickle and torch.load raise while
loading). Rank 0 writes ``{name: {"losses", "norms", "weights", "saved_weights", "grads0"}}``.

Every run sees the same global batch of 8 rows per step, split over processes and micro-batches;
the recorded loss is the global token mean, so every strategy should give the same numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from stoker.checkpoint.sharded import load_sharded, save_sharded
from stoker.models import Encoder, EncoderConfig
from stoker.runtime.sharding import activation_checkpointing, shard_model

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


def build(spec: dict[str, Any], world: int) -> nn.Module:
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
    if spec.get("ac"):
        activation_checkpointing(model)
    if spec["strategy"] == "fsdp":
        shard_model(
            model,
            mesh=init_device_mesh("cpu", (world,)),
            mixed_precision=spec.get("precision", "fp32"),
        )
    elif spec["strategy"] == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    return model


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
    steps, start = spec.get("steps", STEPS), spec.get("start", 0)
    k = 2 if spec.get("accumulate") else 1
    ids, labels = data(spec.get("tokens", False))
    model = build(spec, world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    if spec.get("resume"):
        guard = no_unpickling() if spec.get("no_pickle") else contextlib.nullcontext()
        with guard:
            load_sharded(spec["resume"], model, optimizer)
    out: dict[str, Any] = {"losses": [], "norms": []}
    for step in range(start, steps):
        rows = slice(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH)
        # This rank's rows of the step, then its k micro-batches: [8 / world / k, SEQ] each.
        mine = [t[rows].chunk(world)[rank].chunk(k) for t in (ids, labels)]
        count = (torch.cat(mine[1]) != -100).sum().float()  # this rank's tokens in the window
        if world > 1:
            dist.all_reduce(count)  # the window's global token count, a tensor (no host sync)
        total = torch.zeros(())
        for j, (x, y) in enumerate(zip(*mine, strict=True)):
            last = j == k - 1
            if spec["strategy"] == "fsdp":
                model.set_requires_gradient_sync(last)  # type: ignore[operator]
            sync = (
                contextlib.nullcontext() if last or spec["strategy"] != "ddp" else model.no_sync()
            )
            with sync:  # type: ignore[attr-defined]
                logits = model(x)  # [b, SEQ, VOCAB]
                token_sum = F.cross_entropy(
                    logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100, reduction="sum"
                )
                # Gradients are averaged over processes: scale by world to get sum / count.
                (token_sum * world / count).backward()
            total = total + token_sum.detach()
        if step == start:
            out["grads0"] = {
                n.replace("_checkpoint_wrapped_module.", "").removeprefix("module."): full(p.grad)
                for n, p in model.named_parameters()
            }
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
        optimizer.step()
        optimizer.zero_grad()
        if world > 1:
            dist.all_reduce(total)
        out["losses"].append(total / count)
        out["norms"].append(full(norm))
        if spec.get("save_at") == step + 1:
            save_sharded(spec["save_dir"], model, optimizer)
            out["saved_weights"] = full_weights(model)
    out["losses"] = torch.stack(out["losses"])
    out["norms"] = torch.stack(out["norms"])
    out["weights"] = full_weights(model)
    return out


def main() -> None:
    with open(sys.argv[1]) as f:
        specs = json.load(f)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
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
