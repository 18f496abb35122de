"""Sequence-length warm-up: the schedule's values, every document once per epoch, exact resume."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from stoker.data.packing import PackedBatchSampler, PackingCollator, PackingConfig
from stoker.data.seqlen import RowBatch, RowDocuments, SequenceLengthWarmup
from stoker.errors import StokerError


def _lengths(n=600, seed=0):
    rng = np.random.default_rng(seed)
    return np.minimum(rng.geometric(1 / 40, size=n), 128).astype(np.int64)


def _sampler(lengths, warmup=40, **kw):
    schedule = SequenceLengthWarmup(warmup_steps=warmup, start_len=16, **kw)
    cfg = PackingConfig(max_len=128, rows=4)
    return PackedBatchSampler(lengths, cfg, window=64, seed=3, length_schedule=schedule), cfg


def test_docstring_schedule_values():
    s = SequenceLengthWarmup(start_len=16, warmup_steps=100)
    got = {step: s.row_len(step, 128) for step in (0, 14, 15, 42, 43, 99, 100, 5000)}
    assert got == {0: 16, 14: 16, 15: 32, 42: 32, 43: 64, 99: 64, 100: 128, 5000: 128}
    assert s.buckets(128) == [16, 32, 64, 128]
    assert SequenceLengthWarmup(warmup_steps=10, start_len=40, bucket=64).buckets(256) == [
        64,
        128,
        192,
        256,
    ]


@pytest.mark.parametrize("bucket", ["pow2", 16, 48])
def test_bucket_count_bounded_and_lengths_never_shrink(bucket):
    lengths = _lengths()
    sampler, _ = _sampler(lengths, warmup=60, bucket=bucket)
    schedule = sampler.length_schedule
    seen = []
    for epoch in range(3):
        seen += [batch.row_len for (batch,) in sampler.plan(epoch)]
    assert set(seen) <= set(schedule.buckets(128))
    assert len(set(seen)) <= len(schedule.buckets(128))
    assert len(schedule.buckets(128)) <= (5 if bucket == "pow2" else 128 // bucket + 1)
    assert seen == sorted(seen)  # short rows first, full length once reached
    assert seen[0] < 128 and seen[-1] == 128
    # Each step follows the schedule exactly (steps counted across epochs).
    assert seen == [schedule.row_len(step, 128) for step in range(len(seen))]


@pytest.mark.parametrize("epoch", [0, 1, 2])
def test_every_document_exactly_once_per_epoch(epoch):
    lengths = _lengths()
    sampler, cfg = _sampler(lengths, warmup=150)
    plan = sampler.plan(epoch)
    docs = sorted(d for (batch,) in plan for d in batch)
    assert docs == list(range(len(lengths)))
    for (batch,) in plan:  # and every batch fits its rows at its length
        collated = PackingCollator(cfg)(
            RowBatch([np.ones(n) for n in lengths[batch]], batch.row_len)
        )
        rows = cfg.rows * 128 // batch.row_len
        assert collated["input_ids"].shape == (rows, batch.row_len)
        assert int(collated["valid"].sum()) == int(lengths[batch].sum())


def test_mid_schedule_resume_is_exact_through_a_dataloader():
    lengths = _lengths(300)
    docs = [np.arange(n, dtype=np.int64) + 1 for n in lengths]

    def loader():
        sampler, cfg = _sampler(lengths, warmup=50)
        return DataLoader(
            RowDocuments(docs), batch_sampler=sampler, collate_fn=PackingCollator(cfg)
        )

    full = loader()
    reference = [b["input_ids"] for epoch in range(2) for b in full]
    first = loader()
    it = iter(first)
    taken = [next(it)["input_ids"] for _ in range(17)]  # mid warm-up (steps 0-16 of 50)
    state = first.batch_sampler.state_dict()
    resumed = loader()
    resumed.batch_sampler.load_state_dict(state)
    rest = [b["input_ids"] for b in resumed] + [b["input_ids"] for b in resumed]
    got = taken + rest
    assert len(got) == len(reference)
    assert all(torch.equal(a, b) for a, b in zip(got, reference, strict=True))
    assert {t.shape[1] for t in taken} != {128}  # the resume point really was mid-schedule


def test_row_length_survives_dataloader_workers():
    lengths = _lengths(120)
    docs = [np.ones(n, dtype=np.int64) for n in lengths]
    sampler, cfg = _sampler(lengths, warmup=10)
    loader = DataLoader(
        RowDocuments(docs), batch_sampler=sampler, collate_fn=PackingCollator(cfg), num_workers=1
    )
    widths = [batch["input_ids"].shape[1] for batch in loader]
    assert widths == [batch.row_len for (batch,) in sampler.plan(0)]
    assert widths[0] < 128


def test_errors_say_what_to_do():
    with pytest.raises(StokerError, match="bucket"):
        SequenceLengthWarmup(warmup_steps=5, bucket=0)
    with pytest.raises(StokerError, match="one process"):
        PackedBatchSampler(
            [5] * 8,
            PackingConfig(max_len=8, rows=2),
            num_replicas=2,
            rank=0,
            length_schedule=SequenceLengthWarmup(warmup_steps=5),
        )
    with pytest.raises(StokerError, match="fraction"):
        SequenceLengthWarmup.from_fraction(1.5, 100)
