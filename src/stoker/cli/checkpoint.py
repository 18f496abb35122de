"""``stoker checkpoint export RUN_OR_STEP -o model.safetensors``: a checkpoint's model weights
(consolidated from shards if need be) as one safetensors file."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "checkpoint"
HELP = "work with a run's checkpoints: export the model weights as one safetensors file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    export = actions.add_parser(
        "export",
        help="write a checkpoint's model weights (sharded or not) to one safetensors file",
        description="Write the model weights of a checkpoint to one safetensors file: the "
        "newest valid checkpoint of a run directory, or the step-N/ directory given. A sharded "
        "(FSDP) checkpoint is consolidated into full tensors.",
    )
    export.add_argument("source", help="a run directory, its checkpoints/ or one step-N/")
    export.add_argument("-o", "--output", required=True, help="the .safetensors file to write")
    export.add_argument("--key", default=None, help="which model, if the checkpoint has several")


def main(args: argparse.Namespace) -> int:
    from stoker.checkpoint.export import export_model

    source = Path(args.source)
    if not source.is_dir():
        from stoker.errors import StokerError

        raise StokerError(f"{source} is not a directory; pass a run directory or a step-N/ one")
    checkpoint, out = export_model(source, args.output, key=args.key)
    size = out.stat().st_size / 2**20
    print(f"stoker: wrote {out} ({size:.1f} MiB) from {checkpoint}")
    return 0
