"""Small encoders and synthetic documents: the compression tests need shapes, not a corpus."""

import random

import torch

from stoker.models import Encoder, EncoderConfig

VOCAB = 96


def small_encoder(seed: int = 0, **overrides) -> Encoder:
    torch.manual_seed(seed)
    fields = {"dim": 32, "layers": 2, "heads": 4, "ffn_dim": 64, **overrides}
    return Encoder(EncoderConfig(vocab_size=VOCAB, max_len=32, **fields)).eval()


def synthetic_docs(n: int = 64, seed: int = 0) -> list[list[int]]:
    """Documents with structure a model can learn: runs of consecutive ids."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        start, length = rng.randrange(8, VOCAB - 40), rng.randrange(8, 30)
        docs.append([start + i for i in range(length)])
    return docs
