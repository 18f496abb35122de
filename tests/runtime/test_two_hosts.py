"""Two hosts, for real: `stoker run --nnodes` between two network namespaces on a veth pair.

Host a is 10.77.0.1 and serves the c10d rendezvous, host b is 10.77.0.2 (see hosts.py); each
runs `stoker run --nnodes 2 --nproc 1 --rdzv 10.77.0.1:29400 hosts_job.py`. They share the
filesystem, so one run directory ($STOKER_RUN_DIR), as two machines with a shared filesystem.
Needs root and iproute2: without them each test fails saying why (never a skip).
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hosts import SUBNET, Host, TwoHosts, clean_leftovers, unavailable

import stoker

JOB = Path(__file__).with_name("hosts_job.py")
RDZV = "10.77.0.1:29400"
REFUSAL = "the checkpoint was written by 1 process(es) and this run has 2"


@pytest.fixture
def hosts():
    reason = unavailable()
    if reason:
        pytest.fail(reason, pytrace=False)
    with TwoHosts() as pair:
        yield pair


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run on one host: `stoker run --nproc 2`, the same job."""
    tmp = tmp_path_factory.mktemp("one-host")
    out = tmp / "one-host.pt"
    env = {**_env(tmp / "run"), "STEP_SECONDS": "0"}
    cmd = [sys.executable, "-m", "stoker", "run", "--nproc", "2", str(JOB), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return torch.load(out, weights_only=True)


def _env(run_dir: Path, **extra: str) -> dict[str, str]:
    # One thread per worker on every side, so the one-host run does the same arithmetic;
    # a bounded collective timeout, so a host that dies is a failure, never a hang.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STOKER_COLLECTIVE_TIMEOUT": "30"}
    return {**env, "STOKER_RUN_DIR": str(run_dir), **extra}


def _node(out: Path, *options: str, nnodes: str = "2") -> list[str]:
    cmd = [sys.executable, "-m", "stoker", "run", "--nnodes", nnodes, "--nproc", "1"]
    return [*cmd, "--rdzv", RDZV, *options, str(JOB), str(out)]


def _wait(procs: list[subprocess.Popen[bytes]], logs: list[Path], seconds: float) -> list[int]:
    """Exit codes of ``procs``; a failure showing the logs if one is still running after
    ``seconds`` (the hosts fixture then kills everything left)."""
    deadline = time.monotonic() + seconds
    try:
        return [p.wait(timeout=max(0.1, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {seconds:.0f} s:\n{_tails(logs)}", pytrace=False)


def _tails(logs: list[Path]) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in logs if p.exists())


def _until_checkpoint(run_dir: Path, logs: list[Path], seconds: float = 90) -> int:
    """Wait for the run's first checkpoint after step 0 (stoker saves step 0 when it starts)
    and return its step."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        steps = [
            int(p.name.removeprefix("step-")) for p in (run_dir / "checkpoints").glob("step-*")
        ]
        if steps and max(steps) > 0:
            return max(steps)
        time.sleep(0.1)
    pytest.fail(f"no checkpoint after {seconds:.0f} s:\n{_tails(logs)}", pytrace=False)


def _connections(host: Host) -> list[tuple[str, str]]:
    """(local, peer) addresses of the TCP connections open in ``host``."""
    rows = [line.split() for line in host.run("ss", "-Htn").splitlines()]
    return [(r[3].rsplit(":", 1)[0], r[4].rsplit(":", 1)[0]) for r in rows if len(r) >= 5]


def _inside(address: str) -> bool:
    ip = ipaddress.ip_address(address.strip("[]").removeprefix("::ffff:"))
    return ip.is_loopback or ip in ipaddress.ip_network(SUBNET)


def test_namespaces_left_by_a_crashed_run_are_deleted():
    reason = unavailable()
    if reason:
        pytest.fail(reason, pytrace=False)
    dead = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # no process has this pid
    name = f"stoker-{dead}-0-a"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=20)
    assert name in clean_leftovers()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=20)
    assert name not in listed.stdout


@pytest.mark.parametrize(
    "ranks", [None, pytest.param((0, 1), marks=pytest.mark.slow)], ids=["c10d", "static"]
)
def test_two_hosts_train_like_two_processes_on_one(hosts, reference, tmp_path, ranks):
    """c10d: the dynamic rendezvous assigns ranks; static: `--node-rank 0` / `--node-rank 1`."""
    a, b = hosts
    # By construction nothing leaves the pair: each host has its loopback and its veth end,
    # and no route but the veth's subnet.
    for host in (a, b):
        assert host.links() == ["lo", host.ifname]
        assert [route.split()[0] for route in host.routes()] == [SUBNET]
    # `ip netns exec` keeps the environment: the hosts run the stoker under test.
    here = a.run(sys.executable, "-c", "import stoker; print(stoker.__file__)").strip()
    assert here == stoker.__file__
    out = tmp_path / "two-hosts.pt"
    env = _env(tmp_path / "run")
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    options = [[], []] if ranks is None else [["--node-rank", str(r)] for r in ranks]
    procs = [
        h.start(_node(out, *opts), log=log, env=env, cwd=tmp_path)
        for h, log, opts in zip(hosts, logs, options, strict=True)
    ]
    assert _wait(procs, logs, 100) == [0, 0], _tails(logs)
    a_log, b_log = (log.read_text() for log in logs)
    serves = ", serves the rendezvous" if ranks is None else ""  # (static: node 0 does)
    assert f"this node is {a.addr}, gloo binds to {a.ifname}{serves}\n" in a_log
    assert f"this node is {b.addr}, gloo binds to {b.ifname}\n" in b_log
    # The gradients' all-reduce crossed the link (a's rank sends b its half of every bucket).
    assert min(a.tx_bytes(), b.tx_bytes()) > 20_000
    lines = sorted((out.parent / (out.name + ".log")).read_text().split("\n")[:-1])
    assert lines == [f"{a.ifname} restart=0 world=2 rank=0", f"{b.ifname} restart=0 world=2 rank=1"]

    two = torch.load(out, weights_only=True)
    assert two["resumed_from"] is None and len(two["losses"]) == 24
    assert all(torch.equal(two["losses"][s], loss) for s, loss in reference["losses"].items())
    for name, weight in reference["weights"].items():
        assert torch.equal(two["weights"][name], weight), name


@pytest.mark.slow
def test_a_host_killed_mid_run_rejoins_and_the_run_ends_bitwise(hosts, reference, tmp_path):
    """Host b dies (every process in it SIGKILLed: the agent's process group and its workers,
    which run in sessions of their own), then comes back: the agents re-rendezvous and the run
    finishes from the last checkpoint with the weights of a run never interrupted."""
    a, b = hosts
    out = tmp_path / "killed.pt"
    run_dir = tmp_path / "run"
    env = _env(run_dir, STEP_SECONDS="0.3")
    logs = [tmp_path / "a.log", tmp_path / "b.log", tmp_path / "b-again.log"]
    # A dead host leaves the rendezvous when it missed keep_alive_max_attempt (3) heartbeats,
    # one every keep_alive_interval seconds (torch's default 5: 15 s).
    elastic = ["--max-restarts", "1", "--rdzv-conf", "keep_alive_interval=1"]
    agent_a = a.start(_node(out, *elastic), log=logs[0], env=env, cwd=tmp_path)
    b.start(_node(out, *elastic), log=logs[1], env=env, cwd=tmp_path)
    step = _until_checkpoint(run_dir, logs)
    # Mid-run, every TCP connection of either host is on the veth pair or on loopback.
    connections = _connections(a) + _connections(b)
    assert connections and all(_inside(x) for pair in connections for x in pair), connections
    killed = time.monotonic()
    assert b.kill()
    agent_b = b.start(_node(out, *elastic), log=logs[2], env=env, cwd=tmp_path)
    assert _wait([agent_a, agent_b], logs, 110) == [0, 0], _tails(logs)
    print(f"host b killed after step {step}; the run ended {time.monotonic() - killed:.0f} s later")

    got = torch.load(out, weights_only=True)
    assert got["resumed_from"] >= step >= 3
    for name, weight in reference["weights"].items():
        assert torch.equal(got["weights"][name], weight), name
    for s, loss in got["losses"].items():  # the steps trained after the resume
        assert torch.equal(loss, reference["losses"][s]), s
    starts = (out.parent / (out.name + ".log")).read_text()
    assert f"{a.ifname} restart=1 world=2" in starts  # a's agent restarted its worker


@pytest.mark.slow
def test_the_rendezvous_host_killed_stops_the_other_then_both_resume(hosts, reference, tmp_path):
    """Host a serves the c10d rendezvous store inside its `stoker run`: when it dies there is
    no rendezvous left to rejoin. Host b's agent stops within seconds with one line saying so
    (never a hang), and `stoker run` started again on both resumes the last checkpoint."""
    a, b = hosts
    out = tmp_path / "killed.pt"
    run_dir = tmp_path / "run"
    env = _env(run_dir, STEP_SECONDS="0.3")
    elastic = ["--max-restarts", "1", "--rdzv-conf", "keep_alive_interval=1"]
    logs = [tmp_path / n for n in ("a.log", "b.log", "a-again.log", "b-again.log")]
    a.start(_node(out, *elastic), log=logs[0], env=env, cwd=tmp_path)
    agent_b = b.start(_node(out, *elastic), log=logs[1], env=env, cwd=tmp_path)
    step = _until_checkpoint(run_dir, logs)
    killed = time.monotonic()
    assert a.kill()
    assert _wait([agent_b], logs, 60) == [2]  # stoker's exit code for an error line
    print(f"host a killed after step {step}: b stopped {time.monotonic() - killed:.0f} s later")
    assert "stoker: error: lost the rendezvous at 10.77.0.1:29400" in logs[1].read_text()
    assert "\nTraceback" not in logs[1].read_text()  # (the worker's own has a [rank1]: prefix)

    agents = [
        h.start(_node(out, *elastic), log=log, env=env, cwd=tmp_path)
        for h, log in ((a, logs[2]), (b, logs[3]))
    ]
    assert _wait(agents, logs, 100) == [0, 0], _tails(logs)
    got = torch.load(out, weights_only=True)
    assert got["resumed_from"] >= step >= 3
    for name, weight in reference["weights"].items():
        assert torch.equal(got["weights"][name], weight), name


@pytest.mark.slow
def test_elastic_nnodes_admits_a_second_host_at_a_restart(hosts, tmp_path):
    """`--nnodes 1:2`: host a starts alone (world size 1); host b joins; a's agent sees a node
    waiting, stops its worker and both re-rendezvous into world size 2. That restart resumes
    a checkpoint written by 1 process with 2, which stoker refuses (each rank resumes its own
    data shard: the shards would be cut differently). So a host is admitted into a running
    stoker job only before its first checkpoint; after that the job stops with one line."""
    a, b = hosts
    out = tmp_path / "elastic.pt"
    run_dir = tmp_path / "run"
    env = _env(run_dir, STEP_SECONDS="0.3")
    # Without last_call_timeout, a lone host waits 30 s (torch's default) for others.
    elastic = ["--rdzv-conf", "last_call_timeout=1"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    agent_a = a.start(_node(out, *elastic, nnodes="1:2"), log=logs[0], env=env, cwd=tmp_path)
    _until_checkpoint(run_dir, logs)
    agent_b = b.start(_node(out, *elastic, nnodes="1:2"), log=logs[1], env=env, cwd=tmp_path)
    codes = _wait([agent_a, agent_b], logs, 100)

    starts = (out.parent / (out.name + ".log")).read_text().split("\n")[:-1]
    assert starts[0] == f"{a.ifname} restart=0 world=1 rank=0"  # a alone first
    admitted = sorted(line.split(" rank=")[0] for line in starts[1:])
    # Membership changes do not use up --max-restarts: the restart count stays 0.
    assert admitted == [f"{a.ifname} restart=0 world=2", f"{b.ifname} restart=0 world=2"]
    assert "admits a node by restarting every worker" in logs[0].read_text()  # said up front
    assert REFUSAL in _tails(logs)
    assert codes[0] != 0 and codes[1] != 0
