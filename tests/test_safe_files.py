"""stoker.safe_files: what is read back from disk is a regular file, inside its root, bounded."""

import doctest
import json
import os
import socket

import pytest

import stoker.safe_files
from stoker.errors import StokerError
from stoker.safe_files import check_regular, read_bytes, read_json


def test_docstring_examples_run():
    result = doctest.testmod(stoker.safe_files, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_a_regular_file_is_read(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"x": 1}))
    assert read_json(tmp_path / "a.json", root=tmp_path) == {"x": 1}
    assert check_regular(tmp_path / "a.json") == len(json.dumps({"x": 1}))


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: os.mkfifo(p), "is a FIFO"),
        (lambda p: p.symlink_to("/dev/zero"), "is a symbolic link"),
        (lambda p: p.mkdir(), "is a directory"),
    ],
    ids=["fifo", "symlink-to-dev-zero", "directory"],
)
def test_anything_but_a_regular_file_is_refused_at_once(tmp_path, make, reason):
    make(tmp_path / "x.json")
    with pytest.raises(StokerError, match=reason) as info:
        read_json(tmp_path / "x.json")  # a FIFO would block here, /dev/zero never end
    assert "\n" not in str(info.value)


def test_a_socket_is_refused(tmp_path):
    path = tmp_path / "s"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        with pytest.raises(StokerError, match="is a socket"):
            read_bytes(path)


def test_a_file_reached_through_a_symlinked_directory_outside_the_root_is_refused(tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "record.json").write_text("{}")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "run").symlink_to(tmp_path / "outside")
    with pytest.raises(StokerError, match="outside"):
        read_json(tmp_path / "root" / "run" / "record.json", root=tmp_path / "root")
    assert read_json(tmp_path / "outside" / "record.json", root=tmp_path) == {}


def test_size_limit_and_top_level_type(tmp_path):
    (tmp_path / "big.json").write_text(json.dumps(list(range(1000))))
    with pytest.raises(StokerError, match=r"has 4890 bytes, more than the 100 expected"):
        read_json(tmp_path / "big.json", expect=list, limit=100)
    with pytest.raises(StokerError, match="holds a JSON array where a JSON object belongs"):
        read_json(tmp_path / "big.json")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(StokerError, match="nested too deeply"):
        read_json(tmp_path / "deep.json", expect=list)


def test_a_missing_file_is_a_file_not_found_error_for_the_caller_to_explain(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_bytes(tmp_path / "absent")


def test_the_callers_error_type_is_raised(tmp_path):
    class MyError(Exception):
        pass

    os.mkfifo(tmp_path / "f")
    with pytest.raises(MyError, match="FIFO"):
        read_bytes(tmp_path / "f", error=MyError)
