"""The shape of pytorch/examples word_language_model: a sequence-first LSTM language model, the
hidden state carried across batches, and weights updated by hand (no torch.optim)."""

import os

import torch
import torch.nn.functional as F
from torch import nn

torch.manual_seed(0)
NTOKEN, EMSIZE, NHID, NLAYERS, BPTT, BATCH, LR = 200, 64, 64, 2, 35, 8, 20.0
COUNT = os.environ.get("LOOP_COUNT_FILE")


class RNNModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Embedding(NTOKEN, EMSIZE)
        self.rnn = nn.LSTM(EMSIZE, NHID, NLAYERS)  # batch_first=False: [seq, batch, ...]
        self.decoder = nn.Linear(NHID, NTOKEN)

    def forward(self, x, hidden):
        out, hidden = self.rnn(self.encoder(x), hidden)
        return F.log_softmax(self.decoder(out), dim=-1).view(-1, NTOKEN), hidden

    def init_hidden(self, batch):
        w = next(self.parameters())
        return (w.new_zeros(NLAYERS, batch, NHID), w.new_zeros(NLAYERS, batch, NHID))


data = torch.randint(0, NTOKEN, (BPTT * 400, BATCH))  # [seq, batch]
model = RNNModel()
for _epoch in range(100):
    hidden = model.init_hidden(BATCH)
    for i in range(0, data.size(0) - 1 - BPTT, BPTT):
        x, y = data[i : i + BPTT], data[i + 1 : i + 1 + BPTT].reshape(-1)
        hidden = tuple(h.detach() for h in hidden)
        model.zero_grad()
        output, hidden = model(x, hidden)
        loss = F.nll_loss(output, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-LR)
        if COUNT:
            with open(COUNT, "a") as f:
                f.write("x")
