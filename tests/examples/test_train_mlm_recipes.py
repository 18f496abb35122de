"""The main job's recipes: ``--recipe fast`` (sequence-length warm-up) and the
mid-training validation ``benchmarks/time_to_accuracy.py`` reads."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parents[2] / "examples" / "train_mlm.py"


def _load():
    spec = importlib.util.spec_from_file_location("train_mlm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fast_recipe_resolves_to_seq_warmup_and_wsd_at_the_lr_finders_peak():
    module = _load()
    args = module.parse_args(["--recipe", "fast"])
    assert (args.schedule, args.seq_warmup, args.budget_minutes) == ("wsd", 0.3, 0.0)
    assert args.lr == module.FAST_LR
    plain = module.parse_args([])
    assert (plain.schedule, plain.seq_warmup, plain.lr) == ("cosine", 0.0, module.PLAIN_LR)
    assert module.parse_args(["--recipe", "fast", "--lr", "1e-3"]).lr == 1e-3  # given: kept


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_fast_recipe_trains_and_validates_mid_run(monkeypatch, tmp_path, schedule):
    monkeypatch.setenv("STOKER_RUNS_DIR", str(tmp_path))
    monkeypatch.setenv("STOKER_DOCTOR", "0")
    argv = ["--recipe", "fast", "--steps", "6", "--batch-size", "8", "--eval-every", "3"]
    argv += ["--schedule", schedule]
    results = _load().main([*argv, "--eval-batches", "2", "--log-every", "3"])
    assert results["steps"] == 6
    assert [e[0] for e in results["evals"]] == [3, 6]
    seconds = [e[1] for e in results["evals"]]
    assert 0 < seconds[0] < seconds[1] <= results["train_seconds"] + 1e-6


def test_target_accuracy_stops_at_the_first_validation_reaching_it(monkeypatch, tmp_path):
    monkeypatch.setenv("STOKER_RUNS_DIR", str(tmp_path))
    monkeypatch.setenv("STOKER_DOCTOR", "0")
    argv = ["--steps", "9", "--batch-size", "8", "--eval-every", "3", "--eval-batches", "2"]
    results = _load().main([*argv, "--budget-minutes", "0", "--target-accuracy", "0.0"])
    assert results["steps"] == 3 and len(results["evals"]) == 1
