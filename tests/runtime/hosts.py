"""Two hosts on one machine, for multi-node tests: two network namespaces joined by a veth pair.

    host a: netns stoker-<pid>-<n>-a, interface stk<pid>a<n>, 10.77.0.1/24, lo up
    host b: netns stoker-<pid>-<n>-b, interface stk<pid>b<n>, 10.77.0.2/24, lo up

Each namespace has its loopback and its end of the veth pair, and no other interface or route
(its only route is the connected 10.77.0.0/24): by construction nothing a process inside sends
can leave the pair. Names carry the creating process's pid, so parallel runs never collide, and
namespaces left by a crashed run (their pid is dead) are deleted before new ones are made. The
filesystem, pids and host name are shared, as on two machines with a shared filesystem.

Needs root and iproute2 (``ip``); :func:`unavailable` says why when they are missing.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.77.0.0/24"
_NAME = re.compile(r"stoker-(\d+)-(\d+)-[ab]$")
_counter = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def unavailable() -> str | None:
    """Why two hosts cannot be made on this machine, or None if they can."""
    if shutil.which("ip") is None:
        return "two-host tests need iproute2's `ip` (Debian: apt-get install -y iproute2)"
    if os.geteuid() != 0:
        return (
            f"two-host tests create network namespaces and need root (running as uid "
            f"{os.geteuid()}); run them as root, e.g. in CI's container"
        )
    probe = f"stoker-{os.getpid()}-probe"
    done = _ip("netns", "add", probe, check=False)
    if done.returncode != 0:
        return f"cannot create a network namespace (`ip netns add` said: {done.stderr.strip()})"
    _ip("netns", "del", probe, check=False)
    return None


def _pids_in(netns: str) -> list[int]:
    done = _ip("netns", "pids", netns, check=False)
    return [int(p) for p in done.stdout.split()]


def _delete(netns: str) -> None:
    """SIGKILL every process in ``netns``, then delete it (its veth end and the peer go too)."""
    for _ in range(50):
        pids = _pids_in(netns)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    _ip("netns", "del", netns, check=False)


def clean_leftovers() -> list[str]:
    """Delete the namespaces of earlier runs whose process is gone; returns their names."""
    names = [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line]
    gone = []
    for name in names:
        match = _NAME.match(name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            _delete(name)
            gone.append(name)
    return gone


@dataclass
class Host:
    """One namespace: a host with one interface on the pair."""

    netns: str
    ifname: str
    addr: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, argv: list[str], *, log: Path, env: dict[str, str], cwd: Path):
        """Start ``argv`` inside this host, in a new session (so its process group can be
        killed), output to ``log``. ``ip netns exec`` keeps the environment."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def kill(self) -> list[int]:
        """The host dies: SIGKILL every process in it (torchrun's workers run in sessions of
        their own, so killing the agent's process group alone would leave them training).
        Returns the pids killed."""
        pids = _pids_in(self.netns)
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in self.procs:
            proc.wait(timeout=20)
        return pids

    def run(self, *args: str) -> str:
        """Output of a command run inside this host (e.g. ``ss -tn``)."""
        cmd = ["ip", "netns", "exec", self.netns, *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout

    def routes(self) -> list[str]:
        return _ip("-n", self.netns, "-4", "route", "show").stdout.splitlines()

    def links(self) -> list[str]:
        lines = _ip("-n", self.netns, "-o", "link", "show").stdout.splitlines()
        return [line.split(":")[1].strip().split("@")[0] for line in lines]

    def tx_bytes(self) -> int:
        path = f"/sys/class/net/{self.ifname}/statistics/tx_bytes"
        return int(self.run("cat", path))


class TwoHosts:
    """``with TwoHosts() as (a, b):`` two hosts on a veth pair, deleted on exit (every process
    left in them is SIGKILLed first), whatever happened inside."""

    def __init__(self) -> None:
        n = next(_counter)
        pid = os.getpid()
        self.a = Host(f"stoker-{pid}-{n}-a", f"stk{pid}a{n}"[-15:], "10.77.0.1")
        self.b = Host(f"stoker-{pid}-{n}-b", f"stk{pid}b{n}"[-15:], "10.77.0.2")

    def __enter__(self) -> tuple[Host, Host]:
        clean_leftovers()
        try:
            for host in (self.a, self.b):
                _ip("netns", "add", host.netns)
            _ip(
                "link", "add", self.a.ifname, "netns", self.a.netns, "type", "veth",
                "peer", "name", self.b.ifname, "netns", self.b.netns,
            )  # fmt: skip
            for host in (self.a, self.b):
                _ip("-n", host.netns, "addr", "add", f"{host.addr}/24", "dev", host.ifname)
                _ip("-n", host.netns, "link", "set", host.ifname, "up")
                _ip("-n", host.netns, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self.a, self.b

    def __exit__(self, *exc: object) -> None:
        for host in (self.a, self.b):
            _delete(host.netns)
