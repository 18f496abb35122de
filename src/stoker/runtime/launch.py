"""Launching a training script on one or many processes through torchrun's elastic agent.

``stoker run`` adds no launcher of its own: it validates the request, then hands it to
``torch.distributed.run`` (the module behind ``torchrun``), whose c10d rendezvous also joins
several machines and whose agent restarts failed workers (``--max-restarts``). Each worker runs
the script through :mod:`stoker.runtime.entry`, which turns a :class:`~stoker.StokerError` into
one line instead of a traceback.

With several nodes, each node needs an address the others can reach, for two things: the
address the rendezvous publishes for it (torchrun's ``--local-addr``; torch's default is the
host name, which a stock Debian ``/etc/hosts`` maps to 127.0.1.1, unreachable from any other
machine) and the interface gloo binds its sockets to (``GLOO_SOCKET_IFNAME``; gloo's default
is the host name's address too, falling back to loopback). Unless told, ``stoker run`` takes
the address this machine uses to reach the rendezvous endpoint (the source address the kernel
picks for a route to it) and the interface that holds it, so every worker connection goes
over the link to the other nodes.

Preemption (see :mod:`stoker.runtime.preemption`): the agent handles SIGTERM, SIGINT, SIGHUP,
SIGQUIT *and SIGUSR1* (torchrun's ``--signals-to-handle``; torchrun alone leaves SIGUSR1, which
SLURM's ``--signal=B:USR1@120`` sends, to kill itself: pytorch#154849) and passes the signal on
to every worker, which saves the step's checkpoint and exits with code 143. The agent then
waits ``--shutdown-timeout`` seconds before SIGKILLing the workers: ``stoker run`` sizes it from
the last save this run directory measured (``record.json``'s ``checkpoint_seconds``), never
below torchrun's 30 s, and says so in one line. ``stoker run`` itself then exits with 143.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import logging
import math
import os
import re
import signal
import socket
import struct
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from stoker.errors import PREEMPTED_EXIT_CODE, StokerError

__all__ = [
    "AGENT_SIGNALS",
    "TORCHRUN_GRACE_S",
    "LaunchConfig",
    "WorkerFailed",
    "for_this_node",
    "grace_seconds",
    "interface_addresses",
    "launch",
    "torchrun_argv",
]


GRACE_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"  # torchrun's own; an explicit one is kept
TORCHRUN_GRACE_S = 30
"""torchrun's default time between the signal it passes on to its workers and its SIGKILL."""
AGENT_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
"""What the agent handles and passes on to the workers: torchrun's defaults, plus SIGUSR1."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchConfig:
    """What ``stoker run`` was asked to start."""

    script: str
    """Path of the user's training script."""
    script_args: list[str] = field(default_factory=list)
    """Arguments passed through to the script untouched."""
    nproc: int = 1
    """Worker processes on this machine."""
    nnodes: str = "1"
    """Number of machines, or a ``MIN:MAX`` range for elastic jobs."""
    node_rank: int | None = None
    """This machine's rank, 0 to nnodes - 1, for a static rendezvous (fixed ranks; node 0 at
    ``rdzv_endpoint`` serves it); None: c10d's dynamic rendezvous, which assigns ranks (in
    order of address) and lets a node leave and rejoin."""
    rdzv_endpoint: str | None = None
    """``host:port`` of the rendezvous (required with more than one node)."""
    rdzv_id: str = "stoker"
    """Job id shared by all nodes of one job."""
    max_restarts: int = 0
    """How many times the agent restarts the worker group after a failure."""
    local_addr: str | None = None
    """This node's address as the other nodes reach it (multi-node); None: the address this
    machine uses to reach ``rdzv_endpoint``."""
    rdzv_conf: str | None = None
    """torchrun's ``--rdzv-conf``, ``KEY=VALUE,...`` (e.g. ``last_call_timeout=5``)."""
    grace: int = TORCHRUN_GRACE_S
    """Seconds the workers get to save and exit after a signal before the agent SIGKILLs them
    (torchrun's ``--shutdown-timeout``); :func:`launch` raises it from a measured save."""

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise StokerError(
                f"--nproc {self.nproc} is not a number of processes; use 1 or more "
                "(one per GPU, or 1-2 on a CPU machine)"
            )
        if self.max_restarts < 0:
            raise StokerError(f"--max-restarts {self.max_restarts} must be 0 or more")
        path = Path(self.script)
        if not path.is_file():
            where = "is a directory" if path.is_dir() else "does not exist"
            raise StokerError(
                f"training script {self.script!r} {where} (cwd {Path.cwd()}); "
                "give the path of a Python file, e.g. `stoker run examples/train_mlm.py`"
            )
        sizes = re.fullmatch(r"(\d+)(?::(\d+))?", self.nnodes)
        if not sizes or not 1 <= int(sizes[1]) <= int(sizes[2] or sizes[1]):
            raise StokerError(
                f"--nnodes {self.nnodes!r} is neither a number of machines nor a MIN:MAX range "
                "with 1 <= MIN <= MAX; e.g. --nnodes 2, or --nnodes 1:4 for an elastic job"
            )
        if self.node_rank is not None and not (
            sizes[2] is None and 0 <= self.node_rank < int(sizes[1])
        ):
            raise StokerError(
                f"--node-rank {self.node_rank} needs a fixed --nnodes N with 0 <= rank < N "
                f"(got --nnodes {self.nnodes}); or leave --node-rank out for c10d to assign ranks"
            )
        if self.nnodes != "1" and not self.rdzv_endpoint:
            raise StokerError(
                f"--nnodes {self.nnodes} needs --rdzv HOST:PORT, the address every node can "
                "reach (e.g. the first node's hostname and a free port such as 29500)"
            )
        if self.rdzv_endpoint:
            _split_endpoint(self.rdzv_endpoint)
        if self.rdzv_conf:
            bad = [kv for kv in self.rdzv_conf.split(",") if "=" not in kv or not kv.split("=")[0]]
            if bad:
                raise StokerError(
                    f"--rdzv-conf {self.rdzv_conf!r}: {bad[0]!r} is not KEY=VALUE; give "
                    "comma-separated pairs, e.g. last_call_timeout=5,join_timeout=120"
                )


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise StokerError(
            f"--rdzv {endpoint!r} is not HOST:PORT; give the first node's address and a free "
            "port, e.g. --rdzv 10.0.0.1:29500"
        )
    return host.strip("[]"), int(port)


def _node_argv(config: LaunchConfig) -> list[str]:
    """The multi-node options spelt the same by ``stoker run`` and ``torchrun``."""
    argv = []
    if config.node_rank is not None:
        argv += ["--node-rank", str(config.node_rank)]
    if config.local_addr:
        argv += ["--local-addr", config.local_addr]
    if config.rdzv_conf:
        argv += ["--rdzv-conf", config.rdzv_conf]
    return argv


def torchrun_argv(config: LaunchConfig) -> list[str]:
    """The ``torchrun`` command line equivalent to ``config`` (without the program name)."""
    argv = ["--nproc-per-node", str(config.nproc), "--max-restarts", str(config.max_restarts)]
    argv += ["--signals-to-handle", AGENT_SIGNALS, "--shutdown-timeout", str(config.grace)]
    if config.nnodes == "1" and not config.rdzv_endpoint:
        argv.append("--standalone")
    else:
        backend = "c10d" if config.node_rank is None else "static"
        argv += ["--nnodes", config.nnodes, "--rdzv-backend", backend]
        argv += ["--rdzv-endpoint", str(config.rdzv_endpoint), "--rdzv-id", config.rdzv_id]
        argv += _node_argv(config)
    argv += ["--module", "stoker.runtime.entry", config.script, *config.script_args]
    return argv


def _stoker_run_argv(config: LaunchConfig) -> list[str]:
    argv = ["--nproc", str(config.nproc), "--max-restarts", str(config.max_restarts)]
    if config.nnodes != "1" or config.rdzv_endpoint:
        argv += ["--nnodes", config.nnodes, "--rdzv", str(config.rdzv_endpoint)]
        argv += ["--rdzv-id", config.rdzv_id]
        argv += _node_argv(config)
    return [*argv, config.script, *config.script_args]


def _available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def interface_addresses() -> dict[str, str]:
    """``{interface name: its IPv4 address}`` for this machine's interfaces that have one
    (Linux; the primary address of each, as ``SIOCGIFADDR`` reports it)."""
    siocgifaddr = 0x8915  # <linux/sockios.h>
    found = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                reply = fcntl.ioctl(sock.fileno(), siocgifaddr, request)
            except OSError:  # no IPv4 address on this interface
                continue
            found[name] = socket.inet_ntoa(reply[20:24])  # struct ifreq: sockaddr_in.sin_addr
    return found


def _route_source(endpoint: str) -> str | None:
    """The address this machine sends from to reach ``endpoint`` (no packet is sent: a UDP
    connect only asks the kernel for the route), or None if it has no route."""
    host, port = _split_endpoint(endpoint)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((host, port))
            return str(sock.getsockname()[0])
    except OSError:
        return None


def _ipv4(host: str, option: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:  # a host name
        try:
            return socket.gethostbyname(host)
        except OSError as exc:
            raise StokerError(f"{option} {host!r} does not resolve: {exc}") from None


def for_this_node(config: LaunchConfig) -> tuple[LaunchConfig, dict[str, str]]:
    """A multi-node ``config`` completed for this machine, and the environment its workers need.

    - ``local_addr``: given, or the address this machine uses to reach the rendezvous endpoint;
    - ``GLOO_SOCKET_IFNAME``: the interface holding that address (an explicit one is kept);
    - ``rdzv_conf`` gets ``is_host=true`` on the machine that holds the endpoint's address:
      torch decides who serves the rendezvous store by comparing the endpoint with the
      addresses of this machine's *host name* only, so an endpoint on another interface (or a
      host name mapped to 127.0.1.1) leaves every node waiting as a client of a store nobody
      serves.

    - ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: each round's workers get a store of their own
      (served by rank 0 on a free port) instead of sharing the agent's. With the shared one, a
      host that comes back after dying never joins: its fresh agent waits for the store address
      that rank 0's agent publishes only in its first round (``DynamicRendezvousHandler``
      caches it), while that agent waits for the new one; and the workers' per-attempt keys
      follow each agent's own restart count, which a fresh agent resets (pytorch#135712).

    A single-node config is returned as is; one whose address would be a loopback one (the
    endpoint names this machine by a loopback alias) keeps torch's address defaults.
    """
    if not config.rdzv_endpoint or config.nnodes == "1":
        return config, {}
    env = {}
    if "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in os.environ:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    host, _ = _split_endpoint(config.rdzv_endpoint)
    addr = config.local_addr or _route_source(config.rdzv_endpoint)
    if addr is None:
        raise StokerError(
            f"this machine has no IPv4 route to the rendezvous endpoint {config.rdzv_endpoint}; "
            "check the address, or pass --local-addr with this node's address"
        )
    ip = _ipv4(addr, "--local-addr")
    if ipaddress.ip_address(ip).is_loopback and not config.local_addr:
        return config, env
    interfaces = interface_addresses()
    if "GLOO_SOCKET_IFNAME" not in os.environ:
        names = [name for name, a in interfaces.items() if a == ip]
        if not names:
            known = ", ".join(f"{n} {a}" for n, a in interfaces.items()) or "none"
            raise StokerError(
                f"--local-addr {addr} is not an address of this machine (interfaces: {known}); "
                "give this node's own address, or set GLOO_SOCKET_IFNAME"
            )
        env["GLOO_SOCKET_IFNAME"] = names[0]
    rdzv_conf = config.rdzv_conf
    settings = [kv.split("=")[0] for kv in (rdzv_conf or "").split(",")]
    dynamic = config.node_rank is None
    if dynamic and "is_host" not in settings and _ipv4(host, "--rdzv") in interfaces.values():
        rdzv_conf = f"{rdzv_conf},is_host=true" if rdzv_conf else "is_host=true"
    return replace(config, local_addr=addr, rdzv_conf=rdzv_conf), env


def grace_seconds(run_dir: Path) -> tuple[int, str]:
    """The workers' grace period after a signal, and one line saying where it comes from.

    Three times the last complete save ``run_dir`` measured, plus 10 s for the step or two the
    ranks take to agree and for the run's own exit; never below torchrun's 30 s.
    """
    from stoker.records import read_record

    try:
        measured = read_record(run_dir).get("checkpoint_seconds") or {}
    except (OSError, ValueError):
        measured = {}
    seconds = measured.get("seconds") if isinstance(measured, dict) else None
    if not isinstance(seconds, int | float):
        return TORCHRUN_GRACE_S, (
            f"workers get torchrun's {TORCHRUN_GRACE_S} s after a signal to save and exit "
            "(no save measured yet in this run directory)"
        )
    grace = max(TORCHRUN_GRACE_S, math.ceil(3 * seconds + 10))
    return grace, (
        f"workers get {grace} s after a signal to save and exit (the last save took "
        f"{seconds:.1f} s; torchrun's default is {TORCHRUN_GRACE_S} s)"
    )


def launch(config: LaunchConfig) -> int:
    """Run the job to completion; returns the exit code (0 when every worker succeeded)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import get_args_parser, run

    from stoker.records import RUN_DIR_ENV, resolve_run_dir
    from stoker.records.run import LAUNCH_COMMAND_ENV

    command = [sys.executable, "-m", "stoker", "run", *_stoker_run_argv(config)]
    config, network_env = for_this_node(config)
    if config.local_addr:
        interface = network_env.get("GLOO_SOCKET_IFNAME", os.environ.get("GLOO_SOCKET_IFNAME"))
        store = ", serves the rendezvous" if "is_host=true" in (config.rdzv_conf or "") else ""
        print(
            f"stoker run: this node is {config.local_addr}, gloo binds to {interface}{store}",
            file=sys.stderr,
        )
    os.environ.update(network_env)  # the workers inherit this process's environment
    low, _, high = config.nnodes.partition(":")
    if high and high != low:
        print(
            f"stoker run: --nnodes {config.nnodes} admits a node by restarting every worker; "
            "a stoker run resumes only on as many processes as wrote its checkpoint, so a node "
            "that joins after the first checkpoint stops the job with one line",
            file=sys.stderr,
        )
    # One run directory for every worker and every restart of this job: a restarted worker
    # finds the last good checkpoint there and resumes (Stoker's resume="auto").
    if RUN_DIR_ENV not in os.environ:
        os.environ[RUN_DIR_ENV] = str(resolve_run_dir(Path(config.script).stem))
    run_dir = Path(os.environ[RUN_DIR_ENV])
    if GRACE_ENV in os.environ:
        print(f"stoker run: workers get ${GRACE_ENV} s after a signal", file=sys.stderr)
        grace = int(os.environ[GRACE_ENV])
    else:
        grace, why = grace_seconds(run_dir)
        print(f"stoker run: {why}", file=sys.stderr)
    argv = torchrun_argv(replace(config, grace=grace))
    args = get_args_parser().parse_args(argv)
    os.environ[LAUNCH_COMMAND_ENV] = json.dumps(command)
    if config.nproc > 1 and "OMP_NUM_THREADS" not in os.environ:
        # torchrun would set 1 thread per worker (and warn); share this machine's cores instead.
        # The workers inherit this process's environment.
        os.environ["OMP_NUM_THREADS"] = str(max(1, _available_cores() // config.nproc))
    # The agent logs each worker failure with a multi-line dump; the worker already printed
    # its own error, so keep the agent to one line per problem.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
    except SignalException as exc:
        return _signalled(exc.sigval, run_dir)
    except ChildFailedError as exc:
        failures = exc.failures
        if _recorded_preemption(run_dir) is not None:
            # The workers were signalled directly (SLURM signals every process of the step),
            # not through the agent; once one had exited the agent stopped the others.
            return _signalled(None, run_dir)
        rank, first = min(failures.items())
        raise WorkerFailed(
            f"{len(failures)} worker(s) failed; first: rank {rank} exited with code "
            f"{first.exitcode} (its own message is above)",
            exitcode=first.exitcode if first.exitcode > 0 else 1,
        ) from None
    except RendezvousError as exc:
        raise StokerError(_rendezvous_failed(config, exc)) from None
    return 0


def _recorded_preemption(run_dir: Path) -> dict[str, Any] | None:
    """``record.json``'s ``preempted`` (signal, step) if this attempt ended preempted (each
    attempt's start sets the status back to ``running``)."""
    from stoker.records import read_record

    try:
        record = read_record(run_dir)
    except (OSError, ValueError):
        return None
    preempted = record.get("preempted")
    return (
        preempted if record.get("status") == "preempted" and isinstance(preempted, dict) else None
    )


def _signalled(signum: int | None, run_dir: Path) -> int:
    """The exit code after a signal stopped the job: 143 when the run recorded its preemption
    (its checkpoint is written: requeue), else 128 + the signal, as a shell reports it."""

    name = signal.Signals(signum).name if signum is not None else "a signal"
    preempted = _recorded_preemption(run_dir)
    if preempted is not None:
        print(
            f"stoker run: {name}: the workers saved step {preempted.get('step')} and stopped; "
            f"exit code {PREEMPTED_EXIT_CODE} (preempted: run the same command again to resume)",
            file=sys.stderr,
        )
        return PREEMPTED_EXIT_CODE
    code = 128 + signum if signum is not None else 1
    print(
        f"stoker run: {name}: the workers stopped without recording a preemption (no stoker "
        f"run, or it had not started its steps); exit code {code}",
        file=sys.stderr,
    )
    return code


def _rendezvous_failed(config: LaunchConfig, exc: Exception) -> str:
    """One line for a rendezvous that failed, saying what to do."""
    from torch.distributed.elastic.rendezvous.api import (
        RendezvousConnectionError,
        RendezvousTimeoutError,
    )

    where = f"the rendezvous at {config.rdzv_endpoint}"
    if isinstance(exc, RendezvousConnectionError):
        return (
            f"lost {where}: the node serving it (the one holding that address; it runs in that "
            "node's `stoker run`) stopped or is unreachable, and torch's c10d rendezvous has no "
            "other copy; start `stoker run` again on every node, the run resumes from its last "
            "checkpoint"
        )
    if isinstance(exc, RendezvousTimeoutError):
        return (
            f"not enough nodes joined {where} in time (--nnodes {config.nnodes}; the wait is "
            "--rdzv-conf join_timeout=SECONDS, default 600): start `stoker run` on every node "
            "with the same --rdzv and --rdzv-id"
        )
    detail = str(exc).splitlines()[0] if str(exc) else ""
    return f"{where} failed ({type(exc).__name__}: {detail})"


class WorkerFailed(StokerError):
    def __init__(self, message: str, *, exitcode: int) -> None:
        super().__init__(message)
        self.exitcode = exitcode
