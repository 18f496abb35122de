"""Probes: measure a suggested fix on the user's own model before suggesting it.

A rule's estimated saving must be what applying the fix gives, so instead of assuming "bf16 is
8x faster" the doctor times the captured model (the costliest training forward of the window,
with the batch it was called on) under each candidate change: bf16 autocast, a 4x batch, all
cores, ``torch.no_grad()`` for eval forwards, a fused optimizer. Each probe restores what it
touched (``.grad``, buffers such as BatchNorm statistics, RNG state, thread count, training mode).
Variants are timed interleaved and the minimum is kept, so a noisy neighbour biases neither side.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from stoker.doctor.measurements import ForwardInfo, Measurements
from stoker.runtime.hardware import bf16_is_fast
from stoker.runtime.model import is_sharded

__all__ = ["Probe", "run_probes", "time_interleaved"]

log = logging.getLogger(__name__)

_BUDGET_S = 0.6  # wall time per probe, all variants together


@dataclass(frozen=True, slots=True)
class Probe:
    """Seconds per call of a baseline and a variant; ``ratio`` = variant / baseline."""

    baseline_s: float
    variant_s: float
    detail: str

    @property
    def ratio(self) -> float:
        return self.variant_s / self.baseline_s if self.baseline_s > 0 else 1.0


def time_interleaved(fns: list[Callable[[], Any]], budget_s: float = _BUDGET_S) -> list[float]:
    """Min seconds per call of each function, timed in alternating rounds."""
    best = [float("inf")] * len(fns)
    for fn in fns:  # warm-up (and a first estimate of the cost)
        start = time.perf_counter()
        fn()
        best[fns.index(fn)] = time.perf_counter() - start
    per_round = sum(best)
    rounds = int(max(5, min(15, budget_s / max(per_round, 1e-6))))
    for r in range(rounds):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            start = time.perf_counter()
            fns[i]()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for item in out:
            found = _first_tensor(item)
            if found is not None:
                return found
    return getattr(out, "logits", None) if hasattr(out, "logits") else None


@contextlib.contextmanager
def _preserved(module: torch.nn.Module) -> Iterator[None]:
    """Put back every piece of state a throwaway forward/backward can change."""
    params = list(module.parameters())
    grads = [p.grad for p in params]
    buffers = [b.detach().clone() for b in module.buffers()]
    training = module.training
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in zip(module.buffers(), buffers, strict=False):
                b.copy_(saved)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        module.train(training)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        torch.set_num_threads(threads)


_SEQ_FIRST = (
    torch.nn.RNNBase,
    torch.nn.Transformer,
    torch.nn.TransformerEncoderLayer,
    torch.nn.TransformerDecoderLayer,
    torch.nn.MultiheadAttention,
)


def batch_dim(module: torch.nn.Module) -> int:
    """1 for models built on torch's sequence-first layers (``nn.LSTM``/``GRU``/``RNN``,
    ``nn.Transformer*``, ``nn.MultiheadAttention`` with ``batch_first=False``), else 0: their
    inputs and recurrent state are ``[seq, batch, ...]`` / ``[layers, batch, ...]``."""
    for sub in module.modules():
        if isinstance(sub, _SEQ_FIRST) and not getattr(sub, "batch_first", False):
            return 1
    return 0


def _scaled(
    args: tuple[Any, ...], kwargs: dict[str, Any], factor: int, dim: int = 0
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Repeat every tensor that shares the first tensor's batch size (along ``dim``) ``factor``
    times along ``dim``; tuples (an LSTM's ``(h, c)``) are grown element by element."""
    first = _first_tensor(args)
    if first is None:
        first = _first_tensor(kwargs)
    if first is None or first.dim() <= dim:
        raise ValueError("no batched tensor input")
    batch = first.shape[dim]

    def grow(a: Any) -> Any:
        if isinstance(a, torch.Tensor) and a.dim() > dim and a.shape[dim] == batch:
            return torch.cat([a] * factor, dim=dim)
        if isinstance(a, tuple) and not hasattr(a, "_fields"):
            return tuple(grow(x) for x in a)
        return a

    return tuple(grow(a) for a in args), {k: grow(v) for k, v in kwargs.items()}


def _step_fn(
    fwd: ForwardInfo,
    *,
    inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
    autocast: torch.dtype | None = None,
    threads: int | None = None,
    backward: bool = True,
    grad: bool = True,
) -> Callable[[], None]:
    module = fwd.module
    device = next(module.parameters()).device.type
    args, kwargs = (fwd.args, fwd.kwargs) if inputs is None else inputs
    params = list(module.parameters())

    def run() -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        for p in params:
            p.grad = None
        ctx = (
            torch.autocast(device, dtype=autocast)
            if autocast is not None
            else contextlib.nullcontext()
        )
        with torch.set_grad_enabled(grad), ctx:
            out = module(*args, **kwargs)
        if backward:
            loss = _first_tensor(out)
            if loss is not None and loss.requires_grad:
                loss.float().mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    return run


def _probe(
    fwd: ForwardInfo, variants: dict[str, dict[str, Any]], base: dict[str, Any]
) -> list[float]:
    with _preserved(fwd.module):
        fwd.module.train(fwd.training)
        fns = [_step_fn(fwd, **base)] + [_step_fn(fwd, **kw) for kw in variants.values()]
        return time_interleaved(fns)


def _fused_probe(info: Any) -> Probe | None:
    """Time the optimizer's step as configured and with ``fused=True``, on copies of its params."""
    opt = info.optimizer
    cls = type(opt)

    def clone_groups() -> list[dict[str, Any]]:
        groups = []
        for group in opt.param_groups:
            clones = []
            for p in group["params"]:
                c = torch.nn.Parameter(p.detach().clone())
                c.grad = (
                    p.grad.detach().clone() if p.grad is not None else torch.randn_like(c) * 1e-3
                )
                clones.append(c)
            hyper = {k: v for k, v in group.items() if k not in ("params", "fused", "foreach")}
            groups.append({"params": clones, **hyper})
        return groups

    if not any(g["params"] for g in opt.param_groups):
        return None
    try:
        base = cls(
            clone_groups(),
            **_kw(opt, fused=opt.defaults.get("fused"), foreach=opt.defaults.get("foreach")),
        )
        fused = cls(clone_groups(), **_kw(opt, fused=True, foreach=None))
    except (TypeError, RuntimeError, ValueError) as exc:  # class without a fused implementation
        log.debug("no fused variant of %s: %s", cls.__name__, exc)
        return None
    t_base, t_fused = time_interleaved([base.step, fused.step])
    return Probe(t_base, t_fused, f"{cls.__name__}.step() as configured vs fused=True")


def _kw(opt: Any, **flags: Any) -> dict[str, Any]:
    return {k: v for k, v in flags.items() if k in opt.defaults}


def run_probes(m: Measurements) -> dict[str, Probe]:
    """The probes relevant to what the window showed. Failures skip a probe, never the report."""
    out: dict[str, Probe] = {}
    fwd = m.train_forward
    prof = m.profile
    jobs: list[tuple[str, Callable[[], Probe | None]]] = []
    # A sharded (FSDP) model's forward all-gathers from every rank: it cannot be re-run on
    # the main rank alone, so it is not probed.
    if (
        fwd is not None
        and next(fwd.module.parameters(), None) is not None
        and not is_sharded(fwd.module)
    ):
        device = m.device
        fp32_ms = prof.matmul_ms_by_dtype.get("float32", 0.0)
        # Only where bf16 products are measured fast: elsewhere bf16 is emulated and one probe
        # step could cost 40x a training step.
        if fp32_ms > 0.05 * m.step_ms and bf16_is_fast(device):

            def bf16(fwd: ForwardInfo = fwd) -> Probe:
                t32, t16 = _probe(fwd, {"bf16": {"autocast": torch.bfloat16}}, {})
                return Probe(t32, t16, "forward+backward fp32 vs bf16 autocast")

            jobs.append(("bf16", bf16))

        def batch4(fwd: ForwardInfo = fwd) -> Probe:
            big = _scaled(fwd.args, fwd.kwargs, 4, batch_dim(fwd.module))
            t1, t4 = _probe(fwd, {"x4": {"inputs": big}}, {})
            return Probe(4 * t1, t4, "forward+backward at 4x the batch vs 4 calls at 1x")

        jobs.append(("batch4", batch4))

        cores = m.threads["cores"]
        if device == "cpu" and m.threads["intra_op"] != cores:

            def threads(fwd: ForwardInfo = fwd, cores: int = cores) -> Probe:
                now = m.threads["intra_op"]
                t_now, t_all = _probe(fwd, {"all": {"threads": cores}}, {"threads": now})
                return Probe(t_now, t_all, f"forward+backward at {now} vs {cores} threads")

            jobs.append(("threads", threads))
    for i, f in enumerate(m.forwards):
        if not f.training and f.grad_enabled and next(f.module.parameters(), None) is not None:

            def nograd(f: ForwardInfo = f) -> Probe:
                t_g, t_n = _probe(
                    f,
                    {"no_grad": {"grad": False, "backward": False}},
                    {"backward": False},
                )
                return Probe(t_g, t_n, "eval forward with grad vs under torch.no_grad()")

            jobs.append((f"no_grad:{i}", nograd))
    for i, info in enumerate(m.optimizers):
        if not info.fused:
            jobs.append((f"fused:{i}", functools.partial(_fused_probe, info)))
    # Probe at the thread count the run used (the script runner has restored its own by now).
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(m.threads["intra_op"])
    try:
        _run_jobs(jobs, out)
    finally:
        torch.set_num_threads(saved_threads)
    return out


def _run_jobs(jobs: list[tuple[str, Callable[[], Probe | None]]], out: dict[str, Probe]) -> None:
    for name, job in jobs:
        try:
            result = job()
        except Exception as exc:  # a model we cannot re-run: the rule falls back or stays quiet
            log.debug("doctor probe %s failed: %r", name, exc)
            continue
        if result is not None:
            out[name] = result
