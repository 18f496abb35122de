"""A checkpoint can never execute code: planted pickle payloads are refused and never run."""

import json
import os
import pickle
import shlex
import subprocess
import sys

import pytest
import torch

from stoker.checkpoint import CheckpointError, load, save
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
    with pytest.raises(CheckpointError, match="unreadable JSON"):
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
