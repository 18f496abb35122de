"""What each worker started by ``stoker run`` executes: the user's script, as ``__main__``.

Running the script through this module keeps one promise of stoker's: a
:class:`~stoker.StokerError` raised anywhere in the script ends the worker with one line on
stderr and exit code 2, not a traceback. Catching it here keeps it from stoker's excepthook, so
the failure is reported (:func:`~stoker.errors.report_failure`) for the run to record it; so is
a ``sys.exit`` with a non-zero code. A preempted run (:class:`~stoker.errors.Preempted`) exits with
its code and is not reported as a failure.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from stoker.errors import Preempted, StokerError, report_failure


def main(argv: list[str]) -> int:
    if not argv:
        print(
            "stoker: error: usage: python -m stoker.runtime.entry SCRIPT [ARGS...]", file=sys.stderr
        )
        return 2
    script = argv[0]
    sys.argv = list(argv)
    # As `python script.py` would: the script's own directory first on the import path.
    sys.path.insert(0, str(Path(script).resolve().parent))
    try:
        runpy.run_path(script, run_name="__main__")
    except StokerError as exc:
        report_failure(exc)
        print(f"stoker: error: {exc}", file=sys.stderr)
        return 2
    except Preempted as exc:  # not a failure: the run saved its checkpoint and says so
        return int(exc.code)  # type: ignore[arg-type]
    except SystemExit as exc:
        code = exc.code
        if code is None or code == 0:
            return 0
        report_failure(exc)
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
