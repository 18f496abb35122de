"""What the doctor's window measured: the records its rules read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stoker.doctor.attribution import Attribution
from stoker.doctor.capture import ProfileSummary
from stoker.doctor.frames import Site

__all__ = ["ForwardInfo", "LoaderInfo", "Measurements", "OptimizerInfo"]


@dataclass(slots=True)
class LoaderInfo:
    """A DataLoader seen in the window."""

    site: Site | None
    num_workers: int
    pin_memory: bool
    batch_size: int | None
    iterated_at: Site | None
    wait_s: float = 0.0


@dataclass(slots=True)
class OptimizerInfo:
    """An optimizer stepped in the window."""

    site: Site | None
    step_site: Site | None
    name: str
    fused: bool | None
    foreach: bool | None
    n_tensors: int
    optimizer: Any = field(repr=False)
    step_s: float = 0.0


@dataclass(slots=True)
class ForwardInfo:
    """A top-level module call seen in the window."""

    site: Site | None
    module: Any = field(repr=False)
    """The module called, inside any ``DistributedDataParallel`` wrapper: probes run on it."""
    args: tuple[Any, ...] = field(repr=False)
    kwargs: dict[str, Any] = field(repr=False)
    training: bool
    grad_enabled: bool
    calls: int = 0
    seconds: float = 0.0


@dataclass(slots=True)
class Measurements:
    """Everything the rules read. Times are per optimizer step, in milliseconds."""

    device: str
    steps: int
    step_ms: float  # profiled window, mean
    baseline_step_ms: float | None  # unprofiled warm-up steps, median
    # Per profiled step (ms): medians shrug off one step the OS preempted, unlike means.
    step_ms_each: list[float]
    data_ms_each: list[float]
    phases_ms: dict[str, float]
    profile: ProfileSummary
    attribution: Attribution
    loop_site: Site | None  # the user's optimizer.step() line
    loaders: list[LoaderInfo]
    optimizers: list[OptimizerInfo]
    forwards: list[ForwardInfo]
    zero_grads: list[tuple[Site | None, bool, float]]  # (site, set_to_none, seconds/step)
    compile_sites: list[Site | None]
    compile: dict[str, Any]
    threads: dict[str, Any]
    micro_batches: float = 1.0  # backward passes per step: > 1 under gradient accumulation
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def train_forward(self) -> ForwardInfo | None:
        """The costliest top-level forward run in training mode with grad: the model."""
        train = [f for f in self.forwards if f.training and f.grad_enabled]
        return max(train, key=lambda f: f.seconds) if train else None
