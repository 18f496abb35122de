"""Meters: FLOPs counted exactly on hand-computable models, a measured peak, MFU <= 100%."""

import doctest
import time

import pytest
import torch

import stoker.meters.utilization
from stoker.meters import DENSE_TFLOPS, count_flops, mfu, peak_flops
from stoker.models import Encoder, EncoderConfig
from stoker.records import MACHINE_METRICS, read_metrics


def test_mlp_forward_and_backward_flops_are_exact():
    b, d_in, d_hidden, d_out = 16, 32, 64, 8
    model = torch.nn.Sequential(
        torch.nn.Linear(d_in, d_hidden), torch.nn.ReLU(), torch.nn.Linear(d_hidden, d_out)
    )
    x = torch.randn(b, d_in)  # no grad: the first layer's input gradient is never computed
    forward = 2 * b * (d_in * d_hidden + d_hidden * d_out)
    backward = 2 * b * d_hidden * d_out * 2 + 2 * b * d_in * d_hidden
    assert count_flops(lambda: model(x)) == forward
    assert count_flops(lambda: model(x).sum().backward()) == forward + backward


def test_encoder_attention_flops_are_counted_on_cpu():
    cfg = EncoderConfig.preset("tiny", vocab_size=1000, max_len=64)
    model = Encoder(cfg).eval()
    b, t, d, f, v = 2, 64, cfg.dim, cfg.ffn_dim, cfg.vocab_size
    rows = b * t
    linears = cfg.layers * 2 * rows * (d * 3 * d + d * d + 2 * d * f) + 2 * rows * d * v
    # QK^T and AV: 2 * B * T * T * D each per block (heads x head_dim = D)
    attention = cfg.layers * 2 * (2 * b * t * t * d)
    assert count_flops(lambda: model(torch.randint(0, v, (b, t)))) == linears + attention


def test_dense_peaks_only():
    # Data-sheet dense values (sparse ones are twice these): A100 bf16 312, H100 SXM 989
    assert DENSE_TFLOPS["A100"]["bf16"] == 312.0 and DENSE_TFLOPS["H100 SXM"]["bf16"] == 989.0
    assert all(p["fp32"] < p.get("fp16", p["fp32"] * 2) for p in DENSE_TFLOPS.values())


def test_a_real_step_never_beats_the_measured_peak(tmp_path, monkeypatch):
    monkeypatch.setenv("STOKER_CACHE", str(tmp_path))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)])
    x = torch.randn(256, 512)

    def step():
        model(x).sum().backward()

    flops = count_flops(step)
    step()
    fastest = min(_timed(step) for _ in range(5))
    peak = peak_flops("cpu", "fp32", refresh=True)
    assert peak.source == "probe" and peak.flops > 0
    utilization = mfu(flops, fastest, peak)
    assert 0 < utilization <= 1.0, (utilization, peak.describe())
    # a second call reads the cache; a refresh keeps the better of the two
    assert peak_flops("cpu", "fp32").flops == peak.flops
    assert peak_flops("cpu", "fp32", refresh=True).flops >= peak.flops


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def test_mfu_doc_and_errors():
    assert doctest.testmod(stoker.meters.utilization).failed == 0
    with pytest.raises(Exception, match="step_seconds > 0"):
        mfu(1.0, 0.0, 1.0)


# -- the live meters of a Stoker run ---------------------------------------------------------


def _run_mlp(
    tmp_path, steps, *, meters=None, batch=64, d=(256, 512, 256), loader_delay=0.0, slept=None
):
    """A Stoker run of an MLP through a prepared loader: the stoker, wall-clock seconds from
    the end of the meters' counted step (the second) to the end, and the run directory."""
    from torch.utils.data import DataLoader, Dataset

    from stoker import Stoker
    from stoker.meters import MetersConfig
    from stoker.records import RecordConfig

    class Rows(Dataset):
        def __len__(self):
            return steps * batch

        def __getitem__(self, i):
            if loader_delay and i % batch == 0:
                t0 = time.perf_counter()
                time.sleep(loader_delay)
                slept.append(time.perf_counter() - t0)
            return torch.full((d[0],), float(i % 7)), i % d[-1]

    torch.manual_seed(0)
    stoker = Stoker(
        device="cpu",
        precision="fp32",
        meters=meters or MetersConfig(every_steps=5, min_seconds=0),
        record=RecordConfig(directory=tmp_path / "run", save_code=False, flush_seconds=0.01),
    )
    layers = [torch.nn.Linear(d[0], d[1]), torch.nn.ReLU(), torch.nn.Linear(d[1], d[2])]
    model = torch.nn.Sequential(*layers)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loader = DataLoader(Rows(), batch_size=batch)
    model, optimizer, loader = stoker.prepare(model, optimizer, loader)
    started = None
    for x, y in loader:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        stoker.backward(loss, tokens=torch.tensor(batch))
        optimizer.step()
        optimizer.zero_grad()
        if stoker.step == 2:
            started = time.perf_counter()
    elapsed = time.perf_counter() - started
    stoker.close()
    return stoker, elapsed, tmp_path / "run"


def _mlp_step_flops(batch, d):
    # forward 2*B*(d0*d1 + d1*d2); backward: weight grads of both layers (2*B*d0*d1, 2*B*d1*d2)
    # and the hidden activation's grad (2*B*d1*d2); the input needs no grad.
    forward = 2 * batch * (d[0] * d[1] + d[1] * d[2])
    return forward + 2 * batch * d[0] * d[1] + 2 * 2 * batch * d[1] * d[2]


def test_live_mfu_matches_a_direct_computation_and_never_exceeds_100_percent(tmp_path):
    from stoker.records import read_record

    batch, d, steps = 64, (256, 512, 256), 40
    stoker, elapsed, run_dir = _run_mlp(tmp_path, steps, batch=batch, d=d)
    meters = stoker.meters
    assert meters is not None and meters.peak is not None
    flops = _mlp_step_flops(batch, d)
    assert meters.flops_per_step == flops  # counted on a real step, exactly the formula
    summary = read_record(run_dir)["summary"]["meters"]
    assert summary["timed_steps"] == steps - 2 and summary["flops_counted"] is True
    direct = flops * (steps - 2) / elapsed / meters.peak.flops
    assert 0 < summary["mfu"] <= 1.0
    assert summary["mfu"] == pytest.approx(direct, rel=0.10), (summary, direct)
    assert summary["tokens"] == batch * (steps - 2)
    assert summary["tokens_per_s"] == pytest.approx(summary["samples_per_s"], rel=1e-6)
    assert summary["step_s_p50"] <= summary["step_s_p99"]
    assert summary["peak_memory_mb"] > 0 and summary["memory"] == "process peak RSS"
    lines = [r for r in read_metrics(run_dir / "metrics.jsonl") if "mfu" in r]
    # one line per 5 timed steps: steps 7, 12, ..., 37 (timing starts at the end of step 2)
    assert [r["step"] for r in lines] == list(range(7, steps + 1, 5))
    assert all(0 < r["mfu"] <= 1.0 and r["tokens_per_s"] > 0 for r in lines)
    # every key the meters log is a machine measurement `stoker reproduce` does not compare
    assert {k for r in lines for k in r} - {"step", "time"} == MACHINE_METRICS


def test_live_mfu_of_an_encoder_with_attention(tmp_path):
    from stoker import Stoker
    from stoker.meters import MetersConfig

    cfg = EncoderConfig.preset("tiny", vocab_size=500, max_len=64)
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (4, 64))
    reference = Encoder(cfg)

    def step(model):
        model(ids).float().logsumexp(-1).mean().backward()

    expected = count_flops(lambda: step(reference))
    stoker = Stoker(device="cpu", precision="fp32", record=False, meters=MetersConfig())
    model = stoker.prepare(Encoder(cfg))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    for i in range(12):
        step(model)
        optimizer.step()
        optimizer.zero_grad()
        stoker.step_done()
        if i == 1:
            started = time.perf_counter()
    elapsed = time.perf_counter() - started
    meters = stoker.meters
    assert meters is not None and meters.peak is not None
    assert meters.flops_per_step == expected  # attention (the CPU SDPA kernel) included
    summary = meters.summary()
    direct = expected * 10 / elapsed / meters.peak.flops
    assert 0 < summary["mfu"] <= 1.0
    assert summary["mfu"] == pytest.approx(direct, rel=0.10), (summary, direct)
    stoker.close()


def test_data_wait_share_sees_a_slow_loader(tmp_path):
    from stoker.meters import MetersConfig

    slept = []
    stoker, _, _ = _run_mlp(
        tmp_path,
        12,
        meters=MetersConfig(every_steps=4, min_seconds=0),
        batch=8,
        d=(8, 8, 8),
        loader_delay=0.02,
        slept=slept,
    )
    summary = stoker.meters.summary()
    # the fetches of the 10 timed steps (3..12) slept this share of the timed seconds at least
    share = sum(slept[2:12]) / summary["seconds"]
    assert share > 0.2, (share, summary)  # 20 ms sleeps against sub-ms steps
    assert share <= summary["data_wait_share"] <= 1.0, (share, summary)
    assert summary["samples_per_s"] == pytest.approx(8 * 10 / summary["seconds"])


def test_given_flops_per_step_and_count_tokens(tmp_path):
    from stoker import Stoker
    from stoker.meters import MetersConfig

    stoker = Stoker(
        device="cpu", precision="fp32", record=False, meters=MetersConfig(flops_per_step=1e6)
    )
    model = stoker.prepare(torch.nn.Linear(4, 4))
    for _ in range(6):
        stoker.backward(model(torch.randn(3, 4)).sum(), tokens=torch.tensor(3))
        stoker.meters.count_tokens(torch.tensor(10))  # instead of backward's 3
        stoker.step_done()
    summary = stoker.meters.summary()
    # flops given: timing starts at the end of the first step; 5 timed steps of 10 tokens
    assert summary["timed_steps"] == 5 and summary["tokens"] == 50
    assert summary["flops_per_step"] == 1e6 and summary["flops_counted"] is False


def test_meters_off_and_bad_input(tmp_path):
    from stoker import Stoker
    from stoker.errors import StokerError
    from stoker.meters import MetersConfig

    stoker = Stoker(device="cpu", precision="fp32", record=False, meters=False)
    stoker.prepare(torch.nn.Linear(2, 2))
    assert stoker.meters is None
    with pytest.raises(StokerError, match="meters='yes'"):
        Stoker(device="cpu", record=False, meters="yes")
    with pytest.raises(StokerError, match="every_steps=0"):
        MetersConfig(every_steps=0)


def _training_step():
    """A real training step (one process, no accumulation) for the meters to listen to:
    ``step_done()`` ends an optimizer step, logs its end and calls them when they asked."""
    from stoker.runtime.distributed import DistributedContext
    from stoker.runtime.step import TrainingStep

    return TrainingStep(accumulation_steps=1, scaler=None, dist=DistributedContext())


def _meters(steps, config, write, kind=None, **kwargs):
    from stoker.meters import StepMeters
    from stoker.runtime.prepared import DataClock

    meters = (kind or StepMeters)(
        config,
        steps=steps,
        clock=DataClock(),
        device=torch.device("cpu"),
        dtype="fp32",
        count=False,
        write=write,
        **kwargs,
    )
    steps.add_listener(meters)
    return meters


def test_a_step_with_the_meters_on_calls_them_once_a_window(tmp_path):
    """The per-step work: the step appends its end time to the log; the meters are called
    once a window, not every step (benchmarks/report.py measures the ratio on real steps)."""
    from stoker.meters import MetersConfig, StepMeters

    calls = []

    class Counted(StepMeters):
        def on_step_end(self, step):
            calls.append(step)
            return super().on_step_end(step)

    steps = _training_step()
    lines = []
    _meters(
        steps,
        MetersConfig(every_steps=1000, min_seconds=0, flops_per_step=1.0),
        lambda compute, step: lines.append(step),
        kind=Counted,
    )
    steps.step_done()  # timing starts
    n = 20_000
    t0 = time.perf_counter()
    for _ in range(n):
        steps.step_done()
    per_step = (time.perf_counter() - t0) / n
    assert lines == list(range(1001, n + 2, 1000))
    assert calls == [1, 2, *range(1001, n + 2, 1000)]
    assert per_step < 20e-6, per_step  # ~1 µs on a quiet core; generous for shared ones


def test_a_window_lasts_min_seconds_at_least(monkeypatch):
    """Fast steps get fewer, longer windows: every_steps steps *and* min_seconds per line."""
    import types

    from stoker.meters import MetersConfig, live
    from stoker.runtime import step as step_module

    now = [0.0]
    clock = types.SimpleNamespace(perf_counter=lambda: now[0])
    monkeypatch.setattr(live, "time", clock)
    monkeypatch.setattr(step_module, "time", clock)
    steps = _training_step()
    lines: list[int] = []
    _meters(
        steps,
        MetersConfig(every_steps=5, min_seconds=1.0, flops_per_step=1.0),
        lambda compute, step: lines.append(step),
    )
    steps.step_done()  # timing starts at t = 0
    for _ in range(2, 50):
        now[0] += 0.125  # 8 steps a second: a window needs 8 steps (1 s), not 5
        steps.step_done()
    assert lines == [9, 17, 25, 33, 41, 49]
    for _ in range(50, 60):
        now[0] += 0.5  # slow steps: every_steps decides again
        steps.step_done()
    assert lines[-2:] == [54, 59]


def test_a_window_faster_than_a_low_cached_peak_probes_again(monkeypatch):
    from stoker.meters import MetersConfig, PeakFlops, live

    probes = []

    def fake_peak(device, dtype, refresh=False):
        probes.append(refresh)
        return PeakFlops("cpu", dtype, 1e20 if refresh else 1.0, "probe" if refresh else "cache")

    monkeypatch.setattr(live, "peak_flops", fake_peak)
    steps = _training_step()
    lines = []
    meters = _meters(
        steps,
        MetersConfig(every_steps=3, min_seconds=0, flops_per_step=1e6),
        lambda compute, step: lines.append(compute()),
    )
    for _ in range(1, 11):
        steps.step_done()
    assert probes == [False, True]  # the cached 1 FLOP/s was beaten: probed again, once
    assert all(0 < line["mfu"] <= 1.0 for line in lines)
    assert 0 < meters.summary()["mfu"] <= 1.0


def test_a_failing_window_never_stops_training(caplog):
    from stoker.errors import StokerError
    from stoker.meters import MetersConfig

    def broken(line, step):
        raise OSError("disk gone")

    steps = _training_step()
    meters = _meters(steps, MetersConfig(every_steps=2, min_seconds=0, flops_per_step=1.0), broken)
    with caplog.at_level("WARNING"):
        for _ in range(1, 12):
            steps.step_done()
    assert sum("could not be measured: disk gone" in r.message for r in caplog.records) == 1
    with pytest.raises(StokerError, match="one count"):
        meters.count_tokens(torch.ones(3))


@pytest.mark.parametrize("slow", [False, True])
def test_the_peak_probe_tries_a_larger_size_only_if_it_would_be_quick(monkeypatch, slow):
    """A dtype the CPU computes slowly (bf16 on AVX2-only CPUs: ~2% of fp32) is probed at the
    smallest size only: the probe runs on the training thread and must not stall it for
    seconds. A fast one goes on to larger sizes (closer to the real peak)."""
    from stoker.meters import peak

    sizes = []
    mm = torch.mm

    def timed_mm(a, b):
        sizes.append(a.shape[0])
        if slow:  # the smallest product takes 0.05 s: the next (8x the work) would take 0.4 s
            time.sleep(0.05 * (a.shape[0] / peak._SIZES[0]) ** 3)
        return mm(a, b)

    monkeypatch.setattr(torch, "mm", timed_mm)
    flops = peak._probe(torch.device("cpu"), torch.float32)
    assert flops > 0
    if slow:
        assert set(sizes) == {peak._SIZES[0]}
    else:  # any CPU multiplies 512 x 512 in fp32 at > 9 GFLOP/s: 8x that work < 0.25 s
        assert len(set(sizes)) > 1
