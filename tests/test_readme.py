"""The README's examples are executed, so they never go stale."""

import subprocess
from pathlib import Path

import pytest

README = (Path(__file__).parents[1] / "README.md").read_text()


def _fenced() -> list[tuple[str, str]]:
    """(language, body) of every fenced block, in order."""
    blocks, lang, body = [], None, []
    for line in README.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, body = line[3:].strip(), []
            else:
                blocks.append((lang, "\n".join(body) + "\n"))
                lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def _blocks(lang: str) -> list[str]:
    return [body for block_lang, body in _fenced() if block_lang == lang]


def _loop_versions(index: int = 0) -> tuple[str, str, int]:
    """Rebuild the plain and the stoker loop from a README diff; count changed lines.

    Diff 0 is "From a plain loop to a stoker loop", diff 1 "Porting an existing loop".
    """
    diff = _blocks("diff")[index]
    plain, ours, changed = [], [], 0
    run: list[str] = []  # signs of the current run of +/- lines
    for line in [*diff.splitlines(), " "]:
        sign, text = line[:1], line[1:]
        if sign in "+-":
            run.append(sign)
        else:
            # A run of removals and additions is a change of max(#-, #+) lines.
            changed += max(run.count("-"), run.count("+"))
            run = []
        if sign in " -":
            plain.append(text)
        if sign in " +":
            ours.append(text)
    return "\n".join(plain), "\n".join(ours), changed


def test_the_loop_diff_changes_at_most_six_lines():
    _, _, changed = _loop_versions()
    assert 0 < changed <= 6


def test_the_port_of_word_language_model_changes_the_lines_the_readme_counts():
    _, _, changed = _loop_versions(1)
    assert changed == 13  # the README's text says 13


@pytest.mark.parametrize("version", [0, 1], ids=["plain", "stoker"])
def test_both_versions_of_the_word_language_model_port_run(version):
    code = _loop_versions(1)[version]
    namespace: dict = {}
    exec(compile(code, f"README-port-{version}", "exec"), namespace)
    assert 0 < namespace["val_loss"] < 10
    if version == 1:
        stoker, progress = namespace["stoker"], namespace["progress"]
        assert namespace["epoch"] == 2 and progress["i"] == 0
        assert stoker.step == 2 * len(range(0, len(namespace["train_data"]) - 1, 8))
        stoker.close()


@pytest.mark.parametrize("version", [0, 1], ids=["plain", "stoker"])
def test_both_loops_run(version):
    code = _loop_versions()[version]
    namespace: dict = {}
    exec(compile(code, f"README-loop-{version}", "exec"), namespace)
    assert namespace["loss"].isfinite()


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_examples_run(index):
    code = _blocks("python")[index]
    exec(compile(code, f"README-python-{index}", "exec"), {})


def test_error_examples_print_what_the_readme_says(tmp_path):
    (console,) = [b for b in _blocks("") if b.startswith("$ ")]
    (tmp_path / "train.py").write_text("")
    lines = console.splitlines()
    commands = [i for i, line in enumerate(lines) if line.startswith("$ ")]
    for start, end in zip(commands, [*commands[1:], len(lines)], strict=True):
        command = lines[start][2:]
        expected = "\n".join(lines[start + 1 : end])
        done = subprocess.run(
            command, shell=True, capture_output=True, text=True, cwd=tmp_path, timeout=60
        )
        assert done.returncode != 0
        assert done.stderr.strip() == expected.strip(), command


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    first, second = _fenced()[:2]
    assert first[0] == second[0] == "sh"
    assert "examples/train_mlm.py" in first[1]
    # Nothing but the title stands before the two commands.
    assert README.split("```sh")[0].strip() == "# stoker"
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    assert second[1].strip() in ci.splitlines()
