"""The benchmark harness every script in ``benchmarks/`` uses.

A benchmark is a few *candidates* (zero-argument callables doing the same work in different
ways) compared against a named *baseline* in the same process. The harness:

- runs warm-up rounds, then timed rounds, **interleaved**: each round runs every candidate
  once, in a random (seeded) order that never starts with the previous round's last, so slow
  drift (thermal, turbo, a neighbour on the VM) and the caches one candidate leaves to the
  next hit every candidate alike, and no candidate runs twice in a row;
- times each sample with :func:`time.perf_counter` around ``number`` calls, synchronising
  CUDA/MPS (when in use) before starting and before stopping the clock (``--clock thread``
  measures the thread's CPU time instead, with one torch thread: steadier on a busy machine);
- reports per-call median, min/max and p10/p90, throughput when a candidate reports its work
  (tokens, samples, ...), and the ratio to the baseline: the median over rounds of
  ``candidate time / baseline time in the same round`` (paired, hence robust to drift), with a
  distribution-free 95% confidence interval of that median;
- refuses a candidate that changes process-wide state the others would inherit (torch intra-op
  threads, CPU autocast, grad mode, fp32 matmul precision);
- prints a rich table per comparison and writes one JSON file per run (default directory
  ``bench-results/``) holding every sample plus the environment: versions, CPU model and flags,
  threads, load average, hostname, git revision, timestamp.

A benchmark script looks like this (every script in ``benchmarks/`` has the same CLI:
``--quick``, ``--repeats``, ``--warmup``, ``--out``, ``--no-save``, ``--clock``)::

    import torch
    from stoker.bench import Bench, Candidate, bench_parser

    parser = bench_parser("Matrix product: bf16 against fp32.")
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    bench = Bench.from_args("matmul", args, meta={"size": args.size})

    a = torch.randn(args.size, args.size)
    b = a.bfloat16()
    flops = 2 * args.size**3  # one n x n x n product, multiply + add
    bench.compare(
        "matmul",
        [
            Candidate("fp32", lambda: a @ a, work=flops),
            Candidate("bf16", lambda: b @ b, work=flops),
        ],
        baseline="fp32",
        unit="flop",
        number=10,  # calls per timed sample: make a sample >= ~10 ms
    )
    bench.save()  # -> bench-results/matmul-20250101T120000Z.json

A candidate whose work varies per call (ragged batches) returns it and says so:
``Candidate("packed", step, returns_work=True)``; the returned value (number or 0-d tensor) is
converted after the clock stops, so a device tensor costs no sync inside the timed region.

Executed example (tests/test_bench.py runs it):

    >>> import time
    >>> from stoker.bench import Bench, BenchConfig, Candidate
    >>> bench = Bench("doc", BenchConfig(warmup=1, repeats=3, out_dir=None), quiet=True)
    >>> result = bench.compare(
    ...     "sleep",
    ...     [
    ...         Candidate("short", lambda: time.sleep(0.001)),
    ...         Candidate("long", lambda: time.sleep(0.010)),
    ...     ],
    ...     baseline="short",
    ... )
    >>> result["long"].ratio > 1.5
    True
"""

from stoker.bench.environment import CPU_FLAGS, environment
from stoker.bench.harness import Bench, BenchConfig, Candidate, autorange, bench_parser
from stoker.bench.results import CandidateResult, Comparison
from stoker.bench.stats import Stats, summarize

__all__ = [
    "CPU_FLAGS",
    "Bench",
    "BenchConfig",
    "Candidate",
    "CandidateResult",
    "Comparison",
    "Stats",
    "autorange",
    "bench_parser",
    "environment",
    "summarize",
]
