"""A real Hugging Face ``BertForMaskedLM`` (built from its config: nothing is downloaded) in a
stoker loop: bf16 outputs keep their ``MaskedLMOutput`` type, ``BatchEncoding`` batches reach
the device, and a checkpoint of the tied-embedding model resumes bitwise.

Needs the ``compat`` extra: ``python -m pip install -e ".[test,compat]" && python -m pytest -m
compat``. Without transformers these tests fail (they are not in the default suite).
"""

import pytest
import torch

from stoker import Stoker
from stoker.checkpoint import CheckpointConfig
from stoker.records import RecordConfig

try:
    import transformers
except ImportError:  # collected (then deselected) by the default suite, which lacks the extra
    transformers = None

pytestmark = pytest.mark.compat


@pytest.fixture(autouse=True)
def _needs_transformers():
    if transformers is None:
        pytest.fail("transformers is not installed: pip install -e '.[test,compat]'")


VOCAB, SEQ, BATCH = 64, 16, 8


def bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=SEQ,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    return transformers.BertForMaskedLM(config)


def batches(n: int) -> list:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(5, VOCAB, (BATCH, SEQ), generator=g)
        labels = torch.full_like(ids, -100)
        masked = torch.rand(ids.shape, generator=g) < 0.15
        labels[masked] = ids[masked]
        ids = ids.masked_fill(masked, 4)
        out.append(transformers.BatchEncoding({"input_ids": ids, "labels": labels}))
    return out


class Encodings(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.items = batches(n)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def loader(n: int) -> torch.utils.data.DataLoader:
    # batch_size=None: each item already is a batch, a BatchEncoding kept as one
    return torch.utils.data.DataLoader(Encodings(n), batch_size=None)


def test_bf16_outputs_keep_their_type_and_batch_encodings_reach_the_model(tmp_path):
    stoker = Stoker(precision="bf16", record=RecordConfig(directory=tmp_path), doctor=False)
    model = bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer, data = stoker.prepare(model, optimizer, loader(6))
    losses = []
    for batch in data:
        assert isinstance(batch, transformers.BatchEncoding)
        outputs = model(**batch)
        assert isinstance(outputs, transformers.modeling_outputs.MaskedLMOutput)
        assert outputs.logits.dtype == torch.float32 and outputs.loss.dtype == torch.float32
        stoker.backward(outputs.loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(outputs.loss.item())
    stoker.close()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses


def train(run_dir, steps: int, resume: str = "never") -> tuple[dict, int | None]:
    stoker = Stoker(
        precision="fp32",
        record=RecordConfig(directory=run_dir),
        doctor=False,
        checkpoint=CheckpointConfig(every_steps=2),
        resume=resume,
    )
    torch.manual_seed(0)
    model = bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer, data = stoker.prepare(model, optimizer, loader(8))
    for batch in data:
        if stoker.step >= steps:
            break
        loss = model(**batch).loss
        stoker.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    stoker.close()
    weights = {k: v.clone() for k, v in Stoker.unwrap(model).state_dict().items()}
    return weights, stoker.resumed_from


def test_tied_embeddings_resume_bitwise(tmp_path):
    whole, _ = train(tmp_path / "whole", steps=8)
    train(tmp_path / "parts", steps=4)
    resumed, resumed_from = train(tmp_path / "parts", steps=8, resume="auto")
    assert resumed_from == 4
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    model = bert()
    model.load_state_dict(resumed)
    decoder = model.cls.predictions.decoder.weight
    assert decoder.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
