"""A few steps of the README's main job, end to end (real corpus, tokenizer, model, loop)."""

import importlib.util
import math
from pathlib import Path

EXAMPLE = Path(__file__).parents[2] / "examples" / "train_mlm.py"


def _load():
    spec = importlib.util.spec_from_file_location("train_mlm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_few_steps_train_and_evaluate():
    train_mlm = _load()
    args = ["--steps", "6", "--batch-size", "8", "--eval-batches", "2", "--log-every", "3"]
    results = train_mlm.main(args)
    assert results["steps"] == 6
    assert math.isfinite(results["val_loss"])
    assert 0.0 <= results["val_accuracy"] <= 1.0
    assert 0.0 < results["unigram_accuracy"] < 0.5
    assert results["tokens_per_second"] > 0


def test_a_time_budget_fits_the_number_of_steps():
    """With a budget no step fits in, training stops once the first steps have been timed
    (2 warm-up steps + CALIBRATE timed ones), not at --steps."""
    train_mlm = _load()
    args = ["--steps", "100", "--budget-minutes", "0.0001", "--batch-size", "4"]
    results = train_mlm.main([*args, "--eval-batches", "1", "--log-every", "50"])
    assert results["steps"] == 2 + train_mlm.CALIBRATE
