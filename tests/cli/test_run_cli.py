"""`stoker run`: bad input is one clear line, never a traceback; torchrun argv is right."""

import subprocess
import sys
from dataclasses import replace

import pytest

from stoker.runtime.launch import LaunchConfig, for_this_node, interface_addresses, torchrun_argv


def _stoker(*args, cwd=None):
    command = [sys.executable, "-m", "stoker", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd)


def _one_error_line(done, match):
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr + done.stdout
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("stoker: error:") and match in lines[0], lines[0]


def test_nproc_zero(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    done = _stoker("run", "--nproc", "0", str(script))
    assert done.returncode == 2
    _one_error_line(done, "--nproc 0")


def test_missing_script(tmp_path):
    done = _stoker("run", str(tmp_path / "nope.py"))
    assert done.returncode == 2
    _one_error_line(done, "does not exist")


@pytest.mark.parametrize(
    ("code", "match"),
    [
        ("Stoker(precision='fp8')", "precision='fp8'"),
        ("Stoker(device='cuda')", "device='cuda'"),
    ],
)
def test_bad_settings_in_a_plain_script_are_one_line(tmp_path, code, match):
    import torch

    if "cuda" in code and torch.cuda.is_available():
        pytest.skip("has a GPU")
    script = tmp_path / "train.py"
    script.write_text(f"from stoker import Stoker\n{code}\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    _one_error_line(done, match)


def test_bad_settings_under_stoker_run_have_no_traceback(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("from stoker import Stoker\nStoker(precision='fp8')\n")
    done = _stoker("run", str(script))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr + done.stdout
    assert "precision='fp8' is not known" in done.stderr


def test_script_args_pass_through(tmp_path):
    script = tmp_path / "echo.py"
    script.write_text("import sys, os\nprint(sys.argv[1:], os.environ['WORLD_SIZE'])\n")
    done = _stoker("run", str(script), "--lr", "3", "x")
    assert done.returncode == 0, done.stderr
    assert "['--lr', '3', 'x'] 1" in done.stdout


def test_multi_node_argv(tmp_path):
    script = tmp_path / "t.py"
    script.write_text("")
    config = LaunchConfig(
        script=str(script), nproc=4, nnodes="2", rdzv_endpoint="node0:29500", max_restarts=3
    )
    argv = torchrun_argv(config)
    assert "--standalone" not in argv
    assert argv[argv.index("--rdzv-endpoint") + 1] == "node0:29500"
    assert argv[argv.index("--max-restarts") + 1] == "3"
    assert argv[-2:] == ["stoker.runtime.entry", str(script)]


def test_multi_node_needs_an_endpoint(tmp_path):
    script = tmp_path / "t.py"
    script.write_text("")
    from stoker import StokerError

    with pytest.raises(StokerError, match="--rdzv HOST:PORT"):
        LaunchConfig(script=str(script), nnodes="2")


def test_multi_node_binds_to_the_address_given(tmp_path, monkeypatch):
    script = tmp_path / "t.py"
    script.write_text("")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    config = LaunchConfig(
        script=str(script), nnodes="2", rdzv_endpoint="127.0.0.1:29500", local_addr="127.0.0.1"
    )
    node, env = for_this_node(config)
    loopback = [name for name, addr in interface_addresses().items() if addr == "127.0.0.1"]
    assert env == {"GLOO_SOCKET_IFNAME": loopback[0], "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    # This machine holds the endpoint's address, so it serves the rendezvous store.
    assert node.rdzv_conf == "is_host=true"
    argv = torchrun_argv(node)
    assert argv[argv.index("--local-addr") + 1] == "127.0.0.1"
    assert argv[argv.index("--rdzv-conf") + 1] == "is_host=true"
    # Without --local-addr, a loopback endpoint leaves torch's address defaults alone.
    alone = replace(config, local_addr=None)
    assert for_this_node(alone) == (alone, {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    # An explicit choice is kept.
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth9")
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "0")
    kept = replace(config, rdzv_conf="is_host=false,last_call_timeout=2")
    assert for_this_node(kept) == (kept, {})


def test_multi_node_input_errors(tmp_path, monkeypatch):
    script = tmp_path / "t.py"
    script.write_text("")
    from stoker import StokerError

    with pytest.raises(StokerError, match="is not HOST:PORT"):
        LaunchConfig(script=str(script), nnodes="2", rdzv_endpoint="node0")
    for nnodes in ("0", "two", "3:2", "1:", ":2"):
        with pytest.raises(StokerError, match="is neither a number of machines nor a MIN:MAX"):
            LaunchConfig(script=str(script), nnodes=nnodes, rdzv_endpoint="a:1")
    for nnodes, rank in (("2", 2), ("1:2", 0), ("2", -1)):
        with pytest.raises(StokerError, match="needs a fixed --nnodes N with 0 <= rank < N"):
            LaunchConfig(script=str(script), nnodes=nnodes, rdzv_endpoint="a:1", node_rank=rank)
    static = LaunchConfig(script=str(script), nnodes="2", rdzv_endpoint="a:1", node_rank=1)
    argv = torchrun_argv(static)
    assert argv[argv.index("--rdzv-backend") + 1] == "static"
    assert argv[argv.index("--node-rank") + 1] == "1"
    with pytest.raises(StokerError, match="'join_timeout' is not KEY=VALUE"):
        LaunchConfig(script=str(script), nnodes="2", rdzv_endpoint="a:1", rdzv_conf="join_timeout")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    elsewhere = LaunchConfig(
        script=str(script), nnodes="2", rdzv_endpoint="127.0.0.1:1", local_addr="198.51.100.77"
    )
    with pytest.raises(StokerError, match=r"198.51.100.77 is not an address of this machine .*lo"):
        for_this_node(elsewhere)
