"""Padding and rank-imbalance accounting: definitions, plan predictions, device counters."""

import functools
import gc
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from stoker.data.accounting import RaggedSummary, TokenCounter, summarize_counts, summarize_plan
from stoker.data.mlm import pad_batch
from stoker.data.packing import PackedBatchSampler, PackingCollator, PackingConfig
from stoker.data.samplers import LengthGroupedBatchSampler
from stoker.errors import StokerError


def test_summarize_by_hand():
    # 2 ranks x 2 steps: step 0 real [10, 12], step 1 real [20, 10].
    s = summarize_counts([[10, 20], [12, 10]], [[16, 32], [16, 32]])
    assert (s.steps, s.ranks, s.real_tokens, s.computed_tokens) == (2, 2, 52, 96)
    assert s.padding_fraction == pytest.approx(1 - 52 / 96)
    assert s.imbalance == pytest.approx((12 / 10 + 20 / 10) / 2)
    assert s.imbalance_worst == pytest.approx(2.0)
    assert s.real_tokens_per_rank == (15.0, 11.0)
    assert s.wait_fraction == pytest.approx(1 - (11 + 15) / (12 + 20))
    assert s.as_dict()["real_tokens_per_rank"] == [15.0, 11.0]


def test_summarize_edge_cases_and_errors():
    empty = summarize_counts(np.zeros((2, 0)), np.zeros((2, 0)))
    assert empty.steps == 0 and empty.padding_fraction == 0.0 and empty.imbalance == 1.0
    assert summarize_counts([[0, 5]], [[4, 8]]).imbalance == 1.0  # one rank is always balanced
    with pytest.raises(StokerError, match="same shape"):
        summarize_counts([[1, 2]], [[1, 2, 3]])
    with pytest.raises(StokerError, match="above"):
        summarize_counts([[5]], [[4]])


def _docs(n=500, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(4.0, 1.1, size=n).astype(int), 1, 900)
    return [rng.integers(2, 100, size=k) for k in lengths]


def _measure(loader):
    counter = TokenCounter()
    for batch in loader:
        counter.update(batch)
    return counter


def test_plan_prediction_matches_the_counted_batches_padded():
    docs = _docs()
    lengths = [len(d) for d in docs]
    sampler = LengthGroupedBatchSampler(lengths, 16, seed=1)
    predicted = summarize_plan(sampler.plan(), lengths, max_len=256)
    collate = functools.partial(pad_batch, max_len=256)
    counted = _measure(DataLoader(docs, batch_sampler=sampler, collate_fn=collate)).summary()
    assert counted == predicted
    assert 0.0 < counted.padding_fraction < 0.5


def test_plan_prediction_matches_the_counted_batches_packed():
    docs = _docs()
    lengths = [len(d) for d in docs]
    cfg = PackingConfig(max_len=128, rows=8)
    sampler = PackedBatchSampler(lengths, cfg, seed=1)
    predicted = summarize_plan(sampler.plan(), lengths, packing=cfg)
    loader = DataLoader(docs, batch_sampler=sampler, collate_fn=PackingCollator(cfg))
    counter = _measure(loader)
    assert counter.steps == len(sampler.plan())
    assert counter.summary() == predicted
    assert predicted.real_tokens == sum(lengths)
    # ~0 padding but for the epoch's last, partly filled batch of 8 rows.
    assert predicted.computed_tokens - predicted.real_tokens <= (cfg.rows + 2) * cfg.max_len
    counter.reset()
    assert counter.steps == 0 and counter.summary().steps == 0


def test_counter_accepts_a_valid_tensor_and_rejects_other_input():
    counter = TokenCounter()
    for _ in range(1500):  # crosses the internal chunking of pending counts
        counter.update(torch.tensor([[True, True, False]]))
    s = counter.summary()
    assert (s.steps, s.real_tokens, s.computed_tokens) == (1500, 3000, 4500)
    with pytest.raises(StokerError, match="valid"):
        counter.update({"input_ids": torch.zeros(2, 3)})


def _live_tensors() -> int:
    # type(), not isinstance(): that would read __class__ of every object, and some warn.
    return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())


# Slow (~11 s on an EPYC Zen 3); the counter's exact totals stay in the default suite.
@pytest.mark.slow
def test_counter_memory_stays_bounded_and_totals_exact():
    # The job's counter sees one batch per step for thousands of steps: what it keeps alive
    # must not grow with them (it used to hold up to 1,024 tensors), and no count may be lost.
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(4, 16, generator=g) < 0.1 + 0.8 * torch.rand(()) for _ in range(50)]
    real = [int(b.sum()) for b in batches]
    counter = TokenCounter()
    gc.collect()
    before = _live_tensors()
    most = 0
    for step in range(3000):
        counter.update(batches[step % 50])
        if step % 100 == 99:
            most = max(most, _live_tensors() - before)
    assert most <= 16, f"{most} tensors kept alive by the counter"
    s = counter.summary()
    expected = [real[step % 50] for step in range(3000)]
    assert (s.steps, s.real_tokens, s.computed_tokens) == (3000, sum(expected), 3000 * 64)
    assert s.real_tokens_per_rank == (sum(expected) / 3000,)
    counter.update(batches[0])  # counting goes on after a summary
    assert counter.summary().real_tokens == sum(expected) + real[0]
    counter.reset()
    assert counter.steps == 0 and counter.summary().real_tokens == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_job(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        counter = TokenCounter()
        for step in range(3):  # rank 0: 2 real tokens per step, rank 1: 4 (+1 at step 2)
            valid = torch.zeros(2, 4, dtype=torch.bool)
            valid.view(-1)[: 2 + 2 * rank + (step == 2) * rank] = True
            counter.update({"valid": valid})
        out[rank] = counter.summary()
    finally:
        dist.destroy_process_group()


def test_summary_gathers_across_ranks():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_job, args=(_free_port(), out), nprocs=2, join=True)
        results = dict(out)
    assert results[0] == results[1]
    s: RaggedSummary = results[0]
    assert (s.ranks, s.steps, s.real_tokens, s.computed_tokens) == (2, 3, 6 + 13, 48)
    assert s.real_tokens_per_rank == (2.0, 13 / 3)
    assert s.imbalance == pytest.approx((2 + 2 + 2.5) / 3)
