"""Ragged batches on the built-in corpus: padding, effective tokens/s and rank balance.

Four ways to batch the train split of the built-in corpus (stdlib source, one document per
top-level definition, default BPE), every document truncated to ``--max-len`` tokens:

- ``random``: shuffled batches of ``--batch-size`` documents padded to the longest (the
  baseline; ``DataLoader(shuffle=True)`` + ``pad_batch``);
- ``hf-grouped``: group-by-length as the HF Trainer's ``LengthGroupedSampler`` does it,
  reimplemented here: mega-batches of 50 x batch size sorted longest first, the overall longest
  document moved to the very first batch; in data-parallel, consecutive batches dealt to the
  ranks in turn (what Accelerate's batch-sampler sharding does);
- ``stoker-bucket``: :class:`~stoker.data.LengthGroupedBatchSampler` (mega-batch factor 50);
- ``stoker-packed``: :class:`~stoker.data.PackedBatchSampler` + ``PackingCollator``, rows of
  ``--max-len`` with ``rows = batch size x mean document length / max-len`` so that a step
  carries about as many real tokens as a padded step.

Three tables:

1. padding fraction per strategy over the whole train split at max lengths 128 / 256 / 512
   (no model, exact counts from the plans);
2. 2-rank imbalance (max/min real tokens per step, ranks simulated from the plans) for
   ``random``, ``hf-grouped`` and stoker's balanced modes (bucket, token budget, packed);
3. effective (non-padding) tokens/s of forward + backward of the ``tiny`` encoder under bf16
   autocast (the default job's model, MLM masking and loss), one sample = one pass over the
   same ``--docs`` random documents, candidates interleaved; ratios to ``random``.
   Plus, with ``--flex``, packed attention alone: dense block-diagonal mask through SDPA
   against compiled FlexAttention (forward only: torch 2.13 has no FlexAttention backward on
   CPU).

Why ``--max-len 512`` by default: on this corpus random batches of 32 waste about 27% / 43% /
60% of their tokens at 128 / 256 / 512 (table 1), so even perfect packing can gain at most
~1.37x / ~1.76x / ~2.49x tokens/s there; the 1.8x target is only reachable from 512.

What to expect on a CPU: packing removes the padding, but a packed row attends densely over
all ``--max-len`` positions (the block-diagonal mask hides, it does not skip), while a bucketed
batch of short documents is also short, so its attention (quadratic in the row length) is
cheaper. With the tiny encoder at 512, where attention is a large share of the step, packing and
bucketing end up close; kernels that skip masked blocks (FlexAttention or varlen flash
attention on a GPU) are where packing pulls ahead.

Targets (issue 5): packed padding <= 1%, packed effective tokens/s >= 1.8x ``random``, balanced
2-rank imbalance <= 1.05.

    python benchmarks/ragged.py                # ~3 min on 2 idle cores (--flex: +1 min)
    python benchmarks/ragged.py --quick        # smoke test, ~30 s
    python benchmarks/ragged.py --max-len 256 --docs 1024 --flex
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from stoker.bench import Bench, Candidate, bench_parser
from stoker.data.accounting import RaggedSummary, summarize_plan
from stoker.data.mlm import MLMCollator, mlm_loss, pad_batch
from stoker.data.packing import (
    PackedBatchSampler,
    PackingCollator,
    PackingConfig,
    packed_attention,
)
from stoker.data.samplers import LengthGroupedBatchSampler, TokenBudgetBatchSampler
from stoker.data.tokenizer import DEFAULT_VOCAB_SIZE, load_token_documents
from stoker.models import Encoder, EncoderConfig

Plan = list[list[list[int]]]  # plan[step][rank] -> document indices
TARGET_PADDING = 0.01
TARGET_SPEEDUP = 1.8
TARGET_IMBALANCE = 1.05


# ----------------------------------------------------------------------- baseline samplers


def random_plan(n: int, batch_size: int, ranks: int, seed: int) -> Plan:
    """Shuffled batches; rank r takes every ranks-th index (DistributedSampler-style)."""
    perm = np.random.default_rng(seed).permutation(n).tolist()
    per_rank = [perm[r::ranks] for r in range(ranks)]
    steps = min(len(p) for p in per_rank) // batch_size + (ranks == 1 and n % batch_size > 0)
    return [[p[s * batch_size : (s + 1) * batch_size] for p in per_rank] for s in range(steps)]


def hf_grouped_plan(lengths: np.ndarray, batch_size: int, ranks: int, seed: int) -> Plan:
    """Group-by-length as the HF Trainer does it (clean-room reimplementation).

    Random permutation; mega-batches of 50 x batch_size, each sorted longest first; the
    mega-batch holding the longest document swaps its head with the first one's, so the
    longest batch comes first (out-of-memory shows at step 0). Batches of batch_size are cut
    from the concatenation and dealt to the ranks in turn.
    """
    perm = np.random.default_rng(seed).permutation(len(lengths))
    size = 50 * batch_size
    megas = [
        sorted(perm[i : i + size].tolist(), key=lambda j: -lengths[j])
        for i in range(0, len(perm), size)
    ]
    top = int(np.argmax([lengths[m[0]] for m in megas]))
    megas[0][0], megas[top][0] = megas[top][0], megas[0][0]
    order = [i for m in megas for i in m]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    steps = len(batches) // ranks if ranks > 1 else len(batches)
    return [batches[s * ranks : (s + 1) * ranks] for s in range(steps)]


# ------------------------------------------------------------------------------ plans


def packing_config(lengths: np.ndarray, max_len: int, batch_size: int) -> PackingConfig:
    """Rows per packed batch: as many real tokens per step as a padded batch of batch_size."""
    mean = float(np.minimum(lengths, max_len).mean())
    rows = max(1, round(batch_size * mean / max_len))
    return PackingConfig(max_len=max_len, rows=rows, long_documents="truncate")


def plans(
    lengths: np.ndarray, max_len: int, batch_size: int, ranks: int, seed: int
) -> dict[str, tuple[Plan, RaggedSummary]]:
    """Every strategy's plan over ``lengths`` and its predicted padding / balance."""
    clipped = np.minimum(lengths, max_len)
    pack = packing_config(lengths, max_len, batch_size)
    out: dict[str, Plan] = {
        "random": random_plan(len(lengths), batch_size, ranks, seed),
        "hf-grouped": hf_grouped_plan(clipped, batch_size, ranks, seed),
        "stoker-bucket": LengthGroupedBatchSampler(
            clipped, batch_size, seed=seed, num_replicas=ranks, rank=0
        ).plan(),
        # Same padded tokens per step as a full batch of the longest documents.
        "stoker-budget": TokenBudgetBatchSampler(
            clipped, batch_size * max_len // 2, seed=seed, num_replicas=ranks, rank=0
        ).plan(),
        "stoker-packed": PackedBatchSampler(
            lengths, pack, seed=seed, num_replicas=ranks, rank=0
        ).plan(),
    }
    return {
        name: (
            plan,
            summarize_plan(plan, lengths, packing=pack)
            if name == "stoker-packed"
            else summarize_plan(plan, lengths, max_len=max_len),
        )
        for name, plan in out.items()
    }


# ----------------------------------------------------------------------------- timing


def training_pass(
    model: Encoder, batches: Sequence[dict[str, torch.Tensor]]
) -> Callable[[], torch.Tensor]:
    """One call = forward + MLM loss + backward over every batch; returns the real tokens."""
    keys = ("input_ids", "attention_mask", "document_ids", "position_ids", "predict_positions")
    real = torch.stack([b["valid"].sum() for b in batches]).sum()

    def run() -> torch.Tensor:
        for batch in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(**{k: batch[k] for k in keys if k in batch})
            loss, _ = mlm_loss(logits, batch["labels"])
            loss.backward()
            model.zero_grad(set_to_none=True)
        return real

    return run


def collate_all(
    docs: Sequence[np.ndarray], plan: Plan, layout: Callable[[list[np.ndarray]], dict]
) -> list[dict[str, torch.Tensor]]:
    collate = MLMCollator(layout, vocab_size=DEFAULT_VOCAB_SIZE, seed=0)
    return [collate([docs[i] for i in step[0]]) for step in plan]


def main() -> None:
    parser = bench_parser(__doc__.split("\n")[0], warmup=1, repeats=5)
    parser.add_argument("--max-len", type=int, default=512, help="tokens per row (%(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="documents per padded batch")
    parser.add_argument("--docs", type=int, default=512, help="documents per timed pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flex", action="store_true", help="also time FlexAttention (compiles)")
    args = parser.parse_args()
    if args.quick:
        args.docs = min(args.docs, 64)

    docs = load_token_documents("train", progress=True)
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    console = Console(width=160)
    meta: dict = {
        "max_len": args.max_len,
        "batch_size": args.batch_size,
        "docs_timed": args.docs,
        "corpus_documents": len(docs),
        "corpus_tokens": int(lengths.sum()),
        "median_document_tokens": float(np.median(lengths)),
    }
    bench = Bench.from_args("ragged", args, meta=meta)

    # 1. Padding over the whole train split, several max lengths.
    table = Table(
        title=f"padding fraction, whole train split ({len(docs)} documents, "
        f"batch {args.batch_size}, documents truncated to the max length)"
    )
    table.add_column("strategy")
    lens = sorted({128, 256, 512, args.max_len})
    for t in lens:
        table.add_column(f"max {t}", justify="right")
    padding: dict[str, dict[int, float]] = {}
    for t in lens:
        for name, (_, summary) in plans(lengths, t, args.batch_size, 1, args.seed).items():
            padding.setdefault(name, {})[t] = summary.padding_fraction
    for name, row in padding.items():
        table.add_row(name, *(f"{row[t]:.1%}" for t in lens))
    gains = "  ".join(f"{t}: {1 / (1 - padding['random'][t]):.2f}x" for t in lens)
    table.caption = f"most packing can gain over random (1 / (1 - random padding)): {gains}"
    console.print(table)
    meta["padding"] = {k: {str(t): v for t, v in row.items()} for k, row in padding.items()}

    # 2. Two simulated ranks.
    table = Table(title=f"2 ranks, max {args.max_len}: real tokens per step across ranks")
    for col in (
        "strategy",
        "steps",
        "imbalance (mean max/min)",
        "worst step",
        "wait fraction",
        "padding",
    ):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    meta["two_ranks"] = {}
    for name, (_, s) in plans(lengths, args.max_len, args.batch_size, 2, args.seed).items():
        table.add_row(
            name,
            str(s.steps),
            f"{s.imbalance:.3f}",
            f"{s.imbalance_worst:.2f}",
            f"{s.wait_fraction:.1%}",
            f"{s.padding_fraction:.1%}",
        )
        meta["two_ranks"][name] = s.as_dict()
    console.print(table)

    # 3. Effective tokens/s on a random subset, every strategy over the same documents.
    pick = np.random.default_rng(args.seed).permutation(len(docs))[: args.docs]
    sub = [docs[i] for i in pick]
    sub_lengths = lengths[pick]
    sub_plans = plans(sub_lengths, args.max_len, args.batch_size, 1, args.seed)
    pad_layout = functools.partial(pad_batch, max_len=args.max_len)
    pack = packing_config(sub_lengths, args.max_len, args.batch_size)
    torch.manual_seed(args.seed)
    model = Encoder(
        EncoderConfig.preset("tiny", vocab_size=DEFAULT_VOCAB_SIZE, max_len=args.max_len)
    )
    candidates = []
    for name in ("random", "hf-grouped", "stoker-bucket", "stoker-packed"):
        layout = PackingCollator(pack) if name == "stoker-packed" else pad_layout
        batches = collate_all(sub, sub_plans[name][0], layout)
        candidates.append(Candidate(name, training_pass(model, batches), returns_work=True))
    meta["packed_rows"] = pack.rows
    result = bench.compare(
        f"fwd+bwd tiny encoder, bf16 autocast, max {args.max_len}, {args.docs} documents/pass",
        candidates,
        baseline="random",
        unit="real tokens",
    )
    speedup = result["stoker-packed"].speedup

    if args.flex:
        flex_comparison(bench, sub, pack)

    # Acceptance, from this run's numbers.
    full = plans(lengths, args.max_len, args.batch_size, 2, args.seed)
    packed_pad = padding["stoker-packed"][args.max_len]
    balanced = max(
        full[k][1].imbalance for k in ("stoker-bucket", "stoker-budget", "stoker-packed")
    )
    checks = [
        (f"packed padding {packed_pad:.2%} <= {TARGET_PADDING:.0%}", packed_pad <= TARGET_PADDING),
        (
            f"packed effective tokens/s {speedup:.2f}x random >= {TARGET_SPEEDUP}x",
            speedup >= TARGET_SPEEDUP,
        ),
        (
            f"balanced 2-rank imbalance {balanced:.3f} <= {TARGET_IMBALANCE}",
            balanced <= TARGET_IMBALANCE,
        ),
    ]
    for text, ok in checks:
        if args.quick:  # too few documents per pass for the throughput to mean anything
            console.print(f"[dim]not checked (--quick)[/dim] {text}")
        else:
            console.print(("[green]PASS[/green] " if ok else "[red]FAIL[/red] ") + text)
    meta["acceptance"] = {text: ok for text, ok in checks}
    bench.save()


def flex_comparison(bench: Bench, docs: Sequence[np.ndarray], pack: PackingConfig) -> None:
    """Packed attention forward, dense mask vs compiled FlexAttention, on a real packed batch."""
    assert pack.rows is not None
    sampler = PackedBatchSampler([len(d) for d in docs], pack, seed=0)
    first = next(iter(sampler))
    document_ids = PackingCollator(pack)([docs[i] for i in first])["document_ids"]
    g = torch.Generator().manual_seed(0)
    heads, head_dim = 4, 32  # the tiny encoder: dim 128 = 4 heads x 32
    q, k, v = (torch.randn(pack.rows, heads, pack.max_len, head_dim, generator=g) for _ in range(3))
    diff = (
        (
            packed_attention(q, k, v, document_ids, backend="flex")
            - packed_attention(q, k, v, document_ids, backend="sdpa")
        )
        .abs()
        .max()
    )
    bench.meta["flex_max_abs_diff_fp32"] = float(diff)
    with torch.no_grad():
        bench.compare(
            f"packed attention forward fp32, {pack.rows} x {pack.max_len}, 4 heads x 32",
            [
                Candidate(
                    "sdpa-dense-mask",
                    lambda: packed_attention(q, k, v, document_ids, backend="sdpa"),
                ),
                Candidate(
                    "flex-compiled", lambda: packed_attention(q, k, v, document_ids, backend="flex")
                ),
            ],
            baseline="sdpa-dense-mask",
            number=5,
        )


if __name__ == "__main__":
    main()
