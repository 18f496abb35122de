"""Rules on synthetic measurements: the codes no CPU script can plant, and the edges."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from stoker.data.accounting import summarize_counts
from stoker.doctor import Measurements, Report, diagnose
from stoker.doctor.attribution import Attribution, SyncStats
from stoker.doctor.capture import ProfileSummary
from stoker.doctor.frames import Site
from stoker.doctor.measurements import LoaderInfo

SITE = Site("/work/train.py", 42, "main")


def _measurements(**overrides: Any) -> Measurements:
    base: dict[str, Any] = {
        "device": "cpu",
        "steps": 4,
        "step_ms": 100.0,
        "baseline_step_ms": 95.0,
        "step_ms_each": [100.0] * 4,
        "data_ms_each": [1.0] * 4,
        "phases_ms": {
            "data": 1.0,
            "forward": 30.0,
            "backward": 60.0,
            "optimizer": 5.0,
            "host_sync": 0.0,
            "other": 4.0,
        },
        "profile": ProfileSummary(steps=4),
        "attribution": Attribution(steps=2),
        "loop_site": SITE,
        "loaders": [],
        "optimizers": [],
        "forwards": [],
        "zero_grads": [],
        "compile_sites": [],
        "compile": {},
        "threads": {"intra_op": 2, "cores": 2, "set_at": None, "omp_env": None},
    }
    base.update(overrides)
    return Measurements(**base)


def test_clean_measurements_give_no_findings() -> None:
    assert diagnose(_measurements(), {}) == []


def test_starved_loader_uses_medians() -> None:
    loader = LoaderInfo(SITE, num_workers=0, pin_memory=False, batch_size=64, iterated_at=None)
    # One step preempted inside next(): a 61 ms mean wait, but a 1 ms typical one.
    spike = _measurements(
        loaders=[loader], data_ms_each=[1.0, 1.0, 181.0], step_ms_each=[100.0] * 3
    )
    assert diagnose(spike, {}) == []
    starved = _measurements(
        loaders=[loader], data_ms_each=[40.0, 41.0, 39.0], step_ms_each=[100.0] * 3
    )
    [finding] = diagnose(starved, {})
    assert finding.code == "dataloader-starved" and "num_workers=2" in finding.fix
    assert 0.08 <= finding.share <= 0.40


def test_no_pin_memory_on_cuda_only() -> None:
    profile = ProfileSummary(steps=4, h2d_ms=12.0, h2d_pageable_ms=10.0, device_busy_ms=50.0)
    loader = LoaderInfo(SITE, num_workers=2, pin_memory=False, batch_size=64, iterated_at=None)
    cuda = _measurements(device="cuda", profile=profile, loaders=[loader])
    [finding] = diagnose(cuda, {})
    assert finding.code == "no-pin-memory" and finding.share == pytest.approx(0.10)
    assert finding.location is not None and finding.location.endswith("train.py:42")
    assert "pin_memory=True" in finding.fix
    assert diagnose(_measurements(profile=profile, loaders=[loader]), {}) == []  # CPU


def test_padding_waste_and_rank_imbalance_from_accounting() -> None:
    # 2 ranks x 3 steps; rank 1 gets half the real tokens; 2048 positions computed each.
    ragged = summarize_counts([[1000, 1000, 1000], [500, 500, 500]], [[2048] * 3, [2048] * 3])
    m = _measurements(extras={"accounting": {**ragged.as_dict(), "site": SITE}})
    codes = {f.code: f for f in diagnose(m, {})}
    assert set(codes) == {"padding-waste", "rank-imbalance"}
    waste = codes["padding-waste"]
    assert waste.evidence["padding_fraction"] == pytest.approx(1 - 4500 / 12288, abs=1e-3)
    assert waste.share == pytest.approx(0.9 * (1 - 4500 / 12288), abs=1e-3)  # of fwd+bwd
    assert codes["rank-imbalance"].evidence["wait_fraction"] == pytest.approx(0.25)


def test_host_sync_needs_every_step() -> None:
    every = SyncStats(SITE, kinds=Counter(item=2), steps_seen={0, 1}, seconds=0.0002)
    some = SyncStats(Site("/work/train.py", 50, "main"), kinds=Counter(item=1), steps_seen={1})
    m = _measurements(attribution=Attribution(steps=2, syncs={every.site: every, some.site: some}))
    [finding] = diagnose(m, {})
    assert finding.code == "host-sync" and finding.location.endswith("train.py:42")
    assert finding.severity == "low"  # on CPU the host does not wait
    cuda = _measurements(device="cuda", attribution=m.attribution)
    assert diagnose(cuda, {})[0].severity in ("low", "medium", "high")


def test_report_orders_by_cost_and_serialises(tmp_path) -> None:
    ragged = summarize_counts([[1000, 1000], [500, 500]], [[2048, 2048], [2048, 2048]])
    m = _measurements(extras={"accounting": {**ragged.as_dict(), "site": SITE}})
    report = Report.build(m, {}, diagnose(m, {}))
    shares = [f.share for f in report.findings]
    assert shares == sorted(shares, reverse=True)
    text = report.render_text()
    assert "1. padding-waste" in text and "fix:" in text
    data = report.as_dict()
    assert [f["code"] for f in data["findings"]] == report.codes
    assert report.write_json(tmp_path).endswith("doctor.json")
