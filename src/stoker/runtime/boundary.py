"""What a checkpoint must hold *as of the optimizer step*, kept until the checkpoint is written.

A checkpoint of step N is written at the start of the next micro-batch, after the user's
``optimizer.step()`` and ``scheduler.step()`` (so the scheduler is saved stepped). In a loop
with a prepared DataLoader that point is the loader fetching batch N+1, and everything is still
as it was after step N. A loop that feeds its own batches is only seen again at its next
``stoker.backward()``, and by then it has drawn batch N+1 (nanoGPT's ``torch.randint``:
the global RNG moved), run a forward (dropout: the RNG again; batch norm: the running
statistics; an RNN: the carried hidden state) and possibly fetched from a loader. So, only when
a save is due at step N, the end of step N (the checkpoint listener's ``on_step_end``, see
:mod:`stoker.runtime.step`) takes a :class:`StepBoundary`:

- the RNG states (Python, NumPy, torch), the runtime's counters, the loaders' positions and the
  user's tracked state, as copies;
- the models' buffers (not their parameters: only a forward moves buffers, and the next
  optimizer step, which moves parameters, writes this checkpoint first).

Model parameters, optimizer and scheduler are read live when the checkpoint is written.
Worked example, ``every_steps=2``::

    optimizer.step()   # step 2: a save is due -> StepBoundary(step=2): RNG, loaders, state
    scheduler.step()   # the scheduler is read live at the write: stepped, as it should be
    x = torch.randint(...)          # RNG moves; the boundary copy does not
    loss = model(x)                 # dropout, batch norm, hidden state move
    stoker.backward(loss)           # writes step-2 with the boundary copies
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from stoker.runtime.nested import map_tensors

__all__ = ["StepBoundary", "capture_boundary", "detached_copy", "written_as_of"]


def detached_copy(obj: Any) -> Any:
    """``obj`` with its containers rebuilt and every tensor cloned (a snapshot, not a view)."""
    return map_tensors(lambda t: t.detach().clone(), obj)


class _Frozen:
    """A state dict taken earlier, standing in for its live object while a checkpoint is
    written (the checkpoint stores it exactly as it would the object's own)."""

    def __init__(self, state: Any) -> None:
        self._state = state

    def state_dict(self) -> Any:
        return self._state

    def load_state_dict(self, state: Any) -> None:  # never loaded: the live object is
        raise RuntimeError("a frozen state dict is only written, never loaded")


@dataclass(slots=True)
class StepBoundary:
    """Copies taken right after optimizer step ``step``; see the module docstring."""

    step: int
    rng: dict[str, Any]
    entries: dict[str, Any] = field(default_factory=dict)
    buffers: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def _buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    # The persistent buffers, under their state_dict names (batch-norm statistics, ...).
    params = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    state = module.state_dict(keep_vars=True)
    return {k: v for k, v in state.items() if k not in params and isinstance(v, torch.Tensor)}


def capture_boundary(step: int, state: Mapping[str, Any], keys: Iterable[str]) -> StepBoundary:
    """Copy what ``state`` must hold as of step ``step``: the RNG, ``keys`` (stateful objects'
    state dicts) and the buffers of its modules. Runs only when a save is due."""
    from stoker.checkpoint import capture_rng
    from stoker.checkpoint.state import unwrap_module

    boundary = StepBoundary(step=step, rng=detached_copy(capture_rng()))
    for key in keys:
        boundary.entries[key] = detached_copy(state[key].state_dict())
    for key, obj in state.items():
        if isinstance(obj, nn.Module):
            buffers = _buffers(unwrap_module(obj))
            if buffers:
                boundary.buffers[key] = {k: v.detach().clone() for k, v in buffers.items()}
    return boundary


@contextlib.contextmanager
def written_as_of(state: Mapping[str, Any], boundary: StepBoundary) -> Iterator[Mapping[str, Any]]:
    """The state to checkpoint, as of ``boundary``'s step: its copies stand in for the live
    entries, and the RNG and module buffers hold their step values until the block ends
    (the checkpoint reads them synchronously, even with ``async_save``). Then the live values
    are put back, so the loop continues exactly where it was."""
    from stoker.checkpoint import capture_rng, restore_rng
    from stoker.checkpoint.state import unwrap_module

    as_of = {
        k: _Frozen(boundary.entries[k]) if k in boundary.entries else v for k, v in state.items()
    }
    live_rng = capture_rng()
    live_buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        restore_rng(boundary.rng)
        for key, saved in boundary.buffers.items():
            current = _buffers(unwrap_module(state[key]))
            for name, value in saved.items():
                buf = current.get(name)
                if buf is not None and buf.shape == value.shape:
                    live_buffers.append((buf, buf.detach().clone()))
                    buf.data.copy_(value)
        yield as_of
    finally:
        for buf, value in live_buffers:
            buf.data.copy_(value)
        restore_rng(live_rng)
