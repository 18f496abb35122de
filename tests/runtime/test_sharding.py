"""``Stoker(strategy="fsdp")`` trains exactly like one process and like DDP, with and without
accumulation and token weighting; activation checkpointing changes nothing but memory. The
multi-process runs are fsdp_job.py under torchrun (2 processes, gloo); the block-selection
tests run in this process."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fsdp_job import run_job
from torch import nn

from stoker.models import Encoder, EncoderConfig
from stoker.runtime.sharding import activation_checkpointing, select_blocks, shard_model

# Gradient accumulation (2 micro-batches), token-weighted loss (ragged labels), both.
MODES = {
    "-acc": {"accumulate": True},
    "-tokens": {"tokens": True},
    "-acc-tokens": {"accumulate": True, "tokens": True},
}
TWO_PROCESS_RUNS = [
    {"name": "fsdp", "strategy": "fsdp"},
    {"name": "ddp", "strategy": "ddp"},
    *[
        {"name": f"{strategy}{mode}", "strategy": strategy, **options}
        for strategy in ("fsdp", "ddp")
        for mode, options in MODES.items()
    ],
    {"name": "fsdp-ac", "strategy": "fsdp", "ac": True, "steps": 4},
    {"name": "ddp-ac", "strategy": "ddp", "ac": True, "steps": 4},
    {"name": "fsdp-dropout", "strategy": "fsdp", "dropout": 0.2, "steps": 4},
    {"name": "fsdp-dropout-ac", "strategy": "fsdp", "dropout": 0.2, "steps": 4, "ac": True},
    {"name": "fsdp-bf16", "strategy": "fsdp", "precision": "bf16", "steps": 6},
]
ONE_PROCESS_RUNS = [
    {"name": "single", "strategy": "auto"},
    *[{"name": f"single{mode}", "strategy": "auto", **options} for mode, options in MODES.items()],
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("fsdp")
    return {**run_job(tmp, TWO_PROCESS_RUNS, 2, "2"), **run_job(tmp, ONE_PROCESS_RUNS, 1, "1")}


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.slow  # the `runs` fixture launches 2-process jobs (~40 s)
@pytest.mark.parametrize("mode", ["", *MODES], ids=["plain", *(m[1:] for m in MODES)])
def test_fsdp_trajectory_equals_one_process_and_ddp(runs, mode):
    single, fsdp, ddp = runs[f"single{mode}"], runs[f"fsdp{mode}"], runs[f"ddp{mode}"]
    assert len(single["losses"]) == 20
    close(fsdp["losses"], single["losses"])
    close(fsdp["losses"], ddp["losses"])
    assert single["losses"][-5:].mean() < single["losses"][:5].mean()  # it does learn
    # Weights after 20 AdamW steps agree to ~3e-4 for DDP as for FSDP: Adam divides by
    # sqrt(v), which magnifies float rounding in near-zero gradients; the losses agree to 1e-6.
    for name, w in single["weights"].items():
        close(fsdp["weights"][name], w, tol=2e-3)


@pytest.mark.slow  # the `runs` fixture launches 2-process jobs (~40 s)
def test_clipping_uses_the_global_norm(runs):
    # clip_grad_norm_ over the DTensor shards returns (and clips to) the unsharded norm.
    single, fsdp = runs["single"], runs["fsdp"]
    assert (single["norms"] > 0.5).all()  # max_norm=0.5: every step clipped
    close(fsdp["norms"], single["norms"])
    close(runs["fsdp-acc-tokens"]["norms"], runs["single-acc-tokens"]["norms"])


@pytest.mark.slow  # the `runs` fixture launches 2-process jobs (~40 s)
@pytest.mark.parametrize("strategy", ["fsdp", "ddp", "fsdp-dropout"])
def test_activation_checkpointing_gives_the_same_losses_and_gradients(runs, strategy):
    plain, checkpointed = runs[strategy], runs[f"{strategy}-ac"]
    # Same computation recomputed: bitwise equal (dropout masks are replayed). 4 steps.
    assert torch.equal(plain["losses"][:4], checkpointed["losses"])
    assert plain["grads0"].keys() == checkpointed["grads0"].keys()
    for name, g in plain["grads0"].items():
        assert torch.equal(checkpointed["grads0"][name], g), name


@pytest.mark.slow  # the `runs` fixture launches 2-process jobs (~40 s)
def test_bf16_mixed_precision_trains_with_fp32_master_weights(runs):
    bf16, fp32 = runs["fsdp-bf16"], runs["fsdp"]
    assert all(w.dtype == torch.float32 for w in bf16["weights"].values())
    assert not torch.equal(bf16["losses"], fp32["losses"][:6])  # it did compute in bf16
    close(bf16["losses"], fp32["losses"][:6], tol=3e-2)


def tiny_encoder() -> Encoder:
    return Encoder(EncoderConfig(vocab_size=16, max_len=8, dim=8, layers=3, heads=2, ffn_dim=16))


def test_default_blocks_are_the_module_list_entries():
    model = tiny_encoder()
    assert [name for name, _ in select_blocks(model)] == ["blocks.0", "blocks.1", "blocks.2"]
    by_class = select_blocks(model, [nn.LayerNorm])
    assert [name for name, _ in by_class][-1] == "final_norm" and len(by_class) == 7
    by_name = select_blocks(model, lambda name, m: name == "blocks.1")
    assert [name for name, _ in by_name] == ["blocks.1"]


def test_checkpointed_blocks_are_found_through_their_wrapper():
    model = activation_checkpointing(tiny_encoder())
    chosen = select_blocks(model)
    assert [name for name, _ in chosen] == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(m is model.blocks[i] for i, (_, m) in enumerate(chosen))  # the wrappers
    assert [name for name, _ in select_blocks(model, [nn.Linear])][:2] == [
        "blocks.0.qkv",
        "blocks.0.attn_out",
    ]


def test_activation_checkpointing_keeps_state_dict_keys_and_results():
    torch.manual_seed(0)
    plain = tiny_encoder()
    checkpointed = tiny_encoder()
    checkpointed.load_state_dict(plain.state_dict())
    activation_checkpointing(checkpointed)
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    ids = torch.randint(0, 16, (2, 8))
    for model in (plain, checkpointed):
        model(ids).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


def test_bad_input_is_refused_with_the_choices():
    model = tiny_encoder()
    with pytest.raises(ValueError, match="valid choices: fp32, bf16"):
        shard_model(model, mixed_precision="fp16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="selects no module"):
        select_blocks(model, [nn.Conv1d])
    with pytest.raises(TypeError, match=r"nn\.Module subclasses"):
        select_blocks(model, ["blocks"])  # type: ignore[list-item]
    activation_checkpointing(model)
    with pytest.raises(ValueError, match="already applied"):
        activation_checkpointing(model)
