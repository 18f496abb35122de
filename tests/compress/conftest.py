"""Fixtures: synthetic MLM batches, a briefly trained small encoder, a run directory."""

import json

import pytest
import torch
from compress_helpers import VOCAB, small_encoder, synthetic_docs

from stoker.checkpoint import save
from stoker.data import load_tokenizer, mlm_loader, model_inputs
from stoker.data.mlm import mlm_loss
from stoker.models import Encoder, EncoderConfig


@pytest.fixture
def loader():
    return mlm_loader(synthetic_docs(), vocab_size=VOCAB, max_len=32, batch_size=8, seed=0)


@pytest.fixture
def val_batches():
    val = mlm_loader(
        synthetic_docs(24, seed=1), vocab_size=VOCAB, max_len=32, batch_size=8, shuffle=False
    )
    return list(val)


@pytest.fixture
def trained(loader):
    """An encoder after a few dozen steps: logits with structure, not initialisation noise."""
    model = small_encoder().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(3):
        for batch in loader:
            loss, _ = mlm_loss(model(**model_inputs(batch)), batch["labels"])
            loss.backward()
            opt.step()
            opt.zero_grad()
    return model.eval()


@pytest.fixture
def run_dir(tmp_path):
    """A run directory as the MLM job leaves it: record.json and a final checkpoint."""
    torch.manual_seed(0)
    vocab = load_tokenizer(progress=False).get_vocab_size()
    cfg = EncoderConfig(vocab_size=vocab, max_len=128, dim=32, layers=1, heads=4, ffn_dim=64)
    run = tmp_path / "20260101-000000-train_mlm"
    run.mkdir()
    (run / "record.json").write_text(json.dumps({"config": {"preset": "tiny"}}))
    save(run / "checkpoints" / "step-00000010", {"model": Encoder(cfg)})
    return run
