"""The three subcommands work through the `stoker` entry point (registered by the lead)."""

import pytest

import stoker.cli


@pytest.fixture
def cli(monkeypatch):
    names = tuple(dict.fromkeys((*stoker.cli._SUBCOMMANDS, "runs", "reproduce", "check_resume")))
    monkeypatch.setattr(stoker.cli, "_SUBCOMMANDS", names)
    return stoker.cli.main


def test_runs_on_an_empty_root(cli, tmp_path, capsys):
    assert cli(["runs", "--root", str(tmp_path)]) == 0
    assert "no runs" in capsys.readouterr().out


def test_unknown_run_is_one_line_error(cli, tmp_path, capsys):
    assert cli(["runs", "--root", str(tmp_path), "show", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stoker: error: no runs under") and err.count("\n") == 1


def test_check_resume_passes_script_arguments_through(cli, tmp_path, capsys, monkeypatch):
    seen = {}

    def fake(script, script_args, config, echo):
        seen.update(script=script, args=script_args, kills=config.kills)
        raise stoker.cli.StokerError("stop here")

    monkeypatch.setattr("stoker.cli.check_resume.check_resume", fake)
    code = cli(["check-resume", "--kills", "3", "train.py", "--steps", "10", "--lr", "1"])
    assert code == 2
    assert seen == {"script": "train.py", "args": ["--steps", "10", "--lr", "1"], "kills": 3}


def test_help_texts(cli, capsys):
    for command in ("runs", "reproduce", "check-resume"):
        with pytest.raises(SystemExit) as info:
            cli([command, "--help"])
        assert info.value.code == 0
    assert "STOKER_RUN_DIR" in capsys.readouterr().out  # check-resume's contract
