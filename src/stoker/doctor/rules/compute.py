"""Rules about the compute itself: matrix products in the precision this hardware is slow at,
many small ops, small batches, CPU threads, torch.compile recompilations."""

from __future__ import annotations

from stoker.doctor.measurements import Measurements
from stoker.doctor.rules._base import Finding, Probes, location, rounded_ms, rule, severity_of
from stoker.runtime.hardware import matmul_speed

__all__: list[str] = []  # rules register themselves in RULES


@rule("fp32-matmul")
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
            severity=severity_of(share),
            share=share,
            title=(
                f"matrix products run in fp32 ({fp32_ms:.1f} ms per step, "
                f"{100 * fp32_ms / m.step_ms:.0f}% of the step); this model's forward+backward "
                f"measured {1 / probe.ratio:.1f}x faster under bf16 autocast"
            ),
            fix=fix,
            location=location(fwd.site),
            evidence={
                "fp32_matmul_ms": rounded_ms(fp32_ms),
                "forward_backward_ms": rounded_ms(fb_ms),
                "probe_fp32_ms": rounded_ms(1e3 * probe.baseline_s),
                "probe_bf16_ms": rounded_ms(1e3 * probe.variant_s),
            },
        )
    ]


@rule("bf16-matmul")
def bf16_matmul(m: Measurements, probes: Probes) -> list[Finding]:
    """Matrix products run in bf16 on hardware that emulates it (an AVX2-only CPU, say)."""
    if m.device not in ("cpu", "cuda"):
        return []
    bf16_ms = m.profile.matmul_ms_by_dtype.get("bfloat16", 0.0)
    speed = matmul_speed(m.device)
    if speed.favours_bf16 or bf16_ms < 0.05 * m.step_ms or speed.bf16_speedup <= 0:
        return []
    # Not re-timed on the model: the hardware probe already says what fp32 buys, and the bf16
    # products would cost a probe step as slow as the training step. The saving is the bf16
    # product time less what it costs at fp32's rate.
    saving = bf16_ms * (1 - speed.bf16_speedup) if speed.bf16_speedup < 1 else 0.0
    # The profiler sums kernel time over threads: never more than forward+backward took.
    saving = min(saving, m.phases_ms["forward"] + m.phases_ms["backward"])
    share = min(1.0, saving / m.step_ms)
    if share < 0.05:
        return []
    fwd = m.train_forward
    return [
        Finding(
            code="bf16-matmul",
            severity=severity_of(share),
            share=share,
            title=(
                f"matrix products run in bf16 ({bf16_ms:.1f} ms per step, "
                f"{100 * bf16_ms / m.step_ms:.0f}% of the step), but this {m.device} runs bf16 "
                f"products {1 / speed.bf16_speedup:.0f}x slower than fp32 ("
                + (
                    f"{speed.bf16_gflops:.1f} vs {speed.fp32_gflops:.0f} GFLOP/s measured)"
                    if speed.measured
                    else f"{speed.describe()})"
                )
            ),
            fix=(
                "compute in fp32 here: drop the bf16 `torch.autocast` (or use "
                "`Stoker(precision='auto')`, which measures this); keep bf16 for machines "
                "with AMX, AVX512-BF16 or a GPU"
            ),
            location=location(fwd.site) if fwd is not None else None,
            evidence={
                "bf16_matmul_ms": rounded_ms(bf16_ms),
                "bf16_speedup": round(speed.bf16_speedup, 4),
                "probe_source": speed.source,
            },
        )
    ]


@rule("many-small-ops")
def many_small_ops(m: Measurements, probes: Probes) -> list[Finding]:
    """A line issues many tiny torch calls per step: a Python loop one batched op would replace."""
    attr = m.attribution
    if attr.steps == 0:
        return []
    out = []
    for line in attr.lines.values():
        # Per micro-batch: under accumulation a model's own lines run once per micro-batch, and
        # 40 micro-batches of one layer_norm call are no Python loop.
        calls = line.calls / attr.steps / m.micro_batches
        if calls < 64 or line.grad_zeroing * 2 >= line.calls:
            continue
        ms = 1e3 * line.seconds / attr.steps
        mean_us = 1e3 * ms / (calls * m.micro_batches)
        # The loop costs its calls, the Python between them, and in backward the autograd nodes
        # it created: this line's share of the window's time in nodes of those types (by
        # count). A batched op costs about what a handful of the small ones do.
        backward_ms = 0.0
        for node, count in line.grad_nodes.items():
            node_ms, node_calls = m.profile.backward_by_node.get(node, (0.0, 0.0))
            if node_calls > 0:
                backward_ms += node_ms * min(1.0, count / attr.steps / node_calls)
        loop_ms = 1e3 * (line.seconds + line.between_seconds) / attr.steps + backward_ms
        saving = loop_ms * (1 - min(1.0, len(line.names) / calls))  # calls per micro-batch
        share = saving / m.step_ms
        if share < 0.05 or mean_us > 200:
            continue
        per = attr.steps * m.micro_batches
        top = ", ".join(f"{n} x{round(c / per)}" for n, c in line.names.most_common(3))
        unit = "micro-batch" if m.micro_batches > 1 else "step"
        out.append(
            Finding(
                code="many-small-ops",
                severity=severity_of(share),
                share=share,
                title=(
                    f"this line runs {calls:.0f} small torch calls per {unit} ({top}; "
                    f"{mean_us:.0f} µs each), a Python loop over tensor elements or slices"
                ),
                fix=(
                    "replace the loop by one batched op over the whole tensor: index with a tensor "
                    "(`x[idx]`), broadcast (`x * w`), reduce along a dim (`x.sum(dim=1)`), or "
                    "`torch._foreach_*` for per-parameter loops"
                ),
                location=location(line.site),
                evidence={
                    "calls_per_micro_batch": round(calls, 1),
                    "micro_batches_per_step": round(m.micro_batches, 2),
                    "ms_per_step": rounded_ms(ms),
                    "mean_call_us": round(mean_us, 1),
                    "ops_per_step": m.profile.ops_per_step,
                },
            )
        )
    return out


@rule("small-batch")
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
            severity=severity_of(share, "medium"),
            share=share,
            title=(
                f"batch size {batch} leaves the hardware idle: 4x the batch measured "
                f"{1 / r:.1f}x more samples per second in forward+backward"
            ),
            fix=_small_batch_fix(batch, m.micro_batches),
            location=location(site),
            evidence={
                "batch_size": batch,
                "forward_backward_ms": rounded_ms(fb),
                "probe_1x_ms": rounded_ms(1e3 * probe.baseline_s / 4),
                "probe_4x_ms": rounded_ms(1e3 * probe.variant_s),
            },
        )
    ]


def _small_batch_fix(batch: int | None, micro_batches: float) -> str:
    bigger = f"{4 * batch}" if batch else "4x"
    accumulation = round(micro_batches)
    if accumulation >= 4:  # keep the effective batch: what the run trains on stays the same
        return (
            f"raise the micro-batch to {bigger} and divide the gradient-accumulation steps by "
            f"4 ({accumulation} -> {accumulation // 4}): the same effective batch, so keep the "
            "learning rate"
        )
    return (
        f"raise batch_size to {bigger} (scale the learning rate with it, linearly or by sqrt), "
        "or train a larger model for the same cost"
    )


@rule("cpu-threads")
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
            severity=severity_of(share),
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
            location=location(where),
            evidence={
                "intra_op_threads": t["intra_op"],
                "cores": t["cores"],
                "probe_ms": rounded_ms(1e3 * probe.baseline_s),
                "probe_all_cores_ms": rounded_ms(1e3 * probe.variant_s),
            },
        )
    ]


@rule("recompiles")
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
                location=location(site),
                evidence={"recompile_limit_hits": gave_up},
            )
        )
    if frames > 0:
        ms = 1e3 * (after["compile_s"] - before.get("compile_s", 0.0)) / m.steps
        share = min(1.0, ms / m.step_ms)
        out.append(
            Finding(
                code="recompiles",
                severity=severity_of(share, "high"),
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
                location=location(site),
                evidence={"frames_compiled": frames, "compile_ms_per_step": rounded_ms(ms)},
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
                location=location(site),
                evidence={"graph_breaks": sum(breaks.values()), "top_reason_count": count},
            )
        )
    return out
