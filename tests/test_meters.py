"""Meters: FLOPs counted exactly on hand-computable models, a measured peak, MFU <= 100%."""

import doctest
import time

import pytest
import torch

import stoker.meters.utilization
from stoker.meters import DENSE_TFLOPS, count_flops, mfu, peak_flops
from stoker.models import Encoder, EncoderConfig


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
