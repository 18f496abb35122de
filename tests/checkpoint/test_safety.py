"""A checkpoint can never execute code: planted pickle payloads are refused and never run.
Nor can one hang the reader, grow its memory, read outside the run, or load half-way: planted
FIFOs, symlinks and directories are refused, and so is content that does not hold together."""

import contextlib
import json
import os
import pickle
import shlex
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from stoker.checkpoint import (
    CheckpointConfig,
    Checkpointer,
    CheckpointError,
    CheckpointWarning,
    checkpoint_name,
    latest_valid,
    load,
    save,
)
from stoker.checkpoint._files import sha256_file


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def _pickle_file(path, marker):
    torch.save({"state": Payload(marker)}, path)  # what a malicious "checkpoint" looks like


def _reseal(ckpt, name):
    """Recompute the manifest entry of ``name``, as an attacker with write access would."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    digest, size = sha256_file(ckpt / name)
    manifest["files"][name] = {"sha256": digest, "bytes": size, "kind": "safetensors"}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def ckpt(tmp_path):
    model = torch.nn.Linear(3, 3)
    return save(tmp_path / "step-1", {"model": model, "step": 1}), model


def test_the_payload_is_live(tmp_path):
    # Control: plain unpickling really does run it, so the tests below prove something.
    marker = tmp_path / "control"
    _pickle_file(tmp_path / "evil.pt", marker)
    code = f"import torch; torch.load({str(tmp_path / 'evil.pt')!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(__file__))
    assert marker.exists()


def test_a_pickle_file_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "ran"
    _pickle_file(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError, match="never read with pickle"):
        load(tmp_path / "evil.pt", {})
    assert not marker.exists()


def test_pickle_in_place_of_weights_with_a_forged_manifest_is_refused(ckpt, tmp_path):
    path, model = ckpt
    marker = tmp_path / "ran"
    _pickle_file(path / "model.safetensors", marker)
    _reseal(path, "model.safetensors")  # checksums match: only the format check stands
    with pytest.raises(CheckpointError, match="not valid safetensors"):
        load(path, {"model": model})
    assert not marker.exists()


def test_pickle_in_place_of_state_json_is_refused(ckpt, tmp_path):
    path, model = ckpt
    marker = tmp_path / "ran"
    _pickle_file(path / "state.json", marker)
    _reseal(path, "state.json")
    with pytest.raises(CheckpointError, match=r"state\.json is not valid JSON"):
        load(path, {"model": model})
    assert not marker.exists()


def test_manifest_naming_a_pickle_file_is_refused(ckpt, tmp_path):
    path, model = ckpt
    marker = tmp_path / "ran"
    _pickle_file(path / "optimizer.pt", marker)
    manifest = json.loads((path / "manifest.json").read_text())
    digest, size = sha256_file(path / "optimizer.pt")
    manifest["files"]["optimizer.pt"] = {"sha256": digest, "bytes": size, "kind": "pickle"}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="never pickle"):
        load(path, {"model": model})
    assert not marker.exists()


def test_unlisted_planted_files_are_never_opened(ckpt, tmp_path):
    path, model = ckpt
    marker = tmp_path / "ran"
    for name in ("optimizer.pt", "state.pkl", "model.bin"):
        _pickle_file(path / name, marker)
    assert load(path, {"model": model})["step"] == 1
    assert not marker.exists()


def test_tampered_bytes_fail_the_checksum(ckpt):
    path, model = ckpt
    raw = bytearray((path / "model.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"model\.safetensors fails its SHA-256"):
        load(path, {"model": model})


def test_manifest_cannot_point_outside_the_checkpoint(ckpt):
    path, model = ckpt
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["../evil.safetensors"] = {"sha256": "0", "bytes": 1, "kind": "safetensors"}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="bad file name"):
        load(path, {"model": model})


def test_no_code_path_calls_pickle(monkeypatch, ckpt):
    # Belt and braces: loading a good checkpoint never reaches any unpickler.
    path, model = ckpt

    def boom(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    monkeypatch.setattr(torch, "load", boom)
    assert load(path, {"model": model})["step"] == 1


# ------------------------------------------------------------- planted files and directories


def _two_checkpoints(root):
    model = torch.nn.Linear(3, 3)
    for step in (1, 2):
        save(root / checkpoint_name(step), {"model": model, "step": step})
    return root / checkpoint_name(2)


def test_a_fifo_manifest_in_the_newest_checkpoint_is_skipped_not_waited_on(tmp_path, finishes):
    newest = _two_checkpoints(tmp_path)
    (newest / "manifest.json").unlink()
    os.mkfifo(newest / "manifest.json")  # nobody will ever write to it
    try:
        with pytest.warns(CheckpointWarning, match=r"step-00000002.*FIFO"):
            assert finishes(lambda: latest_valid(tmp_path)).name == checkpoint_name(1)
    finally:  # a reader stuck in open() (the code before the fix) gets EOF, so the test ends
        with contextlib.suppress(OSError):  # ENXIO: no reader waiting, nothing to unblock
            os.close(os.open(newest / "manifest.json", os.O_WRONLY | os.O_NONBLOCK))


def test_a_manifest_symlinked_to_dev_zero_is_refused_before_reading(tmp_path, finishes):
    newest = _two_checkpoints(tmp_path)
    (newest / "manifest.json").unlink()
    (newest / "manifest.json").symlink_to("/dev/zero")  # read_bytes() would never end
    with pytest.warns(CheckpointWarning, match=r"step-00000002.*symbolic link"):
        assert finishes(lambda: latest_valid(tmp_path)).name == checkpoint_name(1)


def test_a_weights_file_that_is_a_fifo_fails_verification_without_blocking(tmp_path, finishes):
    newest = _two_checkpoints(tmp_path)
    manifest = json.loads((newest / "manifest.json").read_text())
    (newest / "model.safetensors").unlink()
    os.mkfifo(newest / "model.safetensors")
    manifest["files"]["model.safetensors"]["bytes"] = 0  # its size matches: only the type differs
    (newest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(CheckpointWarning, match=r"model\.safetensors is a FIFO"):
        assert finishes(lambda: latest_valid(tmp_path)).name == checkpoint_name(1)


def test_a_step_directory_symlinked_out_of_the_run_is_not_followed(tmp_path):
    elsewhere = tmp_path / "someone-else"
    save(elsewhere / checkpoint_name(9), {"model": torch.nn.Linear(3, 3), "step": 9})
    run = tmp_path / "run"
    _two_checkpoints(run)
    (run / checkpoint_name(9)).symlink_to(elsewhere / checkpoint_name(9))
    with pytest.warns(CheckpointWarning, match=r"step-00000009.*outside"):
        assert latest_valid(run).name == checkpoint_name(2)


def test_a_planted_old_directory_is_deleted_never_promoted_and_loaded(tmp_path):
    model = torch.nn.Linear(3, 3)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, {"model": model, "step": 1})
    evil = torch.nn.Linear(3, 3)
    with torch.no_grad():
        evil.weight.fill_(666.0)
    planted = tmp_path / f".old-{checkpoint_name(500)}-1"  # a complete, verifying checkpoint
    save(planted, {"model": evil, "step": 500}, step=500)
    state = {"model": model, "step": None}
    assert Checkpointer(tmp_path).resume(state) == 1
    assert state["step"] == 1 and not model.weight.eq(666.0).any()
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint_name(1)]


def test_a_failed_replacement_puts_back_the_checkpoint_it_moved_aside(tmp_path, monkeypatch):
    # The one case an .old-* directory goes back: the save that moved it, its own rename failing.
    save(tmp_path / checkpoint_name(1), {"model": torch.nn.Linear(3, 3), "step": 1})
    real_rename = os.rename

    def rename(src, dst):
        if os.path.basename(src).startswith(".tmp-"):
            raise PermissionError(13, "Permission denied", str(dst))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(CheckpointError, match="Permission denied"):
        save(tmp_path / checkpoint_name(1), {"model": torch.nn.Linear(3, 3), "step": 2})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint_name(1)]
    assert load(tmp_path / checkpoint_name(1), {"model": torch.nn.Linear(3, 3)})["step"] == 1


# ------------------------------------------------------------- content that does not hold together


def _reseal_json(ckpt, name, doc):
    (ckpt / name).write_text(json.dumps(doc))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    digest, size = sha256_file(ckpt / name)
    manifest["files"][name] = {"sha256": digest, "bytes": size, "kind": "json"}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def test_a_state_json_whose_top_level_is_a_list_is_refused_in_one_line(ckpt):
    path, model = ckpt
    _reseal_json(path, "state.json", [{"entries": {}}])
    before = model.weight.detach().clone()
    with pytest.raises(CheckpointError) as info:
        load(path, {"model": model})
    message = str(info.value)
    assert "state.json holds a JSON array where a JSON object belongs" in message
    assert "\n" not in message
    assert torch.equal(model.weight, before)


def test_a_rank_json_of_the_wrong_type_is_refused_before_anything_is_restored(ckpt):
    path, model = ckpt
    _reseal_json(path, "rank-00000.json", {"rng": [1, 2, 3], "rank_state": None})
    with torch.no_grad():
        model.weight.zero_()
    with pytest.raises(CheckpointError, match=r"malformed state.*RNG state is a list"):
        load(path, {"model": model})
    assert model.weight.eq(0).all()  # the weights were not loaded before the refusal


def _adam(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def _wrong_moment(ckpt):
    """Give the first parameter's exp_avg a wrong shape; reseal, as a consistent manifest."""
    tensors = load_file(ckpt / "state.safetensors")
    (name,) = [k for k in tensors if k.endswith("/exp_avg") and tensors[k].shape == (8, 4)]
    tensors[name] = torch.zeros(4, 8)  # transposed: numel matches, shape does not
    save_file(tensors, ckpt / "state.safetensors")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    digest, size = sha256_file(ckpt / "state.safetensors")
    manifest["files"]["state.safetensors"].update(sha256=digest, bytes=size)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def test_a_wrong_shape_optimizer_moment_is_refused_before_loading(tmp_path):
    model, opt = _adam(0)
    path = save(tmp_path / checkpoint_name(1), {"model": model, "optimizer": opt})
    _wrong_moment(path)
    fresh, fresh_opt = _adam(1)
    before = [p.detach().clone() for p in fresh.parameters()]
    with pytest.raises(CheckpointError) as info:
        load(path, {"model": fresh, "optimizer": fresh_opt})
    message = str(info.value)
    assert "'optimizer' holds 'exp_avg' of shape (4, 8) for a parameter of shape (8, 4)" in message
    assert "\n" not in message
    assert all(torch.equal(p, b) for p, b in zip(fresh.parameters(), before, strict=True))


def test_auto_resume_falls_back_past_a_wrong_shape_moment_with_a_warning(tmp_path):
    model, opt = _adam(0)
    ckpt = Checkpointer(tmp_path, CheckpointConfig(keep_last=None))
    ckpt.save(1, {"model": model, "optimizer": opt})
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    ckpt.save(2, {"model": model, "optimizer": opt})
    _wrong_moment(tmp_path / checkpoint_name(2))
    fresh, fresh_opt = _adam(1)
    with pytest.warns(CheckpointWarning, match=r"skipping checkpoint .*step-00000002.*exp_avg"):
        assert Checkpointer(tmp_path).resume({"model": fresh, "optimizer": fresh_opt}) == 1
    fresh(torch.randn(5, 4)).sum().backward()
    fresh_opt.step()  # the loaded state is usable: the failure used to come only here


def test_a_model_of_another_shape_stops_the_resume_instead_of_falling_back(tmp_path):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(keep_last=None))
    for step in (1, 2):
        ckpt.save(step, {"model": torch.nn.Linear(3, 3)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no checkpoint is "skipped": none would fit
        with pytest.raises(CheckpointError, match=r"step-00000002.*does not fit the model"):
            Checkpointer(tmp_path).resume({"model": torch.nn.Linear(3, 4)})
