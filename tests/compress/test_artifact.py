"""The compressed-model file: exact round trips, and loading that never executes code."""

import copy
import json
import pickle

import pytest
import torch
from compress_helpers import small_encoder
from safetensors.torch import save_file

from stoker.compress import PruneConfig, QuantConfig, compress, load_compressed
from stoker.compress.quantize import build_runnable, serving_inputs
from stoker.data import model_inputs
from stoker.errors import StokerError

PRUNE = [
    PruneConfig(),
    PruneConfig(method="magnitude", sparsity=0.5),
    PruneConfig(method="2:4"),
    PruneConfig(method="structured", sparsity=0.5, head_sparsity=0.5),
]
QUANT = ["none", "bf16", "int8-dynamic", "int8-static", "int8-weight"]


@pytest.mark.parametrize("quant", QUANT)
@pytest.mark.parametrize("prune", PRUNE, ids=lambda p: p.label)
def test_every_form_round_trips_exactly(prune, quant, trained, loader, val_batches, tmp_path):
    made = compress(trained, prune, QuantConfig(method=quant), train_loader=loader)
    in_memory, _ = build_runnable(
        copy.deepcopy(made.model), made.quant, observers=made.observers or None
    )
    loaded = load_compressed(made.save(tmp_path / "m.safetensors"), compile=False)
    assert loaded.config == made.model.config
    assert (loaded.prune, loaded.quant) == (prune, made.quant)
    for batch in val_batches[:2]:
        inputs = model_inputs(batch)
        assert torch.equal(loaded(**inputs), in_memory(**serving_inputs(**inputs)))


def test_loading_never_unpickles(trained, loader, tmp_path, monkeypatch):
    made = compress(trained, quant=QuantConfig(method="int8-static"), train_loader=loader)
    path = made.save(tmp_path / "m.safetensors")

    def refuse(*args, **kwargs):
        raise AssertionError("loading a compressed model unpickled something")

    for target, name in [(pickle, "load"), (pickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(target, name, refuse)
    assert load_compressed(path, compile=False).predict(torch.tensor([[5, 6, 7, 8]])).shape == (
        1,
        4,
    )


def test_a_pickle_is_refused_in_one_line(tmp_path):
    class Boom:
        def __reduce__(self):
            return (print, ("code ran",))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(StokerError, match="not a readable safetensors file") as err:
        load_compressed(path, compile=False)
    assert "\n" not in str(err.value)


def test_header_is_data_not_code(tmp_path):
    path = tmp_path / "odd.safetensors"
    header = {"format": 1, "encoder": {"vocab_size": "__import__('os')"}, "prune": {}, "quant": {}}
    save_file({"x": torch.zeros(1)}, path, metadata={"stoker.compressed": json.dumps(header)})
    with pytest.raises(StokerError):
        load_compressed(path, compile=False)


def test_foreign_or_missing_files_are_one_clear_error(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file(small_encoder().state_dict(), plain)
    with pytest.raises(StokerError, match=r"without a stoker\.compressed header"):
        load_compressed(plain)
    with pytest.raises(StokerError, match="no such compressed-model file"):
        load_compressed(tmp_path / "missing.safetensors")


def test_serving_accepts_a_padding_mask_and_predicts(trained, tmp_path):
    model = load_compressed(compress(trained).save(tmp_path / "m.safetensors"), compile=False)
    ids = torch.tensor([[10, 11, 12, 0], [20, 21, 22, 23]])
    mask = torch.tensor([[True, True, True, False], [True] * 4])
    logits = model(ids, attention_mask=mask)
    assert logits.shape == (2, 4, trained.config.vocab_size) and logits.dtype == torch.float32
    with torch.no_grad():
        expected = trained(ids[:1, :3])
    torch.testing.assert_close(logits[:1, :3], expected)
    assert model.predict(ids, predict_positions=torch.tensor([[1], [2]])).shape == (2, 1)


def _rewrite(path, *, header=None, tensors=None):
    """Write ``path`` again with a changed header dict and/or tensors (the digest is recomputed
    only when ``tensors`` is given, to get past it to the later checks)."""
    from safetensors import safe_open

    from stoker.compress import artifact

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["stoker.compressed"])
        current = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter
    if tensors is not None:
        current.update(tensors)
        meta["sha256"] = artifact._digest(current)
    if header is not None:
        meta = header(meta)
    save_file(current, path, metadata={"stoker.compressed": json.dumps(meta)})


@pytest.fixture
def int8_file(trained, tmp_path):
    made = compress(trained, quant=QuantConfig(method="int8-dynamic"))
    return made.save(tmp_path / "m.safetensors")


def test_flipped_data_bytes_are_caught(int8_file):
    data = bytearray(int8_file.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's bytes: the layout stays valid
    int8_file.write_bytes(bytes(data))
    with pytest.raises(StokerError, match="SHA-256 digest"):
        load_compressed(int8_file, compile=False)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda h: [h], "JSON list, not an object"),
        (lambda h: {**h, "encoder": {**h["encoder"], "vocab_size": 10**12}}, "implies"),
        (lambda h: {**h, "encoder": {**h["encoder"], "dim": -4}}, "dim=-4"),
        (lambda h: {**h, "info": "x"}, "info is not an object"),
    ],
)
def test_a_crafted_header_is_one_clear_error(int8_file, change, message):
    _rewrite(int8_file, header=change)
    with pytest.raises(StokerError, match=message) as err:
        load_compressed(int8_file, compile=False)
    assert "\n" not in str(err.value)


def test_a_scale_of_the_wrong_shape_is_refused(int8_file):
    from safetensors import safe_open

    with safe_open(str(int8_file), framework="pt") as f:
        name = next(k for k in f.keys() if k.endswith(":scale"))  # noqa: SIM118
    _rewrite(int8_file, tensors={name: torch.ones(3)})
    with pytest.raises(StokerError, match="not one fp32 scale per row"):
        load_compressed(int8_file, compile=False)


def test_saving_onto_a_directory_or_an_unwritable_path_is_one_line(trained, tmp_path):
    made = compress(trained)
    with pytest.raises(StokerError, match="is a directory"):
        made.save(tmp_path)
    assert not list(tmp_path.parent.glob(".tmp-*"))
    with pytest.raises(StokerError, match=r"cannot write /proc/x/y\.safetensors"):
        made.save("/proc/x/y.safetensors")
