"""Bad command-line values are refused in one line naming the flag, before any work starts:
no traceback, no script run, no output written."""

import subprocess
import sys

import pytest

from stoker.bench import BenchConfig, bench_parser
from stoker.cli import main
from stoker.errors import StokerError

SCRIPT = "open({marker!r}, 'w').write('ran')\n"


@pytest.fixture
def script(tmp_path):
    """A script that leaves a marker file if it ever runs."""
    path = tmp_path / "train.py"
    path.write_text(SCRIPT.format(marker=str(tmp_path / "ran")))
    return path


def _one_line(capsys, argv, match):
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and "Traceback" not in out + err, err
    assert lines[0].startswith("stoker: error: ") and match in lines[0], lines[0]
    return lines[0]


def test_doctor_refuses_an_unwritable_report_path_before_running_the_script(script, capsys):
    _one_line(
        capsys,
        ["doctor", "--json", "/nonexistent/dir/x.json", str(script)],
        "--json /nonexistent/dir/x.json: cannot write there, /nonexistent/dir does not exist",
    )
    assert not (script.parent / "ran").exists()
    _one_line(capsys, ["doctor", "--trace", str(script.parent), str(script)], "is a directory")
    _one_line(capsys, ["doctor", "--steps", "0", str(script)], "--steps 0: needs at least 1")
    assert not (script.parent / "ran").exists()


def test_doctor_says_a_directory_is_a_directory(tmp_path, capsys):
    _one_line(capsys, ["doctor", str(tmp_path)], f"'{tmp_path}' is a directory, not a script")


def test_check_resume_refuses_a_file_as_workdir_and_a_negative_timeout(script, capsys):
    _one_line(
        capsys,
        ["check-resume", "--workdir", "/etc/passwd", str(script)],
        "cannot use /etc/passwd as the work directory: Not a directory",
    )
    _one_line(capsys, ["check-resume", "--timeout", "-5", str(script)], "--timeout -5 is not")
    assert not (script.parent / "ran").exists()


def test_reproduce_refuses_a_negative_timeout_and_tolerance(capsys):
    _one_line(capsys, ["reproduce", "--timeout", "-5", "-1"], "--timeout -5 is not")
    _one_line(capsys, ["reproduce", "--tolerance", "nan", "-1"], "--tolerance nan is not")


@pytest.mark.parametrize("minutes", ["nan", "-1", "0", "inf"])
def test_experiment_refuses_a_budget_that_is_not_a_positive_number(tmp_path, capsys, minutes):
    argv = ["experiment", "train-large-then-compress", "--budget-minutes", minutes]
    _one_line(capsys, [*argv, "--out", str(tmp_path / "out")], f"--budget-minutes {minutes} is")
    assert not (tmp_path / "out").exists()


def test_repeats_zero_is_refused_up_front_naming_the_flag(tmp_path, capsys):
    argv = ["compress", str(tmp_path / "no-such-run"), "--repeats", "0"]
    _one_line(capsys, argv, "--repeats 0: needs at least 1")
    parser = bench_parser("x")
    with pytest.raises(StokerError, match=r"--repeats 0: needs at least 1"):
        BenchConfig.from_args(parser.parse_args(["--repeats", "0"]))


@pytest.mark.parametrize("variable", ["STOKER_RUNS_DIR", "STOKER_RUN_DIR"])
def test_a_run_directory_that_cannot_be_created_is_one_line(variable, monkeypatch):
    # Tests run as root, for whom permissions do not stop mkdir: a path under a file does.
    monkeypatch.setenv(variable, "/etc/passwd/runs")
    code = "from stoker import Stoker; Stoker(device='cpu')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith("stoker: error: cannot create the run directory /etc/passwd/runs")
    assert f"point ${variable} at a writable directory" in lines[0]
