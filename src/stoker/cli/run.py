"""``stoker run``: start a training script on one or many processes (via torchrun)."""

from __future__ import annotations

import argparse

from stoker.runtime.launch import LaunchConfig, launch

NAME = "run"
HELP = "run a training script on N processes / nodes through torchrun's elastic launcher"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nproc", type=int, default=1, help="processes on this machine (default 1)"
    )
    parser.add_argument("--nnodes", default="1", help="machines in the job, or MIN:MAX (default 1)")
    parser.add_argument(
        "--node-rank",
        type=int,
        default=None,
        help="this machine's rank 0..N-1: a static rendezvous served by node 0 at --rdzv "
        "(default: c10d assigns ranks and lets a node rejoin)",
    )
    parser.add_argument(
        "--rdzv", default=None, metavar="HOST:PORT", help="rendezvous endpoint for multi-node jobs"
    )
    parser.add_argument("--rdzv-id", default="stoker", help="job id shared by all nodes")
    parser.add_argument(
        "--local-addr",
        default=None,
        metavar="ADDR",
        help="this node's address as the other nodes reach it; gloo binds to its interface "
        "(default: the address this machine uses to reach --rdzv)",
    )
    parser.add_argument(
        "--rdzv-conf",
        default=None,
        metavar="KEY=VALUE,...",
        help="torchrun's rendezvous settings, e.g. last_call_timeout=5 (with --nnodes MIN:MAX)",
    )
    parser.add_argument(
        "--max-restarts", type=int, default=0, help="restart failed workers up to K times"
    )
    parser.add_argument("script", help="the training script")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")


def main(args: argparse.Namespace) -> int:
    config = LaunchConfig(
        script=args.script,
        script_args=list(args.script_args),
        nproc=args.nproc,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        rdzv_endpoint=args.rdzv,
        rdzv_id=args.rdzv_id,
        max_restarts=args.max_restarts,
        local_addr=args.local_addr,
        rdzv_conf=args.rdzv_conf,
    )
    return launch(config)
