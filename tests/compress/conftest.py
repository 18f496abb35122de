"""Fixtures: synthetic MLM batches and a briefly trained small encoder."""

import pytest
import torch
from compress_helpers import VOCAB, small_encoder, synthetic_docs

from stoker.data import mlm_loader, model_inputs
from stoker.data.mlm import mlm_loss


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
