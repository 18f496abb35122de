"""Run a plain PyTorch training script under the doctor (what ``stoker doctor script.py`` does).

The script runs in this process (``runpy``, ``sys.argv`` set as ``python script.py ...`` would)
and need not import stoker: step boundaries come from torch's global optimizer step hooks. By
default the script is ended cleanly once the doctor has its window (the profiled steps tell all
there is to tell; a doctor run should not cost a whole training run); with
``stop_after_window=False`` it runs to its end at full speed.
"""

from __future__ import annotations

import os
import runpy
import sys
import traceback
from collections.abc import Sequence
from dataclasses import replace

import torch

from stoker.doctor.config import DoctorConfig
from stoker.doctor.report import Report
from stoker.doctor.session import Doctor, WindowComplete
from stoker.errors import StokerError

__all__ = ["ScriptFailed", "diagnose_script"]


class ScriptFailed(StokerError):
    """The diagnosed script itself failed: ``stoker doctor`` exits 1, as ``python script.py``
    would (2 is for its own usage errors)."""

    exitcode = 1


def _where(exc: BaseException, script: str) -> str:
    """``file:line`` of the deepest frame of ``exc`` inside the user's script, if any."""
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if os.path.abspath(f.filename) == script]
    if not (mine or frames):
        return ""
    f = (mine or frames)[-1]
    return f" at {os.path.basename(f.filename)}:{f.lineno}"


def diagnose_script(
    path: str | os.PathLike[str],
    args: Sequence[str] = (),
    config: DoctorConfig | None = None,
) -> Report:
    """Run ``path`` with ``args`` under a :class:`Doctor`; return its report.

    Raises :class:`StokerError` (one line) when the script does not exist, crashes before the
    doctor's window is complete (its traceback is printed first), or ends with too few steps.
    """
    config = config or DoctorConfig(stop_after_window=True)
    script = os.path.abspath(os.fspath(path))
    if os.path.isdir(script):
        raise StokerError(
            f"{os.fspath(path)!r} is a directory, not a script; pass the path of a Python file "
            f"(e.g. {os.path.join(os.fspath(path), 'train.py')})"
        )
    if not os.path.isfile(script):
        raise StokerError(f"no such script: {os.fspath(path)!r}; pass the path of a Python file")
    if config.stop_after_window and config.attribution_steps == 0 and config.window_steps == 0:
        config = replace(config, stop_after_window=False)

    doctor = Doctor(config)
    saved_argv, saved_path = sys.argv, list(sys.path)
    saved_threads = torch.get_num_threads()
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(script))
    crash: BaseException | None = None
    doctor.attach(auto_step=True)
    try:
        runpy.run_path(script, run_name="__main__")
    except WindowComplete:
        pass
    except SystemExit as exc:
        if exc.code not in (0, None):
            crash = exc
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        crash = exc
    finally:
        doctor.detach()
        sys.argv = saved_argv
        sys.path[:] = saved_path
        torch.set_num_threads(saved_threads)

    name = os.path.basename(script)
    needed = config.warmup_steps + config.window_steps
    if crash is not None and not doctor.done:
        if not isinstance(crash, SystemExit):
            traceback.print_exception(type(crash), crash, crash.__traceback__)
        what = (
            f"exited with status {crash.code}"
            if isinstance(crash, SystemExit)
            else f"raised {type(crash).__name__}{_where(crash, script)}"
        )
        raise ScriptFailed(
            f"{name} {what} after {doctor.steps} training step(s), before the doctor's window "
            f"was complete (it needs {config.total_steps}); fix the script, or lower "
            "--warmup/--steps to diagnose the steps it does run"
        ) from crash
    if crash is not None and not isinstance(crash, SystemExit):
        traceback.print_exception(type(crash), crash, crash.__traceback__)
        print(
            f"stoker doctor: {name} crashed after the window; reporting what was measured",
            file=sys.stderr,
        )
    if doctor.steps == 0:
        raise StokerError(
            f"{name} finished without a single optimizer.step() or model.zero_grad(); the "
            "doctor marks a step by one of those — run a script that trains"
        )
    if doctor.steps < needed:
        raise StokerError(
            f"{name} finished after {doctor.steps} training step(s) but the doctor needs "
            f"{config.total_steps} ({config.warmup_steps} warm-up + {config.window_steps} "
            f"profiled + {config.attribution_steps} attribution); pass e.g. --warmup "
            f"{max(0, doctor.steps // 3)} --steps {max(1, doctor.steps // 3)}, or run more steps"
        )
    return doctor.report()
