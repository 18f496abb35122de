"""``stoker runs diff A B``: what differs between two runs' config, code and packages.

Configs (and stoker settings, seeds, versions) are flattened to dotted keys
(``{"optim": {"lr": 0.1}}`` -> ``optim.lr``) and compared key by key. Code is compared as git
trees: each run's revision with its ``code.patch`` applied is written as a tree object (no ref,
index or file of the repository changes) and ``git diff TREE_A TREE_B`` shows the changed
lines. Without the repository, the two patches are compared as text.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stoker import safe_files
from stoker.errors import StokerError
from stoker.records import git as _git
from stoker.records.record import PATCH, read_record

__all__ = ["Change", "RunDiff", "diff_runs", "flatten"]

_MISSING = "<absent>"


@dataclass(frozen=True, slots=True)
class Change:
    key: str
    a: Any
    b: Any


@dataclass(slots=True)
class RunDiff:
    a: str
    b: str
    sections: dict[str, list[Change]] = field(default_factory=dict)
    """"config", "settings", "seeds", "command", "versions", "packages", "host" -> changes."""
    code: str = ""
    """A unified diff of the two runs' code (empty: identical)."""
    code_note: str = ""
    """How the code was compared, or why it could not be."""

    @property
    def identical(self) -> bool:
        return not self.code and not any(self.sections.values())


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": 1, "c": [1, 2]}`` (lists stay values)."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        if not obj and prefix:
            out[prefix] = {}
        return out
    return {prefix or "(value)": obj}


def _compare(a: Any, b: Any) -> list[Change]:
    fa, fb = flatten(a or {}), flatten(b or {})
    changes = []
    for key in sorted(set(fa) | set(fb)):
        va, vb = fa.get(key, _MISSING), fb.get(key, _MISSING)
        if va != vb:
            changes.append(Change(key, va, vb))
    return changes


def _read_patch(run_dir: Path, record: dict[str, Any]) -> str:
    name = (record.get("git") or {}).get("patch")
    if not name:
        return ""
    try:
        with safe_files.open_regular(run_dir / PATCH, limit=None) as f:
            return f.read().decode("utf-8", errors="surrogateescape")
    except (OSError, StokerError):  # absent, or not a file the run wrote
        return ""


def _code_diff(
    dir_a: Path, rec_a: dict[str, Any], dir_b: Path, rec_b: dict[str, Any]
) -> tuple[str, str]:
    ga, gb = rec_a.get("git"), rec_b.get("git")
    if not ga or not gb:
        return "", "no git information in one of the runs; code not compared"
    patch_a, patch_b = _read_patch(dir_a, rec_a), _read_patch(dir_b, rec_b)
    repo = Path(ga.get("repo") or "")  # a record without a repository: compared as text
    if ga.get("repo") and ga.get("repo") == gb.get("repo") and repo.is_dir():
        try:
            tree_a = _git.code_tree(repo, ga.get("revision"), patch_a)
            tree_b = _git.code_tree(repo, gb.get("revision"), patch_b)
            text = _git.git(repo, "diff", "--no-color", "--no-ext-diff", tree_a, tree_b)
            return text, f"git diff of the code trees in {repo}"
        except _git.GitError as exc:
            note = f"git could not rebuild the code trees ({exc}); compared the patches as text"
    else:
        note = "repository not available; compared the revisions and patches as text"
    lines = []
    if ga.get("revision") != gb.get("revision"):
        lines.append(f"revision: {ga.get('revision')} -> {gb.get('revision')}\n")
    lines += difflib.unified_diff(
        patch_a.splitlines(keepends=True),
        patch_b.splitlines(keepends=True),
        fromfile=f"{dir_a.name}/{PATCH}",
        tofile=f"{dir_b.name}/{PATCH}",
    )
    return "".join(lines), note


def diff_runs(dir_a: Path, dir_b: Path) -> RunDiff:
    """Compare two run directories."""
    rec_a, rec_b = read_record(dir_a), read_record(dir_b)
    result = RunDiff(a=str(rec_a.get("id", dir_a.name)), b=str(rec_b.get("id", dir_b.name)))
    for section in ("config", "settings", "seeds", "versions", "packages"):
        result.sections[section] = _compare(rec_a.get(section), rec_b.get(section))
    cmd_a = {k: (rec_a.get("command") or {}).get(k) for k in ("script", "script_args")}
    cmd_b = {k: (rec_b.get("command") or {}).get(k) for k in ("script", "script_args")}
    result.sections["command"] = _compare(cmd_a, cmd_b)
    host_keys = ("hostname", "cpu", "gpus")
    host_a = {k: (rec_a.get("host") or {}).get(k) for k in host_keys}
    host_b = {k: (rec_b.get("host") or {}).get(k) for k in host_keys}
    result.sections["host"] = _compare(
        {**host_a, "world_size": rec_a.get("world_size")},
        {**host_b, "world_size": rec_b.get("world_size")},
    )
    result.code, result.code_note = _code_diff(dir_a, rec_a, dir_b, rec_b)
    return result
