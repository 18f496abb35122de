"""Rules about the data: a starved loader, unpinned host memory, padding, unbalanced ranks."""

from __future__ import annotations

import statistics

from stoker.doctor.measurements import Measurements
from stoker.doctor.rules._base import Finding, Probes, location, rounded_ms, rule, severity_of

__all__: list[str] = []  # rules register themselves in RULES


@rule("dataloader-starved")
def dataloader_starved(m: Measurements, probes: Probes) -> list[Finding]:
    """The loop waits for the next batch for a large part of the step."""
    # Medians over the profiled steps: one step the OS preempted inside next() is not a trend.
    data_ms = statistics.median(m.data_ms_each) if m.data_ms_each else m.phases_ms["data"]
    step_ms = statistics.median(m.step_ms_each) if m.step_ms_each else m.step_ms
    share = data_ms / step_ms
    if share < 0.20 or data_ms < 0.5 or not m.loaders:
        return []
    loader = max(m.loaders, key=lambda x: x.wait_s)
    cores = m.threads["cores"]
    if loader.num_workers == 0:
        workers = max(2, min(4, cores))
        fix = (
            f"DataLoader(..., num_workers={workers}, persistent_workers=True): batches get "
            "prepared while the model computes; if one batch takes longer than a step even "
            "so, make __getitem__/collate cheaper (pre-tokenise, vectorise)"
        )
    else:
        workers = loader.num_workers * 2
        fix = (
            f"raise num_workers from {loader.num_workers} to {workers} (and prefetch_factor), "
            "or make __getitem__/collate cheaper (pre-tokenise, vectorise)"
        )
    # Workers hide the wait behind compute, but only as far as spare cores let them: on a
    # machine whose cores the compute already uses, each worker slows the compute it overlaps.
    compute_ms = max(0.0, step_ms - data_ms)
    spare = max(0.0, 1.0 - m.threads["intra_op"] / cores) if m.device == "cpu" else 1.0
    hidden = min(data_ms, compute_ms) * (spare if spare > 0 else 0.5)
    saving = max(hidden, data_ms - compute_ms) if compute_ms < data_ms else hidden
    saving = min(saving, data_ms)
    if saving < 0.08 * step_ms:
        return []
    return [
        Finding(
            code="dataloader-starved",
            severity=severity_of(saving / step_ms),
            share=saving / step_ms,
            title=(
                f"the loop waits {data_ms:.1f} ms per step ({100 * share:.0f}% of the step) for "
                f"the DataLoader (num_workers={loader.num_workers})"
            ),
            fix=fix,
            location=location(loader.site or loader.iterated_at),
            evidence={
                "data_wait_ms": rounded_ms(data_ms),
                "step_ms": rounded_ms(step_ms),
                "num_workers": loader.num_workers,
                "cores": cores,
                "intra_op_threads": m.threads["intra_op"],
            },
        )
    ]


@rule("no-pin-memory")
def no_pin_memory(m: Measurements, probes: Probes) -> list[Finding]:
    """CUDA only: batches are copied to the GPU from pageable memory."""
    prof = m.profile
    if m.device != "cuda" or prof.h2d_pageable_ms <= 0:
        return []
    loaders = [x for x in m.loaders if not x.pin_memory]
    if not loaders:
        return []
    # Pinned copies run about twice as fast and, with non_blocking=True, overlap compute.
    saving = prof.h2d_pageable_ms
    share = saving / m.step_ms
    if share < 0.02:
        return []
    return [
        Finding(
            code="no-pin-memory",
            severity=severity_of(share),
            share=share,
            title=(
                f"host-to-device copies from pageable memory take {prof.h2d_pageable_ms:.1f} ms "
                "per step"
            ),
            fix=(
                "DataLoader(..., pin_memory=True) and `batch.to(device, non_blocking=True)` (or "
                "stoker.prepare, which does both)"
            ),
            location=location(loaders[0].site or loaders[0].iterated_at),
            evidence={
                "h2d_ms": rounded_ms(prof.h2d_ms),
                "h2d_pageable_ms": rounded_ms(prof.h2d_pageable_ms),
            },
        )
    ]


@rule("padding-waste")
def padding_waste(m: Measurements, probes: Probes) -> list[Finding]:
    """Batches are mostly padding (from the ragged-data accounting, when the run has it)."""
    acc = m.extras.get("accounting") or {}
    frac = acc.get("padding_fraction")
    if frac is None or frac < 0.15:
        return []
    # Compute on pad tokens is wasted in proportion (attention a bit more, embeddings less).
    compute = m.phases_ms["forward"] + m.phases_ms["backward"]
    share = compute * frac / m.step_ms
    return [
        Finding(
            code="padding-waste",
            severity=severity_of(share),
            share=share,
            title=f"{100 * frac:.0f}% of the tokens in each batch are padding",
            fix=(
                "group by length (stoker.data length-grouped / token-budget sampler) or pack "
                "sequences (stoker.data.packing)"
            ),
            location=location(acc.get("site")),
            evidence={"padding_fraction": round(frac, 3)},
        )
    ]


@rule("rank-imbalance")
def rank_imbalance(m: Measurements, probes: Probes) -> list[Finding]:
    """Data-parallel ranks get unequal work, so every step waits for the busiest one."""
    acc = m.extras.get("accounting") or {}
    per_rank = list(acc.get("real_tokens_per_rank") or ())
    wait = acc.get("wait_fraction")
    if len(per_rank) < 2 or wait is None or wait < 0.10:
        return []
    # Ranks idle for `wait` of the busiest rank's compute time (tokens as the time proxy).
    compute = m.phases_ms["forward"] + m.phases_ms["backward"]
    share = compute * wait / m.step_ms
    return [
        Finding(
            code="rank-imbalance",
            severity=severity_of(share),
            share=share,
            title=(
                f"ranks get unequal work: real tokens per step range {min(per_rank):.0f}-"
                f"{max(per_rank):.0f} across {len(per_rank)} ranks, so they wait "
                f"{100 * wait:.0f}% of the time for the busiest one"
            ),
            fix=(
                "balance tokens, not samples, across ranks: a rank-balanced / token-budget "
                "sampler from stoker.data.samplers (or pack sequences)"
            ),
            location=location(acc.get("site")),
            evidence={
                "real_tokens_per_rank": [round(x, 1) for x in per_rank],
                "wait_fraction": round(wait, 3),
                "imbalance": acc.get("imbalance"),
            },
        )
    ]
