"""Rules about how the loop is written: host syncs, gradient zeroing, eval without no_grad, an
optimizer that loops over its tensors."""

from __future__ import annotations

from typing import Any

from stoker.doctor.measurements import Measurements
from stoker.doctor.rules._base import Finding, Probes, location, rounded_ms, rule, severity_of

__all__: list[str] = []  # rules register themselves in RULES


@rule("host-sync")
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
                severity=severity_of(share, "high") if m.device != "cpu" else "low",
                share=share,
                title=f"this line {what} on every step, forcing a host–device sync.{device_note}",
                fix=fix,
                location=location(sync.site),
                evidence={
                    "syncs_per_step": per_step,
                    "ms_per_step": rounded_ms(ms),
                    "kinds": sorted(kinds),
                    "device": m.device,
                },
            )
        )
    return out


@rule("grad-zeroing")
def grad_zeroing(m: Measurements, probes: Probes) -> list[Finding]:
    """Gradients are overwritten with zeros (then added into) instead of being dropped."""
    out = []
    acc = m.profile.accumulate_ms
    fix = (
        "optimizer.zero_grad() with the default set_to_none=True: it drops the gradients "
        "instead of writing zeros, and the next backward writes them instead of adding"
    )

    def finding(ms: float, what: str, site: Any) -> None:
        share = (ms + acc) / m.step_ms  # zeroing plus the accumulate backward then does
        if share < 0.01:
            return
        out.append(
            Finding(
                code="grad-zeroing",
                severity=severity_of(share),
                share=share,
                title=f"{what} ({ms:.2f} ms per step) and backward then adds into them "
                f"({acc:.2f} ms)",
                fix=fix,
                location=location(site),
                evidence={"zero_ms": rounded_ms(ms), "accumulate_ms": rounded_ms(acc)},
            )
        )

    for site, set_to_none, ms in m.zero_grads:
        if not set_to_none:
            finding(ms, "zero_grad(set_to_none=False) writes zeros into every gradient", site)
    attr = m.attribution
    for line in attr.lines.values():
        if attr.steps == 0 or line.grad_zeroing < attr.steps:
            continue
        calls = line.grad_zeroing / attr.steps
        finding(
            1e3 * line.seconds / attr.steps,
            f"gradients are zeroed by hand ({calls:.0f} calls per step)",
            line.site,
        )
    return out


@rule("eval-without-no-grad")
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
                severity=severity_of(share, "medium"),
                share=share,
                title=(
                    f"{type(f.module).__name__} runs in eval mode with autograd on "
                    f"({f.calls} call(s), {ms:.1f} ms per step): it records a graph and keeps "
                    "activations that no backward will use"
                ),
                fix="wrap the evaluation in `with torch.no_grad():` (or `torch.inference_mode()`)",
                location=location(f.site),
                evidence={
                    "eval_forward_ms_per_step": rounded_ms(ms),
                    **(
                        {
                            "probe_grad_ms": rounded_ms(1e3 * probe.baseline_s),
                            "probe_no_grad_ms": rounded_ms(1e3 * probe.variant_s),
                        }
                        if probe
                        else {}
                    ),
                },
            )
        )
    return out


@rule("unfused-optimizer")
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
                severity=severity_of(share),
                share=share,
                title=(
                    f"{info.name} steps {info.n_tensors} tensors one by one ({opt_ms:.1f} ms per "
                    f"step); its fused kernel measured {1 / probe.ratio:.1f}x faster here"
                ),
                fix=f"torch.optim.{info.name}(..., fused=True)",
                location=location(info.site or info.step_site),
                evidence={
                    "optimizer_ms": rounded_ms(opt_ms),
                    "probe_ms": rounded_ms(1e3 * probe.baseline_s),
                    "probe_fused_ms": rounded_ms(1e3 * probe.variant_s),
                    "tensors": info.n_tensors,
                },
            )
        )
    return out
