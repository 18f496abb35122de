"""The shape of nanoGPT's train.py: a small GPT, 40 micro-batches of gradient accumulation per
optimizer step, AdamW (fused), and a tiny micro-batch."""

import torch
import torch.nn.functional as F
from torch import nn

torch.manual_seed(0)
VOCAB, DIM, LAYERS, SEQ, MICRO, ACCUMULATION = 128, 64, 2, 32, 2, 40


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x):
        q, k, v = self.attn(F.layer_norm(x, (DIM,), self.ln1.weight, self.ln1.bias)).split(DIM, 2)
        b, t, _ = q.shape
        q, k, v = (z.view(b, t, 4, DIM // 4).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, DIM))
        return x + self.mlp(F.layer_norm(x, (DIM,), self.ln2.weight, self.ln2.bias))


class GPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, DIM), nn.Embedding(SEQ, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(DIM)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return logits, F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))


data = torch.randint(0, VOCAB, (20_000,))


def get_batch():
    ix = torch.randint(len(data) - SEQ - 1, (MICRO,))
    x = torch.stack([data[i : i + SEQ] for i in ix])
    y = torch.stack([data[i + 1 : i + 1 + SEQ] for i in ix])
    return x, y


model = GPT()
optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, fused=True)
for _it in range(1000):
    for _micro in range(ACCUMULATION):
        x, y = get_batch()
        _, loss = model(x, y)
        (loss / ACCUMULATION).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
