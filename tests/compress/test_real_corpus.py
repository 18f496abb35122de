"""Quantized logits against fp32 on the real corpus's validation batches (slow: trains first)."""

import pytest
import torch
import torch.nn.functional as F

from stoker.compress import QuantConfig, compress, load_compressed
from stoker.data import load_token_documents, load_tokenizer, mlm_loader, model_inputs
from stoker.data.mlm import mlm_loss
from stoker.models import Encoder, EncoderConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus():
    tokenizer = load_tokenizer(progress=False)
    vocab = tokenizer.get_vocab_size()
    train = mlm_loader(
        load_token_documents("train", tokenizer=tokenizer, progress=False),
        vocab_size=vocab,
        max_len=128,
        batch_size=16,
        seed=0,
    )
    val = mlm_loader(
        load_token_documents("validation", tokenizer=tokenizer, progress=False),
        vocab_size=vocab,
        max_len=128,
        batch_size=16,
        shuffle=False,
        seed=1234,
    )
    torch.manual_seed(0)
    model = Encoder(EncoderConfig.preset("tiny", vocab_size=vocab, max_len=128))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _, batch in zip(range(80), train, strict=False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = mlm_loss(model(**model_inputs(batch)), batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), train, [b for _, b in zip(range(4), val, strict=False)]


@pytest.mark.parametrize("method", ["int8-static", "int8-dynamic", "int8-weight", "bf16"])
def test_quantized_logits_on_validation_batches(method, corpus, tmp_path):
    model, train, val = corpus
    made = compress(model, quant=QuantConfig(method=method), train_loader=train)
    served = load_compressed(made.save(tmp_path / "m.safetensors"), compile=False)
    with torch.no_grad():
        for batch in val:
            inputs = model_inputs(batch)
            ref, out = model(**inputs).double().flatten(), served(**inputs).double().flatten()
            assert F.cosine_similarity(out, ref, dim=0) >= 0.99
