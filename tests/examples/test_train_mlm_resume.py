"""The main job killed with SIGKILL mid-run and resumed ends bitwise identical."""

from pathlib import Path

import pytest

from stoker.checkpoint.check_resume import CheckResumeConfig, check_resume

EXAMPLE = Path(__file__).parents[2] / "examples" / "train_mlm.py"


# Slow (~18 s on an EPYC Zen 3); the default suite keeps SIGKILL-and-resume exactness in
# tests/checkpoint/test_exact_resume.py and the preemption tests.
@pytest.mark.slow
def test_train_mlm_resumes_exactly(tmp_path):
    args = ["--steps", "9", "--batch-size", "8", "--checkpoint-every", "3"]
    args += ["--eval-batches", "1", "--log-every", "100"]
    result = check_resume(
        str(EXAMPLE),
        args,
        CheckResumeConfig(kills=1, seed=3, workdir=tmp_path),
        echo=lambda _: None,
    )
    assert result.final_step == 9
    assert result.kill_steps and 1 <= result.kill_steps[0] < 9
    assert result.tensors_compared > 10
    assert result.identical, result.differences[:5]
    assert result.first_loss_difference is None
