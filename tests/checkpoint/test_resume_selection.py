import os
import warnings

import pytest
import torch

from stoker.checkpoint import (
    CheckpointWarning,
    checkpoint_name,
    latest_valid,
    list_checkpoints,
    load,
    prune,
    save,
)
from stoker.checkpoint.resume import remove_leftovers


def _series(root, steps=(10, 20, 30)):
    model = torch.nn.Linear(4, 4)
    for s in steps:
        with torch.no_grad():
            model.weight.fill_(s)
        save(root / checkpoint_name(s), {"model": model, "step": s})
    return model


def test_latest_valid_picks_the_newest(tmp_path):
    _series(tmp_path)
    assert latest_valid(tmp_path) == tmp_path / checkpoint_name(30)
    # A run directory holding checkpoints/ works too.
    _series(tmp_path / "run" / "checkpoints")
    assert latest_valid(tmp_path / "run").name == checkpoint_name(30)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("truncate", "truncated"),
        ("corrupt", "SHA-256"),
        ("no_manifest", "never completed"),
        ("delete_file", "missing"),
    ],
)
def test_damaged_newest_is_skipped_with_a_warning_naming_it(tmp_path, damage, reason):
    model = _series(tmp_path)
    newest = tmp_path / checkpoint_name(30)
    weights = newest / "model.safetensors"
    if damage == "truncate":
        os.truncate(weights, weights.stat().st_size // 2)
    elif damage == "corrupt":
        raw = bytearray(weights.read_bytes())
        raw[len(raw) // 2] ^= 1
        weights.write_bytes(bytes(raw))
    elif damage == "no_manifest":
        (newest / "manifest.json").unlink()
    else:
        weights.unlink()
    with pytest.warns(
        CheckpointWarning, match=rf"skipping checkpoint .*{checkpoint_name(30)}.*{reason}"
    ):
        chosen = latest_valid(tmp_path)
    assert chosen == tmp_path / checkpoint_name(20)
    state = {"model": model, "step": None}
    load(chosen, state)
    assert state["step"] == 20 and model.weight.eq(20).all()


def test_nothing_valid_returns_none(tmp_path):
    assert latest_valid(tmp_path / "absent") is None
    _series(tmp_path, steps=(1,))
    (tmp_path / checkpoint_name(1) / "manifest.json").unlink()
    with pytest.warns(CheckpointWarning):
        assert latest_valid(tmp_path) is None


def test_unfinished_temporary_directories_are_ignored_and_cleaned(tmp_path):
    _series(tmp_path, steps=(10,))
    (tmp_path / ".tmp-step-00000020").mkdir()  # a save that crashed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert latest_valid(tmp_path).name == checkpoint_name(10)
    assert remove_leftovers(tmp_path) == [tmp_path / ".tmp-step-00000020"]


def test_a_checkpoint_moved_aside_is_deleted_not_moved_back(tmp_path):
    # A crash between the two renames of a replacement leaves `.old-<name>-<pid>`; nothing
    # proves who wrote such a directory, so it is never promoted (see remove_leftovers).
    _series(tmp_path, steps=(10, 20))
    os.rename(tmp_path / checkpoint_name(20), tmp_path / f".old-{checkpoint_name(20)}-123")
    assert remove_leftovers(tmp_path) == [tmp_path / f".old-{checkpoint_name(20)}-123"]
    assert latest_valid(tmp_path).name == checkpoint_name(10)


def test_prune_keeps_the_newest(tmp_path):
    _series(tmp_path, steps=(1, 2, 3, 4, 5))
    removed = prune(tmp_path, keep_last=2)
    assert [p.name for p in removed] == [checkpoint_name(s) for s in (1, 2, 3)]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
