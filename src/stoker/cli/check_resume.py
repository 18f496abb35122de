"""``stoker check-resume script.py [args]``: killed and resumed, does it end bitwise equal?"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from stoker.checkpoint.check_resume import CheckResumeConfig, check_resume
from stoker.cli._checks import check_count, check_number

NAME = "check-resume"
HELP = (
    "run a script uninterrupted, then SIGKILLed at random steps and resumed; compare the final "
    "checkpoints bitwise"
)
_EPILOG = """\
The script must take its run directory from $STOKER_RUN_DIR, checkpoint into
$STOKER_RUN_DIR/checkpoints with stoker.checkpoint.Checkpointer (calling maybe_save(step, ...)
every step), resume from the newest valid checkpoint, and save one at its last step. Scripts
using stoker's runtime with checkpointing enabled do all of this. For bitwise equality also
call torch.use_deterministic_algorithms(True) and keep the thread count fixed.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = _EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--kills", type=int, default=1, help="SIGKILLs in the interrupted run")
    parser.add_argument("--seed", type=int, default=None, help="seed for the kill steps")
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (DDP via torchrun)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per launch")
    parser.add_argument(
        "--workdir", default=None, help="where the two runs go (default: a temp dir)"
    )
    parser.add_argument("script", help="the training script")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")


def main(args: argparse.Namespace) -> int:
    check_count("--kills", args.kills, least=1, what="kill")
    check_count("--nproc", args.nproc, least=1, what="process")
    check_number("--timeout", args.timeout, unit="seconds", example="3600")
    console = Console()
    config = CheckResumeConfig(
        kills=args.kills,
        seed=args.seed,
        nproc=args.nproc,
        timeout_s=args.timeout,
        workdir=Path(args.workdir) if args.workdir else None,
    )
    result = check_resume(
        args.script,
        list(args.script_args),
        config,
        echo=lambda text: console.print(text, highlight=False, markup=False),
    )
    if result.identical:
        console.print(
            f"[green]bitwise identical[/]: {result.tensors_compared} tensors of the final "
            f"checkpoint (step {result.final_step}) after SIGKILL at steps {result.kill_steps}"
        )
        return 0
    console.print(f"[red]resume is NOT exact[/]: {len(result.differences)} differences")
    for line in result.differences[:20]:
        console.print(f"  {line}", highlight=False, markup=False)
    if result.first_loss_difference is not None:
        console.print(f"the logged loss first differs at step {result.first_loss_difference}")
    console.print(f"runs kept in {result.reference_dir} and {result.resumed_dir}")
    return 1
