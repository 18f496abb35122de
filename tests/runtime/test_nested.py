"""A bf16 model's output comes back in fp32 as the same type: HF-style ModelOutput, dataclasses."""

import collections
import dataclasses
import doctest

import pytest
import torch
import torch.nn.functional as F

import stoker.runtime.nested
from stoker import Stoker


class ModelOutputLike(collections.OrderedDict):
    """What ``transformers.utils.ModelOutput`` does, in short: a dataclass whose non-None fields
    are also dict items, readable as ``out.loss``, ``out["loss"]`` and ``out[0]``."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                self[f.name] = value

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __setattr__(self, name, value):
        if name in self.keys() and value is not None:
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def __getitem__(self, key):
        return dict(self.items())[key] if isinstance(key, str) else self.to_tuple()[key]

    def to_tuple(self):
        return tuple(self[k] for k in self.keys())


@dataclasses.dataclass
class MaskedLMOutputLike(ModelOutputLike):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclasses.dataclass(frozen=True)
class PlainOutput:
    loss: torch.Tensor
    extras: dict
    step: int = 0


Pair = collections.namedtuple("Pair", "first second")


class TinyLM(torch.nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.embed = torch.nn.Embedding(50, 16)
        self.head = torch.nn.Linear(16, 50)

    def forward(self, ids, labels):
        hidden = self.embed(ids)
        logits = self.head(hidden)  # bf16 under autocast
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten()).to(logits.dtype)
        if self.kind == "model-output":
            return MaskedLMOutputLike(loss=loss, logits=logits, hidden_states=(hidden, logits))
        extras = collections.OrderedDict(logits=logits, pair=Pair(hidden, [logits, "tag"]))
        return PlainOutput(loss=loss, extras=extras, step=3)


def _bf16_forward(kind: str):
    stoker = Stoker(device="cpu", precision="bf16", record=False, doctor=False)
    model = TinyLM(kind)
    model = stoker.prepare(model)
    ids = torch.randint(0, 50, (2, 8))
    return stoker, model, model(ids, ids)


def test_an_hf_style_model_output_keeps_its_type_and_comes_back_in_fp32():
    stoker, model, out = _bf16_forward("model-output")
    assert type(out) is MaskedLMOutputLike
    assert out.loss.dtype == out.logits.dtype == torch.float32
    assert out["loss"] is out.loss and out[0] is out.loss and out[1] is out.logits
    assert list(out.keys()) == ["loss", "logits", "hidden_states"]  # attentions=None: no item
    assert [t.dtype for t in out.hidden_states] == [torch.float32, torch.float32]
    assert out.attentions is None
    stoker.backward(out.loss)  # the fp32 loss still reaches the bf16 graph
    assert stoker.unwrap(model).head.weight.grad is not None


def test_a_plain_dataclass_and_what_it_holds_keep_their_types():
    _, _, out = _bf16_forward("dataclass")
    assert type(out) is PlainOutput and out.step == 3
    assert out.loss.dtype == torch.float32
    assert type(out.extras) is collections.OrderedDict
    assert list(out.extras) == ["logits", "pair"]
    assert out.extras["logits"].dtype == torch.float32
    pair = out.extras["pair"]
    assert type(pair) is Pair and pair.first.dtype == torch.float32
    assert pair.second[0].dtype == torch.float32 and pair.second[1] == "tag"


def test_dict_subclasses_keep_their_type_and_state():
    counts = collections.defaultdict(list, a=torch.ones(1, dtype=torch.bfloat16))
    out = stoker.runtime.nested.map_tensors(torch.Tensor.float, counts)
    assert type(out) is collections.defaultdict and out.default_factory is list
    assert out["a"].dtype == torch.float32 and out["missing"] == []
    assert counts["a"].dtype == torch.bfloat16  # the input is not changed


@pytest.mark.parametrize("module", [stoker.runtime.nested])
def test_doc_examples_run(module):
    assert doctest.testmod(module, raise_on_error=False).failed == 0


class BatchEncodingLike(collections.UserDict):
    """What ``transformers.BatchEncoding`` is, in short: a ``UserDict`` (not a dict) of tensors
    with attribute access and extra state of its own."""

    def __init__(self, data=None, encodings=None):
        super().__init__(data)
        self._encodings = encodings

    def __getattr__(self, name):
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(name) from None


def test_a_userdict_batch_is_mapped_and_keeps_its_type():
    batch = BatchEncodingLike({"input_ids": torch.ones(2, 3), "n": 4}, encodings=["e"])
    out = stoker.runtime.nested.map_tensors(lambda t: t * 2, batch)
    assert type(out) is BatchEncodingLike and out._encodings == ["e"]
    assert torch.equal(out.input_ids, torch.full((2, 3), 2.0)) and out["n"] == 4
    assert torch.equal(batch["input_ids"], torch.ones(2, 3))  # the original is not changed
