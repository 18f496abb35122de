import subprocess

import pytest

from stoker.records.git import capture, code_tree, git


def _sh(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def _commit(repo):
    _sh(repo, "add", "-A")
    _sh(repo, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "c")


@pytest.fixture
def repo(tmp_path):
    r = tmp_path / "repo"
    r.mkdir()
    _sh(r, "init", "-q")
    (r / "train.py").write_text("lr = 0.1\nsteps = 10\n")
    (r / ".gitignore").write_text("*.bin\n")
    _commit(r)
    return r


def test_clean_repository(repo):
    state = capture(repo)
    assert state.revision and len(state.revision) == 40
    assert not state.dirty and state.patch == ""


def test_patch_holds_changes_and_small_untracked_files_only(repo):
    (repo / "train.py").write_text("lr = 0.2\nsteps = 10\n")
    (repo / "new_module.py").write_text("x = 1\n")
    (repo / "big.txt").write_text("y" * 5000)
    (repo / "weights.bin").write_bytes(b"ignored")
    (repo / "runs").mkdir()
    (repo / "runs" / "metrics.jsonl").write_text("{}\n")
    status_before = git(repo, "status", "--porcelain")  # (refreshes the index's stat cache)
    index_before = (repo / ".git" / "index").read_bytes()

    state = capture(repo, max_untracked_bytes=1000, exclude=(repo / "runs",))

    assert state.dirty
    assert "-lr = 0.1" in state.patch and "+lr = 0.2" in state.patch
    assert "new file mode" in state.patch and "+x = 1" in state.patch
    assert state.untracked_included == ["new_module.py"]
    assert state.untracked_skipped == ["big.txt"]
    assert "weights.bin" not in state.patch and "runs/" not in state.patch
    # The user's index and working tree are untouched.
    assert (repo / ".git" / "index").read_bytes() == index_before
    assert git(repo, "status", "--porcelain") == status_before

    # revision + patch rebuilds exactly the working tree's content.
    tree = code_tree(repo, state.revision, state.patch)
    assert git(repo, "show", f"{tree}:train.py") == "lr = 0.2\nsteps = 10\n"
    assert git(repo, "show", f"{tree}:new_module.py") == "x = 1\n"


def test_repository_without_commits(tmp_path):
    _sh(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("a = 1\n")
    state = capture(tmp_path)
    assert state.revision is None and state.dirty and "+a = 1" in state.patch


def test_outside_any_repository(tmp_path):
    assert capture(tmp_path) is None
