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
