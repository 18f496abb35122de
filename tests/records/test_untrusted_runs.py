"""Reading run directories back never hangs on, nor follows, what someone else put there."""

import contextlib
import json
import os

import pytest

from stoker.errors import StokerError
from stoker.records import list_runs, read_record
from stoker.records.diff import diff_runs
from stoker.records.metrics import read_metrics


def _run(root, name, **record):
    run = root / name
    run.mkdir(parents=True)
    doc = {"id": name, "name": "t", "status": "finished", "started": f"2026-01-0{len(name)}"}
    (run / "record.json").write_text(json.dumps({**doc, **record}))
    return run


@pytest.fixture
def fifos():
    made = []
    yield made.append
    for path in made:  # unblock a reader stuck in open() (the code before the fix)
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def test_listing_skips_a_fifo_record_and_ignores_fifo_metrics(tmp_path, fifos, finishes):
    _run(tmp_path, "a")
    (tmp_path / "bb").mkdir()
    os.mkfifo(tmp_path / "bb" / "record.json")
    fifos(tmp_path / "bb" / "record.json")
    os.mkfifo(tmp_path / "a" / "metrics.jsonl")
    fifos(tmp_path / "a" / "metrics.jsonl")
    runs = finishes(lambda: list_runs(tmp_path))
    assert [r.id for r in runs] == ["a"] and runs[0].steps is None
    with pytest.raises(StokerError, match="FIFO"):
        read_metrics(tmp_path / "a" / "metrics.jsonl")


def test_a_record_that_is_a_list_or_a_link_to_dev_zero_is_refused(tmp_path, finishes):
    run = tmp_path / "r"
    run.mkdir()
    (run / "record.json").write_text("[]")
    with pytest.raises(StokerError, match="JSON array where a JSON object belongs"):
        read_record(run)
    (run / "record.json").unlink()
    (run / "record.json").symlink_to("/dev/zero")
    with pytest.raises(StokerError, match="symbolic link"):
        finishes(lambda: read_record(run))


def test_a_run_directory_linked_in_from_outside_the_runs_root_is_not_listed(tmp_path):
    _run(tmp_path / "runs", "a")
    _run(tmp_path / "elsewhere", "bb")
    (tmp_path / "runs" / "bb").symlink_to(tmp_path / "elsewhere" / "bb")
    assert [r.id for r in list_runs(tmp_path / "runs")] == ["a"]


def test_diff_does_not_wait_on_a_fifo_patch(tmp_path, fifos, finishes):
    git = {"repo": str(tmp_path / "no-repo"), "revision": "abc", "patch": "code.patch"}
    a, b = _run(tmp_path, "a", git=git), _run(tmp_path, "bb", git=git)
    (a / "code.patch").write_text("+x\n")
    os.mkfifo(b / "code.patch")
    fifos(b / "code.patch")
    diff = finishes(lambda: diff_runs(a, b))
    assert "+x" in diff.code  # b's patch counted as empty, not waited on


def test_compress_reads_a_run_record_through_the_same_checks(tmp_path):
    from stoker.checkpoint import save
    from stoker.compress import load_trained
    from stoker.models import Encoder, EncoderConfig

    cfg = EncoderConfig(vocab_size=50, max_len=16, dim=16, layers=1, heads=2, ffn_dim=32)
    run = tmp_path / "run"
    save(run / "checkpoints" / "step-00000001", {"model": Encoder(cfg)})
    (run / "record.json").write_text("[]")  # a traceback (AttributeError) before
    with pytest.raises(StokerError, match="JSON array where a JSON object belongs"):
        load_trained(run)


# Each is a record.json field with a value of the wrong JSON type, as a hand edit, another
# tool or a damaged copy could leave it.
WRONG_TYPES = {
    "started": 12345,
    "host": "node-1",
    "summary": [],
    "heartbeat_seconds": "30",
    "git": {"repo": 5, "revision": "abc"},
    "world_size": "two",
    "command": {"argv": "python train.py"},
    "error": "boom",
    "attempts": [3],
    "versions": ["torch"],
}


@pytest.mark.parametrize("field", WRONG_TYPES)
def test_a_wrongly_typed_field_is_one_line_in_every_reader(tmp_path, capsys, field):
    import stoker.cli

    root = tmp_path / "runs"
    _run(root, "a")
    _run(root, "bb", **{field: WRONG_TYPES[field]})
    with pytest.raises(StokerError, match=rf"record.json: {field}\b.* where .* belongs"):
        read_record(root / "bb")
    assert stoker.cli.main(["runs", "--root", str(root)]) == 0  # the other runs are listed
    out, err = capsys.readouterr()
    assert "a" in out and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("stoker: warning: skipped ")
    assert str(root / "bb") in err and field in err
    assert stoker.cli.main(["runs", "--root", str(root), "show", "a"]) == 0
    capsys.readouterr()
    for argv in (
        ["runs", "--root", str(root), "show", "bb"],
        ["runs", "--root", str(root), "diff", "a", "bb"],
        ["reproduce", "bb", "--root", str(root)],
    ):
        assert stoker.cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("stoker: error: "), (argv, err)
        assert field in err, (argv, err)


def test_a_truncated_record_is_named_not_dropped_silently(tmp_path, capsys):
    import stoker.cli

    root = tmp_path / "runs"
    _run(root, "a")
    (_run(root, "bb") / "record.json").write_text('{"id": "bb", "name": "t", "sta')
    assert stoker.cli.main(["runs", "--root", str(root)]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"stoker: warning: skipped {root / 'bb'}") and "not valid JSON" in err
    assert stoker.cli.main(["runs", "--root", str(root), "show", "bb"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stoker: error: ") and "not valid JSON" in err and err.count("\n") == 1


def test_a_git_section_without_a_repository_is_compared_as_text(tmp_path):
    a = _run(tmp_path, "a", git={"revision": "abc"})
    b = _run(tmp_path, "bb", git={"revision": "def"})
    diff = diff_runs(a, b)
    assert "revision: abc -> def" in diff.code and "repository not available" in diff.code_note
