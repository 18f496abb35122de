"""A word_language_model-style job for the resume tests (not a test module itself).

The shape of pytorch/examples ``word_language_model/main.py`` (embedding, a sequence-first
``nn.LSTM``, linear decoder; the data one ``[seq, batch]`` tensor sliced by hand, ``bptt``
rows at a time; the hidden state carried across batches and detached; weights updated by hand
with a learning rate divided by 4 when the validation loss does not improve), on a synthetic
corpus, ported to stoker as the README shows: the epoch, the learning rate and the best
validation loss stay module variables (``Variables``), the position in the epoch and the hidden
state are a dict; all checkpointed every ``--every`` steps.

    python tests/runtime/word_lm_job.py --epochs 3 --every 4
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from stoker import Stoker, Variables
from stoker.checkpoint import CheckpointConfig

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--every", type=int, default=4)
parser.add_argument("--bptt", type=int, default=7)
args = parser.parse_args()
torch.set_num_threads(1)


class RNNModel(nn.Module):
    def __init__(self, ntoken: int, ninp: int, nhid: int, nlayers: int, dropout: float) -> None:
        super().__init__()
        self.ntoken, self.nhid, self.nlayers = ntoken, nhid, nlayers
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)  # batch_first=False
        self.decoder = nn.Linear(nhid, ntoken)

    def forward(self, input, hidden):  # input: [seq, batch]
        emb = self.drop(self.encoder(input))  # [seq, batch, ninp]
        output, hidden = self.rnn(emb, hidden)  # [seq, batch, nhid]
        decoded = self.decoder(self.drop(output)).view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        shape = (self.nlayers, bsz, self.nhid)
        return (weight.new_zeros(shape), weight.new_zeros(shape))


def batchify(data, bsz):  # [n] -> [n // bsz, bsz]
    nbatch = data.size(0) // bsz
    return data.narrow(0, 0, nbatch * bsz).view(bsz, -1).t().contiguous().to(stoker.device)


def get_batch(source, i):
    seq_len = min(args.bptt, len(source) - 1 - i)
    return source[i : i + seq_len], source[i + 1 : i + 1 + seq_len].reshape(-1)


def repackage_hidden(h):
    return h.detach() if isinstance(h, torch.Tensor) else tuple(repackage_hidden(v) for v in h)


stoker = Stoker(
    device="cpu", precision="fp32", seed=0, checkpoint=CheckpointConfig(every_steps=args.every)
)
g = torch.Generator().manual_seed(0)
corpus = torch.randint(0, 30, (700,), generator=g)
train_data, val_data = batchify(corpus[:560], 4), batchify(corpus[560:], 4)
model = RNNModel(30, 16, 24, 2, dropout=0.3)
criterion = nn.NLLLoss()
# The README's port: the script's own variables checkpointed by name, the position in the
# epoch and the carried hidden state in a dict.
lr, best_val_loss, epoch, progress = 5.0, None, 1, {"i": 0, "hidden": None}
loop = Variables(globals(), "lr", "best_val_loss", "epoch", "progress")
model = stoker.prepare(model, state={"loop": loop})


def evaluate(source):
    model.eval()
    total, hidden = 0.0, model.init_hidden(4)
    with torch.no_grad():
        for i in range(0, source.size(0) - 1, args.bptt):
            data, targets = get_batch(source, i)
            output, hidden = model(data, hidden)
            total += len(data) * criterion(output, targets).item()
    return total / (len(source) - 1)


def train():
    model.train()
    hidden = progress["hidden"] if progress["i"] else model.init_hidden(4)
    for i in range(progress["i"], train_data.size(0) - 1, args.bptt):
        data, targets = get_batch(train_data, i)
        model.zero_grad()
        hidden = repackage_hidden(hidden)
        output, hidden = model(data, hidden)
        loss = criterion(output, targets)
        stoker.backward(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        progress.update(i=i + args.bptt, hidden=hidden)  # as of this step
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)
        stoker.step_done()
        stoker.log({"loss": loss})
    progress["i"] = 0


# `epoch` is the tracked module variable: resume restores the epoch in progress
for epoch in range(epoch, args.epochs + 1):  # noqa: B007, B020
    train()
    val_loss = evaluate(val_data)
    if not best_val_loss or val_loss < best_val_loss:
        best_val_loss = val_loss
    else:
        lr /= 4.0
stoker.print(f"lr {lr} best {best_val_loss:.4f} steps {stoker.step}")
