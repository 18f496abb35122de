"""How the doctor samples a run: :class:`DoctorConfig`."""

from __future__ import annotations

from dataclasses import dataclass

from stoker.errors import StokerError

__all__ = ["DoctorConfig"]


@dataclass(kw_only=True, slots=True)
class DoctorConfig:
    """How the doctor samples a run."""

    warmup_steps: int = 5
    """Optimizer steps run untouched first (allocator, autotuning, torch.compile warm up)."""
    window_steps: int = 5
    """Steps profiled with ``torch.profiler`` (timings, op mix)."""
    attribution_steps: int = 2
    """Steps after the window run under a call-site recorder (which line issued what)."""
    stop_after_window: bool = False
    """End the run (cleanly, by unwinding it) once the doctor has seen enough."""
    probes: bool = True
    """At report time, time the captured model under the suggested fixes (bf16, batch, threads)."""
    with_stack: bool = False
    """Record Python stacks in the profiler trace (only useful with ``trace_path``; the doctor
    gets lines from its attribution steps, the profiler's stacks name only the ``def`` line)."""
    trace_path: str | None = None
    """Write the window's Chrome/Perfetto trace here."""

    def __post_init__(self) -> None:
        for name in ("warmup_steps", "attribution_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise StokerError(f"DoctorConfig.{name}={value!r}: use an integer >= 0")
        if not isinstance(self.window_steps, int) or self.window_steps < 1:
            raise StokerError(
                f"DoctorConfig.window_steps={self.window_steps!r}: use an integer >= 1"
            )

    @property
    def total_steps(self) -> int:
        """Optimizer steps the doctor needs before it can report."""
        return self.warmup_steps + self.window_steps + self.attribution_steps
