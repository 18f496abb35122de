"""The doctor on loops shaped like outside scripts (written here, no download): a manual-update
LSTM language model (pytorch/examples word_language_model) and a 40-micro-batch GPT loop
(nanoGPT). It must count their steps, stop within its window, and not misread accumulation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from stoker.doctor import DoctorConfig, Finding, diagnose_script
from stoker.doctor.probes import _scaled, batch_dim
from stoker.doctor.report import Report

LOOPS = Path(__file__).parent / "loops"
CONFIG = DoctorConfig(warmup_steps=2, window_steps=3, attribution_steps=2, stop_after_window=True)


@pytest.fixture
def one_thread():
    saved, cores = torch.get_num_threads(), os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
    torch.set_num_threads(1)
    yield
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(saved)


def test_manual_update_loop_is_counted_and_stopped_within_the_window(
    one_thread, tmp_path, monkeypatch
):
    counter = tmp_path / "iterations"
    monkeypatch.setenv("LOOP_COUNT_FILE", str(counter))
    report = diagnose_script(LOOPS / "lstm_manual_sgd.py", [], CONFIG)
    assert report.summary["profiled_steps"] == CONFIG.window_steps
    # model.zero_grad() marks each step: the script is stopped right after the doctor's steps
    # (it would otherwise run 100 epochs)
    assert len(counter.read_text()) <= CONFIG.total_steps


def test_sequence_first_models_grow_the_batch_dimension():
    lstm = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.LSTM(8, 8, 2))
    assert batch_dim(lstm) == 1
    assert batch_dim(torch.nn.LSTM(8, 8, batch_first=True)) == 0
    assert batch_dim(torch.nn.Linear(8, 8)) == 0
    x = torch.zeros(35, 8, dtype=torch.long)  # [seq, batch]
    hidden = (torch.zeros(2, 8, 16), torch.zeros(2, 8, 16))  # [layers, batch, hidden]
    (gx, (gh, gc)), _ = _scaled((x, hidden), {}, 4, dim=1)
    assert gx.shape == (35, 32) and gh.shape == gc.shape == (2, 32, 16)


def test_accumulation_is_measured_per_micro_batch(one_thread):
    report = diagnose_script(LOOPS / "gpt_accumulation.py", [], CONFIG)
    codes = report.codes
    assert "many-small-ops" not in codes, report.render_text()
    small = [f for f in report.findings if f.code == "small-batch"]
    assert small, report.render_text()  # micro-batches of 2 sequences leave the CPU idle
    # the fix keeps the effective batch (micro-batch x accumulation) and so the learning rate
    assert "(40 -> 10)" in small[0].fix and "keep the learning rate" in small[0].fix


def test_finding_texts_print_verbatim():
    finding = Finding(
        code="many-small-ops",
        severity="high",
        share=0.3,
        title="a loop over x[i] for [seq, batch] tensors",
        fix="index with a tensor (`x[idx]`)",
        location="train.py:[3]",
    )
    report = Report(findings=[finding], summary=_summary())
    text = report.render_text()
    assert "x[i] for [seq, batch]" in text and "`x[idx]`" in text and "train.py:[3]" in text


def _summary() -> dict:
    return {
        "device": "cpu",
        "profiled_steps": 3,
        "step_ms": 10.0,
        "unprofiled_step_ms": None,
        "phases_ms": {},
        "device_idle_fraction": 0.0,
        "ops_per_step": 1.0,
        "intra_op_threads": 1,
        "cores": 2,
    }
