"""The doctor's session: skip warm-up, profile a window, attribute lines, then get out of the way.

The runtime (or the ``stoker doctor`` script runner) calls :meth:`Doctor.step` once per optimizer
step; outside the window that is an integer increment and a comparison. Step boundaries come from
torch's global optimizer step hooks when ``attach(auto_step=True)``.

Timeline for the default config (5 warm-up, 5 profiled, 2 attribution steps)::

    step  1 2 3 4 5 | 6 7 8 9 10 | 11 12 | 13 ...
          warm-up     profiled     lines   full speed (or stop: the script runner's default)
          (steps 3-5 give the unprofiled step time)
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from stoker.doctor import hooks
from stoker.doctor.attribution import Attribution, AttributionMode, CudaSyncWatch
from stoker.doctor.capture import ProfileSummary, summarize_events
from stoker.doctor.config import DoctorConfig
from stoker.doctor.frames import Site, caller_site
from stoker.doctor.measurements import ForwardInfo, LoaderInfo, Measurements, OptimizerInfo
from stoker.errors import StokerError

__all__ = ["Doctor", "WindowComplete", "active_doctor"]

log = logging.getLogger(__name__)

_ACTIVE: list[Doctor] = []  # at most one attached doctor per process (hooks are global)


def active_doctor() -> Doctor | None:
    """The doctor attached in this process, if any (a run under ``stoker doctor`` has one: the
    runtime should then not attach its own)."""
    return _ACTIVE[0] if _ACTIVE else None


class WindowComplete(BaseException):
    """Raised from the optimizer hook to end a script after the window (``stop_after_window``).

    A BaseException so that a user's ``except Exception`` does not swallow it.
    """


def _dynamo_snapshot() -> dict[str, Any]:
    """torch.compile's counters, if torch._dynamo was imported by the user (we never import it)."""
    if "torch._dynamo" not in sys.modules:
        return {}
    from torch._dynamo.utils import compilation_time_metrics, counters

    return {
        "frames": int(counters["frames"].get("total", 0)),
        "graphs": int(counters["stats"].get("unique_graphs", 0)),
        "graph_breaks": dict(counters["graph_break"]),
        "compile_s": float(sum(compilation_time_metrics.get("_compile.compile_inner", []))),
        "limit_hits": sum(
            n for reason, n in counters["unimplemented"].items() if "recompile limit" in reason
        ),
    }


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _without_ddp(module: Any) -> Any:
    """``module`` with its ``DistributedDataParallel`` wrapper taken off, for the probes.

    The probes re-run the captured model forward and backward on the main rank alone; through
    DDP that issues collectives (gradient all-reduce, buffer broadcast) the other ranks never
    join, and the run hangs. stoker's prepared model gives itself without DDP (same autocast,
    see ``PreparedModel.without_ddp``); a compiled DDP model gives the plain module inside
    (probed eagerly); a compiled model without DDP stays compiled.
    """
    from torch.nn.parallel import DistributedDataParallel

    from stoker.runtime.model import PreparedModel

    if isinstance(module, PreparedModel):
        return module.without_ddp()
    if isinstance(module, DistributedDataParallel):
        return _without_ddp(module.module)
    if "torch._dynamo" in sys.modules:  # only then can a module be compiled
        from torch._dynamo.eval_frame import OptimizedModule

        if isinstance(module, OptimizedModule):
            inner = _without_ddp(module._orig_mod)
            return module if inner is module._orig_mod else inner
    return module


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Mute file descriptor 2 while the profiler starts or stops: kineto prints its own
    ``USDT: ... profiler_start`` lines there, straight from C++, into every run's output."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (an embedded interpreter): nothing to mute
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class Doctor:
    """Profile a window of a training run and explain what to change.

    Example (a plain loop; ``stoker doctor script.py`` does the same for a whole script):

    >>> import torch
    >>> model = torch.nn.Linear(4, 4)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> config = DoctorConfig(warmup_steps=1, window_steps=2, attribution_steps=1, probes=False)
    >>> doctor = Doctor(config).attach()
    >>> for step in range(6):
    ...     model(torch.randn(8, 4)).pow(2).mean().backward()
    ...     optimizer.step()
    ...     optimizer.zero_grad()
    >>> doctor.detach()
    >>> report = doctor.report()
    >>> report.codes, report.summary["profiled_steps"]
    ([], 2)
    """

    stop_exception = WindowComplete

    def __init__(self, config: DoctorConfig | None = None) -> None:
        self.config = config or DoctorConfig()
        self.steps = 0
        self.failed: BaseException | None = None
        self.compile_sites: list[Site | None] = []
        self.thread_sites: list[tuple[Site | None, int]] = []
        self.in_window = False
        self.active = False
        self._auto_step = False
        self._undo: Any = None
        self._undo_window: Any = None
        self._next = 0
        self._phase = "idle"
        self._t_last = 0.0
        self._baseline: list[float] = []
        self._data_steps: list[float] = []  # data wait of each profiled step, seconds
        self._window: list[float] = []
        self._backwards = 0  # backward passes in the window
        self._acc: dict[str, float] = {
            "data": 0.0,
            "forward": 0.0,
            "backward": 0.0,
            "optimizer": 0.0,
        }
        self._loaders: dict[int, LoaderInfo] = {}
        self._optimizers: dict[int, OptimizerInfo] = {}
        self._forwards: dict[tuple[int, bool, bool], ForwardInfo] = {}
        self._fwd_stack: list[tuple[Any, tuple[Any, ...], Site | None, bool, bool]] = []
        self._zero: dict[tuple[Site | None, bool], float] = {}
        self._primary: int | None = None
        self._opt_t0 = 0.0
        self._loop_site: Site | None = None
        self._prof: Any = None
        self._summary: ProfileSummary | None = None
        self._attr = Attribution()
        self._mode: AttributionMode | None = None
        self._cuda_watch: CudaSyncWatch | None = None
        self._dynamo_was_disabled = False
        self._dyn_attach: dict[str, Any] = {}
        self._dyn0: dict[str, Any] = {}
        self._dyn1: dict[str, Any] = {}
        self._report: Any = None
        self._tokens: Any = None  # stoker.data.accounting.TokenCounter, for token batches
        self._threads = torch.get_num_threads()
        self._accounting: dict[str, Any] | None = None

    # ------------------------------------------------------------------ lifecycle
    def attach(self, *, auto_step: bool = True) -> Doctor:
        """Start listening. ``auto_step``: count steps from any optimizer's ``step()``."""
        if _ACTIVE:
            raise StokerError(
                "a Doctor is already attached in this process; call .detach() on it first"
            )
        _ACTIVE.append(self)
        self._auto_step = auto_step
        self._undo = hooks.install(self)
        self._dyn_attach = _dynamo_snapshot()
        self.active = True
        if self._phase != "idle":  # re-attached after its window: listen, never re-profile
            return self
        self._phase = "warmup"
        self._next = min(2, self.config.warmup_steps)  # step 1 is allocation and first calls
        if self.config.warmup_steps == 0:
            self._next = 0
            self._start_window()
        return self

    def detach(self) -> None:
        """Stop listening and stop any profiling still running. Idempotent; a detached doctor
        that finished its window can be attached again (it stays finished)."""
        self._end_mode()
        if self.in_window:
            self._stop_profiler()
        if self._undo_window is not None:
            self._undo_window()
            self._undo_window = None
        if self._undo is not None:
            self._undo()
            self._undo = None
        self.active = False
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    @property
    def attribution_mode(self) -> AttributionMode | None:
        """The call-site recorder while the attribution steps run, else None."""
        return self._mode

    @property
    def done(self) -> bool:
        """True once the window and the attribution steps are complete."""
        return self._phase == "done"

    def fail(self, exc: BaseException) -> None:
        """Disable the doctor after an internal error; the user's run goes on untouched."""
        if self.failed is None:
            log.warning("stoker doctor disabled itself after an internal error: %r", exc)
            self.failed = exc
        with contextlib.suppress(Exception):
            self.detach()

    # ------------------------------------------------------------------ the per-step call
    def step(self) -> None:
        """Mark the end of one optimizer step. Cheap outside the window: no sync, no allocation."""
        self.steps += 1
        if self.steps >= self._next and self.active:
            try:
                self._advance()
            except WindowComplete:
                raise
            except Exception as exc:
                self.fail(exc)

    def _advance(self) -> None:
        now = time.perf_counter()
        cfg = self.config
        if self._phase == "warmup":
            if self._t_last and self.steps > 1:
                self._baseline.append(now - self._t_last)
            self._t_last = now
            self._next = self.steps + 1
            if self.steps >= cfg.warmup_steps:
                self._start_window()
            return
        if self._phase == "window":
            self._window.append(now - self._t_last)
            self._data_steps.append(self._acc["data"] - sum(self._data_steps))
            self._t_last = now
            self._next = self.steps + 1
            if len(self._window) >= cfg.window_steps:
                self._stop_profiler()
                self._start_attribution()
            return
        if self._phase == "attribution":
            self._attr.steps += 1
            if self._mode is not None:
                self._mode.step += 1
            self._next = self.steps + 1
            if self._attr.steps >= cfg.attribution_steps:
                self._finish()

    def _start_window(self) -> None:
        self._phase = "window"
        self._threads = torch.get_num_threads()  # what the run used, not what it restores
        self._dyn0 = _dynamo_snapshot()
        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        self._prof = profile(
            activities=activities, record_shapes=True, with_stack=self.config.with_stack
        )
        with _native_stderr_silenced():
            self._prof.__enter__()
        # A profiler still running when the interpreter exits crashes it: its C++ state is
        # destroyed after Python's (SIGSEGV, exit 139, in place of the script's own error).
        # Whatever ends the program inside the window, the profiler is stopped first.
        atexit.register(self._stop_at_exit)
        self._undo_window = hooks.install_window(self)
        self.in_window = True
        self._t_last = time.perf_counter()
        self._next = self.steps + 1

    def _stop_at_exit(self) -> None:
        with contextlib.suppress(Exception):
            self.detach()

    def _stop_profiler(self) -> None:
        self.in_window = False
        atexit.unregister(self._stop_at_exit)
        if self._undo_window is not None:
            self._undo_window()
            self._undo_window = None
        prof, self._prof = self._prof, None
        if prof is None:
            return
        with _native_stderr_silenced():
            prof.__exit__(None, None, None)
        self._dyn1 = _dynamo_snapshot()
        steps = max(1, len(self._window))
        self._summary = summarize_events(prof.profiler.kineto_results.events(), steps)
        if self.config.trace_path:
            prof.export_chrome_trace(self.config.trace_path)

    def _start_attribution(self) -> None:
        self._phase = "attribution"
        if self.config.attribution_steps == 0:
            self._finish()
            return
        # Compiled code runs eagerly during these steps: the recorder sees every call, and
        # torch.compile neither traces the recorder nor recompiles for it.
        self._dynamo_disable(True)
        self._mode = AttributionMode(self._attr, self._grad_ids())
        self._mode.__enter__()
        self._cuda_watch = CudaSyncWatch(self._mode)
        self._cuda_watch.start()

    def _end_mode(self) -> None:
        mode, self._mode = self._mode, None
        if self._cuda_watch is not None:
            self._cuda_watch.stop()
            self._cuda_watch = None
        if mode is not None:
            mode.__exit__(None, None, None)
            self._dynamo_disable(False)

    def _dynamo_disable(self, disable: bool) -> None:
        if "torch._dynamo" not in sys.modules:
            return
        import torch._dynamo

        if disable:
            self._dynamo_was_disabled = torch._dynamo.config.disable
            torch._dynamo.config.disable = True
        else:
            torch._dynamo.config.disable = self._dynamo_was_disabled

    def _finish(self) -> None:
        self._end_mode()
        self._phase = "done"
        self._next = sys.maxsize
        if self.config.stop_after_window:
            raise WindowComplete

    def _grad_ids(self) -> set[int]:
        ids = set()
        for info in self._optimizers.values():
            for group in info.optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        ids.add(id(p.grad))
        return ids

    # ------------------------------------------------------------------ listeners
    def on_optimizer_pre(self, opt: Any, args: Any, kwargs: Any) -> None:
        if self._primary is None:
            self._primary = id(opt)
        if self.in_window:
            self._opt_t0 = time.perf_counter()
        if self._loop_site is None:
            self._loop_site = caller_site()
        if self._mode is not None:
            self._mode.grad_ids |= self._grad_ids()

    def on_optimizer_post(self, opt: Any, args: Any, kwargs: Any) -> None:
        if self.in_window:
            seconds = time.perf_counter() - self._opt_t0
            self._acc["optimizer"] += seconds
            info = self._optimizers.get(id(opt))
            if info is None:
                defaults = getattr(opt, "defaults", {})
                info = self._optimizers[id(opt)] = OptimizerInfo(
                    site=hooks.site_of(opt),
                    step_site=caller_site(),
                    name=type(opt).__name__,
                    fused=defaults.get("fused"),
                    foreach=defaults.get("foreach"),
                    n_tensors=sum(len(g["params"]) for g in opt.param_groups),
                    optimizer=opt,
                )
            info.step_s += seconds
        if self._auto_step and id(opt) == self._primary:
            self.step()

    def on_module_zero_grad(self) -> None:
        # A loop that updates weights by hand (`p.data.add_(p.grad, alpha=-lr)`) has no
        # optimizer step to count, but clears its gradients once per step: count that, until
        # (if ever) an optimizer steps — from then on optimizer steps are the steps.
        if self._auto_step and self._primary is None:
            self.step()

    def on_data_wait(self, it: Any, seconds: float, batch: Any) -> None:
        self._acc["data"] += seconds
        if isinstance(batch, Mapping):  # token batches: count padding (device ops, no sync)
            valid = batch.get("valid")
            if not (isinstance(valid, torch.Tensor) and valid.dtype == torch.bool):
                mask = batch.get("attention_mask")
                is_mask = isinstance(mask, torch.Tensor) and mask.dim() == 2
                valid = mask.bool() if isinstance(mask, torch.Tensor) and is_mask else None
            if valid is not None:
                if self._tokens is None:
                    from stoker.data.accounting import TokenCounter

                    self._tokens = TokenCounter()
                self._tokens.update(valid)
        ref = getattr(it, "_stoker_doctor_loader", None)
        loader = ref() if ref is not None else None
        key = id(loader) if loader is not None else id(type(it))
        info = self._loaders.get(key)
        if info is None:
            info = self._loaders[key] = LoaderInfo(
                site=hooks.site_of(loader) if loader is not None else None,
                num_workers=int(getattr(it, "_num_workers", 0)),
                pin_memory=bool(getattr(it, "_pin_memory", False)),
                batch_size=getattr(loader, "batch_size", None),
                iterated_at=caller_site(2),
            )
        info.wait_s += seconds

    def on_forward_start(self, module: Any, args: tuple[Any, ...]) -> None:
        self._fwd_stack.append(
            (module, args, caller_site(3), bool(module.training), torch.is_grad_enabled())
        )

    def on_forward_end(self, module: Any, kwargs: dict[str, Any], seconds: float) -> None:
        if not self._fwd_stack:
            return
        _, args, site, training, grad = self._fwd_stack.pop()
        self._acc["forward"] += seconds
        key = (id(module), training, grad)
        info = self._forwards.get(key)
        if info is None:

            def keep(a: Any) -> Any:
                return a.detach() if isinstance(a, torch.Tensor) else a

            info = self._forwards[key] = ForwardInfo(
                site=site,
                module=_without_ddp(module),
                args=tuple(keep(a) for a in args),
                kwargs={k: keep(v) for k, v in (kwargs or {}).items()},
                training=training,
                grad_enabled=grad,
            )
        info.calls += 1
        info.seconds += seconds

    def on_backward(self, seconds: float) -> None:
        if self.in_window:
            self._acc["backward"] += seconds
            self._backwards += 1

    def on_zero_grad(self, obj: Any, set_to_none: bool, site: Site | None, seconds: float) -> None:
        if self.in_window:
            key = (site, bool(set_to_none))
            self._zero[key] = self._zero.get(key, 0.0) + seconds

    def set_accounting(self, summary: Any, site: Site | None = None) -> None:
        """Give the rules a ``stoker.data.accounting.RaggedSummary`` (padding, rank balance)
        measured by the caller; otherwise the doctor counts token batches in its window."""
        self._accounting = {**summary.as_dict(), "site": site}

    def _accounting_summary(self) -> dict[str, Any] | None:
        if self._accounting is not None:
            return self._accounting
        if self._tokens is None or not self._tokens.steps:
            return None
        loader = max(self._loaders.values(), key=lambda x: x.wait_s, default=None)
        site = (loader.site or loader.iterated_at) if loader is not None else None
        return {**self._tokens.summary().as_dict(), "site": site}

    # ------------------------------------------------------------------ results
    def measurements(self) -> Measurements:
        """The numbers of the completed window; raises StokerError when there is no window."""
        if self.failed is not None:
            raise StokerError(
                f"the doctor disabled itself after an internal error ({self.failed!r}); "
                "the run itself was not affected — please report this"
            )
        if self._summary is None or not self._window:
            raise StokerError(
                f"the run took {self.steps} optimizer step(s), fewer than the doctor needs to "
                f"profile ({self.config.warmup_steps} warm-up + {self.config.window_steps} "
                "profiled); lower warmup_steps/window_steps or run more steps"
            )
        steps = max(1, len(self._window))
        step_ms = 1e3 * sum(self._window) / steps
        phases = {k: 1e3 * v / steps for k, v in self._acc.items()}
        phases["host_sync"] = self._summary.sync_ms
        other = step_ms - sum(phases[k] for k in ("data", "forward", "backward", "optimizer"))
        phases["other"] = max(0.0, other - phases["host_sync"])
        baseline = sorted(self._baseline)
        device = "cpu"
        for f in self._forwards.values():
            p = next(iter(f.module.parameters()), None)
            if p is not None:
                device = p.device.type
                break
        env_threads = os.environ.get("OMP_NUM_THREADS")
        return Measurements(
            device=device,
            steps=steps,
            step_ms=step_ms,
            baseline_step_ms=1e3 * baseline[len(baseline) // 2] if baseline else None,
            step_ms_each=[1e3 * t for t in self._window],
            data_ms_each=[1e3 * t for t in self._data_steps],
            phases_ms=phases,
            profile=self._summary,
            attribution=self._attr,
            loop_site=self._loop_site,
            loaders=list(self._loaders.values()),
            optimizers=list(self._optimizers.values()),
            forwards=list(self._forwards.values()),
            zero_grads=[(s, n, 1e3 * t / steps) for (s, n), t in self._zero.items()],
            compile_sites=list(self.compile_sites),
            compile={"attach": self._dyn_attach, "before": self._dyn0, "after": self._dyn1},
            threads={
                "intra_op": self._threads,
                "cores": _cores(),
                "set_at": self.thread_sites[-1] if self.thread_sites else None,
                "omp_env": env_threads,
            },
            micro_batches=max(1.0, self._backwards / steps),
            extras={"accounting": self._accounting_summary()},
        )

    def report(self) -> Any:
        """Measure, probe, apply the rules; returns a :class:`~stoker.doctor.report.Report`."""
        if self._report is None:
            from stoker.doctor.probes import run_probes
            from stoker.doctor.report import Report
            from stoker.doctor.rules import diagnose

            m = self.measurements()
            probes = run_probes(m) if self.config.probes else {}
            self._report = Report.build(m, probes, diagnose(m, probes))
        return self._report
