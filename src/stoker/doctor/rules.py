"""Rules: one small function per finding code, from the measurements to what to change.

Every rule returns zero or more :class:`Finding`. A finding's ``share`` is the fraction of the
step time the doctor expects the fix to save, computed from numbers measured in this run: the
window's phase times, the attribution steps' per-line times and the probes (the fix timed on the
user's own model). A rule with nothing measured stays quiet: a clean loop gets no findings.

Registry: ``RULES`` maps each code to its function; :func:`diagnose` runs them all, most costly
finding first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from stoker.doctor.frames import Site
from stoker.doctor.probes import Probe
from stoker.doctor.session import Measurements

__all__ = ["RULES", "SEVERITIES", "Finding", "diagnose"]

log = logging.getLogger(__name__)

SEVERITIES = ("high", "medium", "low")


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing to change: what, what it costs, where, and how."""

    code: str
    """Stable kebab-case identifier, e.g. ``"host-sync"``."""
    severity: str
    """``"high"`` (>= 20 % of step time), ``"medium"`` (>= 5 %) or ``"low"``."""
    share: float | None
    """Estimated fraction of step time the fix saves; None when it could not be measured."""
    title: str
    """What is wrong, in one line."""
    fix: str
    """The change to make, in code terms."""
    location: str | None = None
    """``file:line`` in the user's code."""
    evidence: dict[str, Any] = field(default_factory=dict)
    """The measured numbers behind the finding."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity,
            "share": self.share,
            "title": self.title,
            "fix": self.fix,
            "location": self.location,
            "evidence": self.evidence,
        }


Probes = Mapping[str, Probe]
Rule = Callable[[Measurements, Probes], list[Finding]]
RULES: dict[str, Rule] = {}


def _rule(code: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        RULES[code] = fn
        return fn

    return register


def _severity(share: float | None, floor: str = "low") -> str:
    level = "low"
    if share is not None and share >= 0.20:
        level = "high"
    elif share is not None and share >= 0.05:
        level = "medium"
    return min(level, floor, key=SEVERITIES.index)


def _loc(site: Site | None) -> str | None:
    return str(site) if site is not None else None


def _ms(x: float) -> float:
    return round(x, 3)


# ---------------------------------------------------------------------------------------------
@_rule("host-sync")
def host_sync(m: Measurements, probes: Probes) -> list[Finding]:
    """A tensor-to-Python conversion made by the user's code on every step."""
    attr = m.attribution
    out = []
    for sync in attr.syncs.values():
        if attr.steps == 0 or len(sync.steps_seen) < attr.steps:
            continue  # not every step: periodic logging is fine
        per_step = sync.kinds.total() / attr.steps
        ms = 1e3 * sync.seconds / attr.steps
        share = min(1.0, ms / m.step_ms)
        kinds = set(sync.kinds)
        if kinds & {"__repr__", "__format__"}:
            what, fix = (
                "formats a tensor (print / f-string)",
                (
                    "print or log every N steps, not every step; between logs accumulate on the "
                    "device: `running += loss.detach()`"
                ),
            )
        elif kinds & {"__bool__", "is_nonzero", "equal", "allclose"}:
            what, fix = (
                "branches on a tensor value (`if tensor:`)",
                (
                    "don't branch on a device value every step: check every N steps, use "
                    "`torch.where` to stay on the device, or `stoker.watchdog.Watchdog` for "
                    "non-finite checks (no sync)"
                ),
            )
        else:
            name = sorted(kinds)[0]
            what, fix = (
                f"converts a tensor to Python (`.{name.strip('_')}()`)",
                (
                    "keep the value on the device (`running += loss.detach()`) and call `.item()` "
                    "once every N steps, when you log"
                ),
            )
        device_note = (
            " On this CPU the host does not wait, so it costs only the conversion; on a GPU it "
            "stalls the host until the device catches up, every step."
            if m.device == "cpu"
            else ""
        )
        out.append(
            Finding(
                code="host-sync",
                severity=_severity(share, "high") if m.device != "cpu" else "low",
                share=share,
                title=f"this line {what} on every step, forcing a host–device sync.{device_note}",
                fix=fix,
                location=_loc(sync.site),
                evidence={
                    "syncs_per_step": per_step,
                    "ms_per_step": _ms(ms),
                    "kinds": sorted(kinds),
                    "device": m.device,
                },
            )
        )
    return out


@_rule("dataloader-starved")
def dataloader_starved(m: Measurements, probes: Probes) -> list[Finding]:
    """The loop waits for the next batch for a large part of the step."""
    data_ms = m.phases_ms["data"]
    share = data_ms / m.step_ms
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
    compute_ms = max(0.0, m.step_ms - data_ms)
    spare = max(0.0, 1.0 - m.threads["intra_op"] / cores) if m.device == "cpu" else 1.0
    hidden = min(data_ms, compute_ms) * (spare if spare > 0 else 0.5)
    saving = max(hidden, data_ms - compute_ms) if compute_ms < data_ms else hidden
    saving = min(saving, data_ms)
    if saving < 0.08 * m.step_ms:
        return []
    return [
        Finding(
            code="dataloader-starved",
            severity=_severity(saving / m.step_ms),
            share=saving / m.step_ms,
            title=(
                f"the loop waits {data_ms:.1f} ms per step ({100 * share:.0f}% of the step) for "
                f"the DataLoader (num_workers={loader.num_workers})"
            ),
            fix=fix,
            location=_loc(loader.site or loader.iterated_at),
            evidence={
                "data_wait_ms": _ms(data_ms),
                "step_ms": _ms(m.step_ms),
                "num_workers": loader.num_workers,
                "cores": cores,
                "intra_op_threads": m.threads["intra_op"],
            },
        )
    ]


@_rule("fp32-matmul")
def fp32_matmul(m: Measurements, probes: Probes) -> list[Finding]:
    """Matrix products run in fp32 where bf16 (measured on this model) is faster."""
    fp32_ms = m.profile.matmul_ms_by_dtype.get("float32", 0.0)
    probe = probes.get("bf16")
    fwd = m.train_forward
    if probe is None or fwd is None or fp32_ms < 0.05 * m.step_ms or probe.ratio > 0.9:
        return []
    fb_ms = m.phases_ms["forward"] + m.phases_ms["backward"]
    saving = fb_ms * (1 - probe.ratio)
    share = saving / m.step_ms
    if share < 0.05:
        return []
    device = m.device
    fix = (
        f"wrap the forward and the loss in `with torch.autocast({device!r}, "
        "dtype=torch.bfloat16):` (or `Stoker(precision='bf16')`); weights and optimizer "
        "state stay fp32"
    )
    if device == "cuda":
        fix += "; at least `torch.set_float32_matmul_precision('high')` (TF32)"
    return [
        Finding(
            code="fp32-matmul",
            severity=_severity(share),
            share=share,
            title=(
                f"matrix products run in fp32 ({fp32_ms:.1f} ms per step, "
                f"{100 * fp32_ms / m.step_ms:.0f}% of the step); this model's forward+backward "
                f"measured {1 / probe.ratio:.1f}x faster under bf16 autocast"
            ),
            fix=fix,
            location=_loc(fwd.site),
            evidence={
                "fp32_matmul_ms": _ms(fp32_ms),
                "forward_backward_ms": _ms(fb_ms),
                "probe_fp32_ms": _ms(1e3 * probe.baseline_s),
                "probe_bf16_ms": _ms(1e3 * probe.variant_s),
            },
        )
    ]


@_rule("many-small-ops")
def many_small_ops(m: Measurements, probes: Probes) -> list[Finding]:
    """A line issues many tiny torch calls per step: a Python loop one batched op would replace."""
    attr = m.attribution
    if attr.steps == 0:
        return []
    out = []
    for line in attr.lines.values():
        calls = line.calls / attr.steps
        if calls < 64 or line.grad_zeroing * 2 >= line.calls:
            continue
        ms = 1e3 * line.seconds / attr.steps
        mean_us = 1e3 * ms / calls
        # The loop costs its calls, the Python between them, and in backward the autograd nodes
        # it created: this line's share of the window's time in nodes of those types (by
        # count). A batched op costs about what a handful of the small ones do.
        backward_ms = 0.0
        for node, count in line.grad_nodes.items():
            node_ms, node_calls = m.profile.backward_by_node.get(node, (0.0, 0.0))
            if node_calls > 0:
                backward_ms += node_ms * min(1.0, count / attr.steps / node_calls)
        loop_ms = 1e3 * (line.seconds + line.between_seconds) / attr.steps + backward_ms
        saving = loop_ms * (1 - min(1.0, len(line.names) / calls))
        share = saving / m.step_ms
        if share < 0.05 or mean_us > 200:
            continue
        top = ", ".join(f"{n} x{round(c / attr.steps)}" for n, c in line.names.most_common(3))
        out.append(
            Finding(
                code="many-small-ops",
                severity=_severity(share),
                share=share,
                title=(
                    f"this line runs {calls:.0f} small torch calls per step ({top}; "
                    f"{mean_us:.0f} µs each), a Python loop over tensor elements or slices"
                ),
                fix=(
                    "replace the loop by one batched op over the whole tensor: index with a tensor "
                    "(`x[idx]`), broadcast (`x * w`), reduce along a dim (`x.sum(dim=1)`), or "
                    "`torch._foreach_*` for per-parameter loops"
                ),
                location=_loc(line.site),
                evidence={
                    "calls_per_step": round(calls, 1),
                    "ms_per_step": _ms(ms),
                    "mean_call_us": round(mean_us, 1),
                    "ops_per_step": m.profile.ops_per_step,
                },
            )
        )
    return out


@_rule("small-batch")
def small_batch(m: Measurements, probes: Probes) -> list[Finding]:
    """The batch is too small to occupy the hardware: 4x the batch costs far less than 4x."""
    probe = probes.get("batch4")
    fwd = m.train_forward
    if probe is None or fwd is None:
        return []
    p = m.phases_ms
    r = probe.ratio  # time at 4B / (4 x time at B), for forward+backward
    fb = p["forward"] + p["backward"]
    per_sample_new = (4 * fb * r + p["optimizer"] + 4 * p["data"] + p["other"] + p["host_sync"]) / 4
    share = 1 - per_sample_new / m.step_ms
    if share < 0.25 or r > 0.75:
        return []
    loader = max(m.loaders, key=lambda x: x.wait_s) if m.loaders else None
    batch = loader.batch_size if loader is not None else None
    if batch is None:
        inputs = [*fwd.args, *fwd.kwargs.values()]
        first = next((a for a in inputs if hasattr(a, "shape") and a.dim()), None)
        batch = int(first.shape[0]) if first is not None else None
    site = loader.site if loader is not None and loader.site is not None else fwd.site
    return [
        Finding(
            code="small-batch",
            severity=_severity(share, "medium"),
            share=share,
            title=(
                f"batch size {batch} leaves the hardware idle: 4x the batch measured "
                f"{1 / r:.1f}x more samples per second in forward+backward"
            ),
            fix=(
                f"raise batch_size to {4 * batch if batch else '4x'} (scale the learning rate "
                "with it, linearly or by sqrt), or train a larger model for the same cost"
            ),
            location=_loc(site),
            evidence={
                "batch_size": batch,
                "forward_backward_ms": _ms(fb),
                "probe_1x_ms": _ms(1e3 * probe.baseline_s / 4),
                "probe_4x_ms": _ms(1e3 * probe.variant_s),
            },
        )
    ]


@_rule("unfused-optimizer")
def unfused_optimizer(m: Measurements, probes: Probes) -> list[Finding]:
    """The optimizer loops over parameters where its fused kernel (measured) is faster."""
    out = []
    for i, info in enumerate(m.optimizers):
        probe = probes.get(f"fused:{i}")
        if probe is None or probe.ratio > 0.8:
            continue
        opt_ms = 1e3 * info.step_s / m.steps
        saving = opt_ms * (1 - probe.ratio)
        share = saving / m.step_ms
        if share < 0.03:
            continue
        out.append(
            Finding(
                code="unfused-optimizer",
                severity=_severity(share),
                share=share,
                title=(
                    f"{info.name} steps {info.n_tensors} tensors one by one ({opt_ms:.1f} ms per "
                    f"step); its fused kernel measured {1 / probe.ratio:.1f}x faster here"
                ),
                fix=f"torch.optim.{info.name}(..., fused=True)",
                location=_loc(info.site or info.step_site),
                evidence={
                    "optimizer_ms": _ms(opt_ms),
                    "probe_ms": _ms(1e3 * probe.baseline_s),
                    "probe_fused_ms": _ms(1e3 * probe.variant_s),
                    "tensors": info.n_tensors,
                },
            )
        )
    return out


@_rule("recompiles")
def recompiles(m: Measurements, probes: Probes) -> list[Finding]:
    """torch.compile keeps recompiling after warm-up, or its graph breaks."""
    before, after = m.compile.get("before") or {}, m.compile.get("after") or {}
    if not after:
        return []
    site = next((s for s in reversed(m.compile_sites) if s is not None), None)
    out = []
    frames = after["frames"] - before.get("frames", 0)
    attach = m.compile.get("attach") or {}
    gave_up = after.get("limit_hits", 0) - attach.get("limit_hits", 0)
    if gave_up > 0 and frames == 0:
        out.append(
            Finding(
                code="recompiles",
                severity="high",
                share=None,
                title=(
                    f"torch.compile recompiled a function until its recompile_limit and gave up "
                    f"({gave_up} time(s)): that code now runs uncompiled, every step"
                ),
                fix=(
                    "something it guards on changes every step (a Python number argument, a new "
                    "shape): pass changing numbers as tensors, pad shapes to a few buckets, or "
                    "`torch.compile(..., dynamic=True)`; TORCH_LOGS=recompiles shows the guard"
                ),
                location=_loc(site),
                evidence={"recompile_limit_hits": gave_up},
            )
        )
    if frames > 0:
        ms = 1e3 * (after["compile_s"] - before.get("compile_s", 0.0)) / m.steps
        share = min(1.0, ms / m.step_ms)
        out.append(
            Finding(
                code="recompiles",
                severity=_severity(share, "high"),
                share=share,
                title=(
                    f"torch.compile compiled {frames} frame(s) during the {m.steps} profiled "
                    f"steps, after warm-up ({ms:.1f} ms of compiling per step)"
                ),
                fix=(
                    "something it guards on changes every step (a Python number argument, a new "
                    "shape): pass changing numbers as tensors, pad shapes to a few buckets, or "
                    "`torch.compile(..., dynamic=True)`; TORCH_LOGS=recompiles shows the guard"
                ),
                location=_loc(site),
                evidence={"frames_compiled": frames, "compile_ms_per_step": _ms(ms)},
            )
        )
    # Graph breaks happen while compiling (warm-up): count those since the doctor attached.
    since = (m.compile.get("attach") or {}).get("graph_breaks", {})
    breaks = {k: v - since.get(k, 0) for k, v in after.get("graph_breaks", {}).items()}
    breaks = {k: v for k, v in breaks.items() if v > 0}
    if breaks:
        reason, count = max(breaks.items(), key=lambda kv: kv[1])
        first_line = str(reason).strip().splitlines()[0][:160]
        out.append(
            Finding(
                code="recompiles",
                severity="medium",
                share=None,
                title=f"torch.compile graph breaks ({sum(breaks.values())}): {first_line}",
                fix=(
                    "move the unsupported call (print, .item(), data-dependent Python branch) out "
                    "of the compiled function; `torch._dynamo.explain(fn)(*args)` lists each break"
                ),
                location=_loc(site),
                evidence={"graph_breaks": sum(breaks.values()), "top_reason_count": count},
            )
        )
    return out


@_rule("no-pin-memory")
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
            severity=_severity(share),
            share=share,
            title=(
                f"host-to-device copies from pageable memory take {prof.h2d_pageable_ms:.1f} ms "
                "per step"
            ),
            fix=(
                "DataLoader(..., pin_memory=True) and `batch.to(device, non_blocking=True)` (or "
                "stoker.prepare, which does both)"
            ),
            location=_loc(loaders[0].site or loaders[0].iterated_at),
            evidence={"h2d_ms": _ms(prof.h2d_ms), "h2d_pageable_ms": _ms(prof.h2d_pageable_ms)},
        )
    ]


@_rule("cpu-threads")
def cpu_threads(m: Measurements, probes: Probes) -> list[Finding]:
    """CPU intra-op threads below (idle cores) or above (oversubscribed) the usable cores."""
    probe = probes.get("threads")
    if m.device != "cpu" or probe is None or probe.ratio > 0.9:
        return []
    t = m.threads
    fb = m.phases_ms["forward"] + m.phases_ms["backward"]
    saving = fb * (1 - probe.ratio)
    share = saving / m.step_ms
    if share < 0.05:
        return []
    where = t["set_at"][0] if t["set_at"] else None
    source = (
        "torch.set_num_threads"
        if where
        else (f"OMP_NUM_THREADS={t['omp_env']}" if t["omp_env"] else "the default")
    )
    state = "idle cores" if t["intra_op"] < t["cores"] else "oversubscribed cores"
    return [
        Finding(
            code="cpu-threads",
            severity=_severity(share),
            share=share,
            title=(
                f"{t['intra_op']} intra-op threads on {t['cores']} usable cores ({state}, set by "
                f"{source}); forward+backward measured {1 / probe.ratio:.1f}x faster at "
                f"{t['cores']} threads"
            ),
            fix=(
                f"torch.set_num_threads({t['cores']}) (or remove the call / unset "
                "OMP_NUM_THREADS); with DataLoader workers, leave them a core each"
            ),
            location=_loc(where),
            evidence={
                "intra_op_threads": t["intra_op"],
                "cores": t["cores"],
                "probe_ms": _ms(1e3 * probe.baseline_s),
                "probe_all_cores_ms": _ms(1e3 * probe.variant_s),
            },
        )
    ]


@_rule("grad-zeroing")
def grad_zeroing(m: Measurements, probes: Probes) -> list[Finding]:
    """Gradients are overwritten with zeros (then added into) instead of being dropped."""
    out = []
    acc = m.profile.accumulate_ms
    fix = (
        "optimizer.zero_grad() with the default set_to_none=True: it drops the gradients "
        "instead of writing zeros, and the next backward writes them instead of adding"
    )
    for site, set_to_none, ms in m.zero_grads:
        if set_to_none:
            continue
        saving = ms + acc
        share = saving / m.step_ms
        if share < 0.01:
            continue
        out.append(
            Finding(
                code="grad-zeroing",
                severity=_severity(share),
                share=share,
                title=(
                    f"zero_grad(set_to_none=False) writes zeros into every gradient ({ms:.2f} ms "
                    f"per step) and backward then adds into them ({acc:.2f} ms)"
                ),
                fix=fix,
                location=_loc(site),
                evidence={"zero_ms": _ms(ms), "accumulate_ms": _ms(acc)},
            )
        )
    attr = m.attribution
    for line in attr.lines.values():
        if attr.steps == 0 or line.grad_zeroing < attr.steps:
            continue
        ms = 1e3 * line.seconds / attr.steps
        saving = ms + acc
        share = saving / m.step_ms
        if share < 0.01:
            continue
        out.append(
            Finding(
                code="grad-zeroing",
                severity=_severity(share),
                share=share,
                title=(
                    f"gradients are zeroed by hand ({line.grad_zeroing / attr.steps:.0f} calls, "
                    f"{ms:.2f} ms per step) and backward then adds into them ({acc:.2f} ms)"
                ),
                fix=fix,
                location=_loc(line.site),
                evidence={"zero_ms": _ms(ms), "accumulate_ms": _ms(acc)},
            )
        )
    return out


@_rule("eval-without-no-grad")
def eval_without_no_grad(m: Measurements, probes: Probes) -> list[Finding]:
    """A model in eval mode runs with autograd on: graph and activations kept for nothing."""
    out = []
    for i, f in enumerate(m.forwards):
        if f.training or not f.grad_enabled:
            continue
        if next(iter(f.module.parameters()), None) is None:
            continue
        ms = 1e3 * f.seconds / m.steps
        probe = probes.get(f"no_grad:{i}")
        saving = max(0.0, ms * (1 - probe.ratio)) if probe is not None else None
        share = saving / m.step_ms if saving is not None else None
        out.append(
            Finding(
                code="eval-without-no-grad",
                severity=_severity(share, "medium"),
                share=share,
                title=(
                    f"{type(f.module).__name__} runs in eval mode with autograd on "
                    f"({f.calls} call(s), {ms:.1f} ms per step): it records a graph and keeps "
                    "activations that no backward will use"
                ),
                fix="wrap the evaluation in `with torch.no_grad():` (or `torch.inference_mode()`)",
                location=_loc(f.site),
                evidence={
                    "eval_forward_ms_per_step": _ms(ms),
                    **(
                        {
                            "probe_grad_ms": _ms(1e3 * probe.baseline_s),
                            "probe_no_grad_ms": _ms(1e3 * probe.variant_s),
                        }
                        if probe
                        else {}
                    ),
                },
            )
        )
    return out


@_rule("padding-waste")
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
            severity=_severity(share),
            share=share,
            title=f"{100 * frac:.0f}% of the tokens in each batch are padding",
            fix=(
                "group by length (stoker.data length-grouped / token-budget sampler) or pack "
                "sequences (stoker.data.packing)"
            ),
            location=_loc(acc.get("site")),
            evidence={"padding_fraction": round(frac, 3)},
        )
    ]


@_rule("rank-imbalance")
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
            severity=_severity(share),
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
            location=_loc(acc.get("site")),
            evidence={
                "real_tokens_per_rank": [round(x, 1) for x in per_rank],
                "wait_fraction": round(wait, 3),
                "imbalance": acc.get("imbalance"),
            },
        )
    ]


def diagnose(m: Measurements, probes: Probes) -> list[Finding]:
    """All findings, most costly first (unmeasured ones last). A failing rule is skipped."""
    findings: list[Finding] = []
    for code, rule in RULES.items():
        try:
            findings.extend(rule(m, probes))
        except Exception as exc:  # one broken rule must not cost the user the others
            log.warning("doctor rule %s failed: %r", code, exc)
    return sorted(findings, key=lambda f: -(f.share if f.share is not None else -1.0))
