"""The code a run used: git revision, branch, and every uncommitted change as a patch.

The patch is ``git diff <revision>`` of the working tree, with untracked files (not ignored,
at most ``max_untracked_bytes`` each) included as new files: they are added *intent-to-add* to
a throw-away copy of the index (``GIT_INDEX_FILE``), so the user's own index and files are
never touched. Applied with ``git apply`` on top of the revision it recreates the working tree
the run saw (``stoker reproduce`` does exactly that in a temporary ``git worktree``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["GitState", "capture", "code_tree", "git"]

# git's well-known empty tree: what a repository without commits is diffed against.
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"


class GitError(RuntimeError):
    pass


def git(
    repo: Path,
    *args: str,
    env: dict[str, str] | None = None,
    check: bool = True,
    input: bytes | None = None,
) -> str:
    """Run ``git -C repo args...``; returns stdout (text). Raises GitError when it fails."""
    full_env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C", **(env or {})}
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), *args],
            capture_output=True,
            env=full_env,
            input=input,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise GitError(f"git {' '.join(args)}: {exc}") from None
    if check and done.returncode != 0:
        raise GitError(f"git {' '.join(args)}: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout.decode("utf-8", errors="surrogateescape")


@dataclass(slots=True)
class GitState:
    repo: str
    revision: str | None
    branch: str | None
    dirty: bool
    patch: str
    untracked_included: list[str] = field(default_factory=list)
    untracked_skipped: list[str] = field(default_factory=list)

    def to_record(self, patch_file: str | None) -> dict[str, Any]:
        return {
            "repo": self.repo,
            "revision": self.revision,
            "branch": self.branch,
            "dirty": self.dirty,
            "patch": patch_file,
            "untracked_included": self.untracked_included,
            "untracked_skipped": self.untracked_skipped,
        }


def find_repo(start: Path) -> Path | None:
    try:
        top = git(start, "rev-parse", "--show-toplevel").strip()
    except GitError:
        return None
    return Path(top) if top else None


def _private_index(repo: Path, tmpdir: str) -> dict[str, str]:
    # A copy of the real index (so stat info makes diffing fast), or none for a fresh repo.
    real = Path(git(repo, "rev-parse", "--path-format=absolute", "--git-path", "index").strip())
    index = Path(tmpdir) / "index"
    if real.is_file():
        shutil.copyfile(real, index)
    return {"GIT_INDEX_FILE": str(index)}


def capture(
    start: Path, *, max_untracked_bytes: int = 1_000_000, exclude: tuple[Path, ...] = ()
) -> GitState | None:
    """The git state of the repository containing ``start``; None if it is not in one.

    Untracked files under ``exclude`` (the runs directory: other runs' logs) are left out.
    """
    repo = find_repo(start)
    if repo is None:
        return None
    try:
        revision: str | None = git(repo, "rev-parse", "--verify", "-q", "HEAD").strip() or None
    except GitError:
        revision = None  # no commit yet
    branch = git(repo, "branch", "--show-current", check=False).strip() or None
    listed = git(repo, "ls-files", "--others", "--exclude-standard", "-z").split("\0")
    included: list[str] = []
    skipped: list[str] = []
    excluded = [e.resolve() for e in exclude]
    for rel in filter(None, listed):
        if any((repo / rel).resolve().is_relative_to(e) for e in excluded):
            continue
        try:
            size = (repo / rel).stat().st_size
        except OSError:
            continue
        (included if size <= max_untracked_bytes else skipped).append(rel)
    with tempfile.TemporaryDirectory(prefix="stoker-git-") as tmp:
        env = _private_index(repo, tmp)
        if included:
            git(repo, "add", "--intent-to-add", "--", *included, env=env)
        patch = git(
            repo,
            "diff",
            "--binary",
            "--no-color",
            "--no-ext-diff",
            "--full-index",
            revision or EMPTY_TREE,
            env=env,
        )
    return GitState(
        repo=str(repo),
        revision=revision,
        branch=branch,
        dirty=bool(patch),
        patch=patch,
        untracked_included=included,
        untracked_skipped=skipped,
    )


def code_tree(repo: Path, revision: str | None, patch: str) -> str:
    """The git tree id of ``revision`` + ``patch`` (writes git objects; refs, index and files
    stay untouched). Two runs' code is then compared with ``git diff TREE_A TREE_B``."""
    with tempfile.TemporaryDirectory(prefix="stoker-git-") as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        git(repo, "read-tree", revision or "--empty", env=env)
        if patch:
            git(
                repo,
                "apply",
                "--cached",
                "--binary",
                "-",
                env=env,
                input=patch.encode("utf-8", "surrogateescape"),
            )
        return git(repo, "write-tree", env=env).strip()
