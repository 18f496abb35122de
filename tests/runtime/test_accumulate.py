"""Gradient accumulation must equal one big batch, for mean losses and token-level losses."""

import copy

import pytest
import torch
import torch.nn.functional as F

from stoker import Stoker, StokerError

K, B, T, V = 4, 3, 5, 11  # micro-batches, rows per micro-batch, tokens per row, vocab


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(V, 16), torch.nn.Linear(16, V))


def _batches():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (K * B, T), generator=g)
    targets = torch.randint(0, V, (K * B, T), generator=g)
    # Token-level losses with a different number of real tokens per micro-batch.
    keep = torch.linspace(0.2, 0.95, K).repeat_interleave(B)[:, None]  # [K*B, 1]
    valid = torch.rand(K * B, T, generator=g) < keep
    valid[:, 0] = True
    return ids, targets, valid


def _token_loss(logits, targets, valid):
    per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    n = valid.sum()
    return (per_token * valid.flatten()).sum() / n, n


def _run(accumulate: bool, token_weighted: bool):
    stoker = Stoker(device="cpu", precision="fp32", accumulation_steps=K if accumulate else 1)
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer = stoker.prepare(model, optimizer)
    ids, targets, valid = _batches()
    chunks = range(K) if accumulate else [None]
    for i in chunks:
        rows = slice(i * B, (i + 1) * B) if i is not None else slice(None)
        with stoker.accumulate(model):
            logits = model(ids[rows])
            if token_weighted:
                loss, n = _token_loss(logits, targets[rows], valid[rows])
                stoker.backward(loss, tokens=n)
            else:
                loss = F.cross_entropy(logits.flatten(0, 1), targets[rows].flatten())
                stoker.backward(loss)
            stoker.clip_grad_norm_(1e9)
            optimizer.step()
            optimizer.zero_grad()
    return stoker, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("token_weighted", [False, True], ids=["mean-loss", "token-loss"])
def test_k_micro_batches_equal_one_batch(token_weighted):
    stoker, accumulated = _run(accumulate=True, token_weighted=token_weighted)
    _, single = _run(accumulate=False, token_weighted=token_weighted)
    assert stoker.step == 1
    for a, b in zip(accumulated, single, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_naive_averaging_would_differ():
    # Guard that the token-level case really exercises unequal token counts: averaging the
    # per-micro-batch means (what a plain loss / K does) must NOT match the big batch.
    stoker = Stoker(device="cpu", precision="fp32", accumulation_steps=K)
    model = stoker.prepare(_model())
    ids, targets, valid = _batches()
    rows = [slice(i * B, (i + 1) * B) for i in range(K)]
    naive = sum(_token_loss(model(ids[r]), targets[r], valid[r])[0] for r in rows) / K
    exact = _token_loss(model(ids), targets, valid)[0]
    assert abs(naive.item() - exact.item()) > 1e-3


def test_steps_only_at_window_end():
    stoker = Stoker(device="cpu", precision="fp32", accumulation_steps=3)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = stoker.prepare(model, optimizer)
    before = copy.deepcopy(model.state_dict())
    syncs = []
    for _ in range(2):
        with stoker.accumulate(model):
            stoker.backward(model(torch.ones(1, 2)).sum())
            optimizer.step()
            optimizer.zero_grad()
            syncs.append(stoker.sync_gradients)
    assert stoker.step == 0
    assert torch.equal(model.weight, before["weight"])
    assert model.weight.grad is not None  # accumulated, not zeroed
    with stoker.accumulate(model):
        stoker.backward(model(torch.ones(1, 2)).sum())
        optimizer.step()
        optimizer.zero_grad()
        syncs.append(stoker.sync_gradients)
    assert syncs == [False, False, True]
    assert stoker.step == 1
    assert not torch.equal(model.weight, before["weight"])


def test_mixing_token_and_plain_backward_is_refused():
    stoker = Stoker(device="cpu", precision="fp32", accumulation_steps=2)
    model = stoker.prepare(torch.nn.Linear(2, 1))
    with stoker.accumulate(model):
        stoker.backward(model(torch.ones(1, 2)).sum())
    with pytest.raises(StokerError, match="tokens="), stoker.accumulate(model):
        stoker.backward(model(torch.ones(1, 2)).sum(), tokens=torch.tensor(3))


def test_scheduler_steps_once_per_window():
    stoker = Stoker(device="cpu", precision="fp32", accumulation_steps=2)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model, optimizer, scheduler = stoker.prepare(model, optimizer, scheduler=scheduler)
    for _ in range(4):
        with stoker.accumulate(model):
            stoker.backward(model(torch.ones(1, 2)).sum())
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    assert stoker.step == 2
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.25)


@pytest.mark.parametrize("first_with_tokens", [False, True], ids=["plain-first", "tokens-first"])
def test_mixing_tokens_and_plain_backward_in_one_window_is_refused(first_with_tokens):
    stoker = Stoker(device="cpu", precision="fp32", accumulation_steps=2, record=False)
    model = _model()
    model, _ = stoker.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    ids, targets, valid = _batches()
    for i, with_tokens in enumerate([first_with_tokens, not first_with_tokens]):
        with stoker.accumulate(model):
            loss, n = _token_loss(model(ids[i : i + 1]), targets[i : i + 1], valid[i : i + 1])
            if i == 0:
                stoker.backward(loss, tokens=n if with_tokens else None)
                continue
            grads = [p.grad.clone() for p in model.parameters()]
            with pytest.raises(StokerError, match="both with and without tokens="):
                stoker.backward(loss, tokens=n if with_tokens else None)
            # Refused before anything moved: no gradient was added, and the window goes on in
            # the mode it started in.
            after = [p.grad for p in model.parameters()]
            assert all(torch.equal(g, a) for g, a in zip(grads, after, strict=True))
            stoker.backward(loss, tokens=n if first_with_tokens else None)
    stoker.close()
