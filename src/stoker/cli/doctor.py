"""``stoker doctor``: run a training script, profile a window of steps, say what to change."""

from __future__ import annotations

import argparse
import os

from stoker.cli._checks import check_count, check_output_path, check_script
from stoker.doctor import DoctorConfig, diagnose_script
from stoker.errors import StokerError

NAME = "doctor"
HELP = "profile a window of a training script's steps and report what to change, line by line"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--warmup", type=int, default=5, help="steps to skip first (default 5)")
    parser.add_argument("--steps", type=int, default=5, help="steps to profile (default 5)")
    parser.add_argument(
        "--attribution-steps",
        type=int,
        default=2,
        help="steps after the window spent finding which line does what (default 2)",
    )
    parser.add_argument(
        "--full-run",
        action="store_true",
        help="let the script run to its end after the window (default: stop it cleanly there)",
    )
    parser.add_argument(
        "--no-probes",
        action="store_true",
        help="don't time the suggested fixes on the captured model",
    )
    parser.add_argument(
        "--json",
        default="doctor.json",
        metavar="PATH",
        help="where to write the JSON report (a file or directory; '' for none)",
    )
    parser.add_argument(
        "--trace",
        default=None,
        metavar="PATH",
        help="also write the window's Chrome/Perfetto trace here",
    )
    parser.add_argument("script", help="the training script (plain PyTorch is fine)")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")


def main(args: argparse.Namespace) -> int:
    # Before the script runs: a report that cannot be written would waste the whole run.
    check_script(args.script)
    for flag, value in (("--warmup", args.warmup), ("--attribution-steps", args.attribution_steps)):
        check_count(flag, value, least=0, what="steps")
    check_count("--steps", args.steps, least=1, what="profiled step")
    check_output_path("--json", args.json, default_name="doctor.json")
    if args.trace and os.path.isdir(args.trace):
        raise StokerError(
            f"--trace {args.trace} is a directory; pass a file path such as "
            f"{os.path.join(args.trace, 'trace.json')}"
        )
    check_output_path("--trace", args.trace, default_name="trace.json")
    config = DoctorConfig(
        warmup_steps=args.warmup,
        window_steps=args.steps,
        attribution_steps=args.attribution_steps,
        stop_after_window=not args.full_run,
        probes=not args.no_probes,
        trace_path=args.trace,
    )
    if not args.full_run and os.path.isfile(args.script):  # else diagnose_script says why
        print(
            f"stoker doctor: running {os.path.basename(args.script)} for "
            f"{config.total_steps} training steps, then stopping it (--full-run to finish)"
        )
    report = diagnose_script(args.script, [*args.script_args, *args.extra], config)
    report.print()
    if args.json:
        print(f"\nwrote {report.write_json(args.json)}")
    return 0
