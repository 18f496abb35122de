"""Tests for stoker.bench: interleaving, statistics, ratios, throughput, JSON, environment, CLI."""

from __future__ import annotations

import doctest
import io
import itertools
import json
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

import stoker.bench
from stoker.bench import (
    CPU_FLAGS,
    Bench,
    BenchConfig,
    Candidate,
    Comparison,
    autorange,
    bench_parser,
    environment,
    summarize,
)
from stoker.errors import StokerError


class FakeClock:
    """A clock that only moves when a candidate says how long it took."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advancing(self, seconds: float | list[float], log: list[str] | None = None, name: str = ""):
        durations = iter(seconds) if isinstance(seconds, list) else None

        def fn() -> None:
            self.now += next(durations) if durations is not None else seconds  # type: ignore[operator]
            if log is not None:
                log.append(name)

        return fn


def quiet_bench(clock: FakeClock | None = None, **config: object) -> Bench:
    cfg = BenchConfig(**{"warmup": 0, "repeats": 4, "out_dir": None, **config})  # type: ignore[arg-type]
    if clock is None:
        return Bench("test", cfg, quiet=True)
    return Bench("test", cfg, quiet=True, clock=clock)


def test_rounds_are_interleaved_in_random_orders_and_no_candidate_runs_twice_in_a_row() -> None:
    clock, log = FakeClock(), []
    cands = [Candidate(n, clock.advancing(1.0, log, n)) for n in "ABCD"]
    result = quiet_bench(clock, warmup=2, repeats=40).compare("order", cands)
    rounds = [tuple(log[i : i + 4]) for i in range(0, len(log), 4)]
    assert len(rounds) == 42 and all(sorted(r) == list("ABCD") for r in rounds)
    assert result.order == tuple(rounds[2:])  # the timed rounds, as run
    assert all(a != b for a, b in itertools.pairwise(log))
    # Every candidate takes every position (an alternating A B C D / D C B A never puts A second).
    assert all({r[pos] for r in result.order} == set("ABCD") for pos in range(4))
    assert all(len(c.warmup_seconds) == 2 and len(c.seconds) == 40 for c in result.candidates)
    # Seeded: the same comparison runs in the same order again.
    clock2, log2 = FakeClock(), []
    cands2 = [Candidate(n, clock2.advancing(1.0, log2, n)) for n in "ABCD"]
    quiet_bench(clock2, warmup=2, repeats=40).compare("order", cands2)
    assert log2 == log


def test_an_identical_copy_of_the_baseline_measures_as_the_baseline_with_warm_caches() -> None:
    # A candidate that runs right after itself is 10% faster (its code and data still cached).
    # The old A B, B A, ... order ran the baseline twice in a row at every turn and made its
    # identical copy look slower; no candidate may ever follow itself.
    clock, previous = FakeClock(), [""]

    def cached(name: str):
        def fn() -> None:
            clock.now += 0.9 if previous[0] == name else 1.0
            previous[0] = name

        return fn

    cands = [Candidate(n, cached(n)) for n in ("raw", "raw#2", "other")]
    result = quiet_bench(clock, warmup=1, repeats=30).compare("aa", cands)
    assert result["raw#2"].ratios == (1.0,) * 30


def test_number_calls_make_one_sample_and_time_is_per_call() -> None:
    clock, log = FakeClock(), []
    cands = [Candidate("A", clock.advancing(0.5, log, "A"))]
    result = quiet_bench(clock, repeats=2).compare("n", cands, number=3)
    assert log == ["A"] * 6
    assert result["A"].seconds == (0.5, 0.5)


def test_median_min_max_and_ratio_from_known_durations() -> None:
    clock = FakeClock()
    # Each candidate's list is consumed in its own call order, whatever the rounds' order.
    a = Candidate("A", clock.advancing([1.0, 2.0, 3.0, 4.0, 100.0]))
    b = Candidate("B", clock.advancing([2.0, 4.0, 6.0, 8.0, 200.0]))
    result = quiet_bench(clock, repeats=5).compare("known", [a, b], baseline="A")
    ta, tb = result["A"].time, result["B"].time
    assert (ta.median, ta.min, ta.max) == (3.0, 1.0, 100.0)
    assert (tb.median, tb.min, tb.max) == (6.0, 2.0, 200.0)
    assert result["B"].ratios == (2.0,) * 5  # paired per round
    assert result["B"].ratio == pytest.approx(2.0)
    assert result["B"].speedup == pytest.approx(0.5)
    assert result["A"].ratio == 1.0


def test_paired_ratio_cancels_drift_that_raw_medians_would_not() -> None:
    # The machine slows down 10x halfway through; B is always 1.25x A in the same round.
    clock = FakeClock()
    slow = [1, 1, 10, 10, 10]
    a = Candidate("A", clock.advancing([1.0 * s for s in slow]))
    b = Candidate("B", clock.advancing([1.25 * s for s in slow]))
    result = quiet_bench(clock, repeats=5).compare("drift", [a, b])
    assert result["B"].ratio == pytest.approx(1.25)


def test_throughput_from_static_and_returned_work() -> None:
    clock = FakeClock()
    step = clock.advancing(0.5)
    counts = iter(range(1000))

    def ragged() -> torch.Tensor:
        clock.now += 0.5
        return torch.tensor(100 + 100 * (next(counts) % 2))  # 100, 200, 100, 200, ...

    cands = [Candidate("fixed", step, work=100), Candidate("ragged", ragged, returns_work=True)]
    result = quiet_bench(clock, repeats=3).compare("thr", cands, unit="tokens", number=2)
    assert result["fixed"].throughput is not None
    assert result["fixed"].throughput.median == pytest.approx(200.0)  # 100 tokens / 0.5 s
    assert result["ragged"].work == (150.0, 150.0, 150.0)  # mean over the 2 calls of a sample
    assert result["ragged"].speedup == pytest.approx(1.5)


def test_sleep_ratio_is_measured_by_the_real_clock() -> None:
    cands = {"short": lambda: time.sleep(0.005), "long": lambda: time.sleep(0.020)}
    result = quiet_bench(repeats=7).compare("sleep", cands, baseline="short")
    assert result["short"].time.median >= 0.005
    # 20/5 = 4, less sleep's overshoot (added to both; up to ~10 ms on a loaded machine).
    assert 1.5 < result["long"].ratio < 4.5


def test_json_contents_round_trip(tmp_path: Path) -> None:
    clock = FakeClock()
    meta = {"size": 7}
    bench = Bench(
        "unit",
        BenchConfig(warmup=1, repeats=3, out_dir=tmp_path),
        meta=meta,
        quiet=True,
        clock=clock,
    )
    bench.compare("c1", [Candidate("A", clock.advancing(1.0), work=10)], unit="tokens")
    meta["result"] = 0.5  # filled in by the script after the bench was made: saved too
    path = bench.save()
    assert path is not None and path.parent == tmp_path and path.name.startswith("unit-")
    data = json.loads(path.read_text())
    assert data["benchmark"] == "unit"
    assert data["config"] == {"warmup": 1, "repeats": 3, "quick": False, "clock": "wall"}
    assert data["meta"] == {"size": 7, "result": 0.5}
    (comp,) = data["comparisons"]
    cand = comp["candidates"][0]
    assert comp["unit"] == "tokens" and comp["baseline"] == "A"
    assert cand["seconds"] == [1.0, 1.0, 1.0] and cand["warmup_seconds"] == [1.0]
    assert cand["time_s"]["median"] == 1.0 and cand["throughput_per_s"]["median"] == 10.0
    assert {"p10", "p90", "p25", "p75", "min", "max", "median"} <= set(cand["time_s"])
    assert "environment" in data and "torch_threads" in data["environment"]
    assert len(data["load_average_end"]) == 3

    other = Bench("merged", BenchConfig(out_dir=None), quiet=True)
    (loaded,) = other.include(path)
    assert isinstance(loaded, Comparison) and loaded == bench.comparisons[0]


def test_no_json_without_out_dir(tmp_path: Path) -> None:
    bench = quiet_bench(FakeClock())
    assert bench.save() is None
    assert bench.save(tmp_path / "x.json") == tmp_path / "x.json"


def test_environment_keys() -> None:
    env = environment()
    for key in (
        "timestamp",
        "hostname",
        "python",
        "versions",
        "cpu_model",
        "cpu_flags",
        "torch_threads",
        "torch_interop_threads",
        "load_average",
        "git",
    ):
        assert key in env, key
    assert env["versions"]["torch"] == torch.__version__
    assert env["versions"]["stoker"] is not None
    assert env["torch_threads"] == torch.get_num_threads()
    if env["cpu_flags"] is not None:  # Linux
        assert set(env["cpu_flags"]) == set(CPU_FLAGS)
    json.dumps(env)  # serialisable as is


def test_git_revision_when_in_a_repo(tmp_path: Path) -> None:
    assert environment(repo=tmp_path)["git"] is None  # not a repository


def test_cli_defaults_quick_and_overrides(tmp_path: Path) -> None:
    parser = bench_parser("x")
    full = BenchConfig.from_args(parser.parse_args([]))
    quick = BenchConfig.from_args(parser.parse_args(["--quick"]))
    assert quick.quick and quick.repeats < full.repeats and quick.warmup <= full.warmup
    cfg = BenchConfig.from_args(
        parser.parse_args(["--quick", "--repeats", "9", "--warmup", "0", "--out", str(tmp_path)])
    )
    assert (cfg.repeats, cfg.warmup, cfg.out_dir) == (9, 0, tmp_path)
    assert BenchConfig.from_args(parser.parse_args(["--no-save"])).out_dir is None
    own = bench_parser("y", warmup=5, repeats=40)
    default = BenchConfig.from_args(own.parse_args([]))
    assert (default.warmup, default.repeats, default.quick) == (5, 40, False)
    assert BenchConfig.from_args(own.parse_args(["--quick"])).repeats == quick.repeats


def test_autorange_makes_samples_long_enough() -> None:
    number = autorange(lambda: time.sleep(0.001), min_time=0.01)
    # Calls take >= 1 ms, so 16 always reach 10 ms; powers of two only.
    assert number in (1, 2, 4, 8, 16)
    assert autorange(lambda: None, min_time=10.0, max_number=64) == 64


def test_autorange_is_not_stopped_by_one_stalled_call() -> None:
    # The second call stalls for 50 ms (a garbage collection, a neighbour on the VM); every
    # other call takes 1 ms. One timing per count would stop at 1 call.
    durations = iter([0.001, 0.05])

    def fn() -> None:
        time.sleep(next(durations, 0.001))

    assert autorange(fn, min_time=0.01) >= 8


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: BenchConfig(repeats=0), "repeats=0"),
        (lambda: BenchConfig(warmup=-1), "warmup=-1"),
        (lambda: Candidate("a", lambda: None, work=3, returns_work=True), "not both"),
        (lambda: Candidate("a", lambda: None, work=0), "work=0"),
        (lambda: quiet_bench().compare("x", {"a": lambda: None}, baseline="b"), r"\['a'\]"),
        (lambda: quiet_bench().compare("x", [], baseline="b"), "no candidates"),
        (lambda: quiet_bench().compare("x", {"a": lambda: None}, number=0), "number=0"),
    ],
)
def test_bad_input_is_one_clear_error(make, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(StokerError, match=match):
        make()


def test_candidate_that_leaks_process_state_is_refused() -> None:
    threads = torch.get_num_threads()

    def leaky() -> None:
        torch.set_num_threads(1 if threads != 1 else 2)

    try:
        with pytest.raises(StokerError, match="torch intra-op threads"):
            quiet_bench().compare("leak", {"leaky": leaky})
    finally:
        torch.set_num_threads(threads)


def test_thread_clock_ignores_time_spent_off_cpu() -> None:
    def busy() -> None:
        sum(range(50_000))

    def busy_then_wait() -> None:
        sum(range(50_000))
        time.sleep(0.005)  # descheduled, as when another process takes the core

    threads = torch.get_num_threads()
    try:
        cfg = BenchConfig(warmup=0, repeats=3, out_dir=None, clock="thread")
        bench = Bench("thread", cfg, quiet=True)
        assert torch.get_num_threads() == 1  # all the work on the measured thread
        cands = {"busy": busy, "waits": busy_then_wait}
        assert bench.compare("cpu", cands)["waits"].ratio < 1.5
    finally:
        torch.set_num_threads(threads)
    wall = quiet_bench().compare("wall", cands)
    assert wall["waits"].ratio > 1.5
    with pytest.raises(StokerError, match="clock='gpu'"):
        BenchConfig(clock="gpu")


def test_returned_work_must_be_a_number() -> None:
    with pytest.raises(StokerError, match="returned str"):
        quiet_bench().compare("w", [Candidate("a", lambda: "x", returns_work=True)])


def test_table_prints_ratios_and_throughput() -> None:
    clock, out = FakeClock(), io.StringIO()
    bench = Bench(
        "tbl",
        BenchConfig(warmup=0, repeats=2, out_dir=None),
        console=Console(file=out, width=200),
        clock=clock,
    )
    bench.compare(
        "c",
        [
            Candidate("base", clock.advancing(0.001), work=64),
            Candidate("cand", clock.advancing(0.002), work=64),
        ],
        unit="tokens",
    )
    text = out.getvalue()
    assert "tokens/s" in text and "1.000 (baseline)" in text and "2.000" in text
    assert "1 ms" in text and "64k" in text


def test_summarize_quantiles_match_linear_interpolation() -> None:
    s = summarize([4, 1, 3, 2, 5])
    assert (s.median, s.min, s.max, s.p25, s.p75, s.mean) == (3, 1, 5, 2, 4, 3)
    assert s.p10 == pytest.approx(1.4) and s.p90 == pytest.approx(4.6)
    assert (s.median_lo, s.median_hi) == (1, 5)  # 5 values: too few, the whole range


def test_median_confidence_interval_uses_binomial_ranks() -> None:
    s = summarize(range(1, 21))  # n=20: 6th to 15th smallest (P(B <= 5) = 0.021)
    assert (s.median_lo, s.median_hi) == (6, 15)
    s = summarize(range(1, 41))  # n=40: 14th to 27th
    assert (s.median_lo, s.median_hi) == (14, 27)


def test_module_docstring_example_runs() -> None:
    failures, tried = doctest.testmod(stoker.bench, verbose=False)
    assert tried > 0 and failures == 0
