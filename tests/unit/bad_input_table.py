"""The bad-input table's machinery: a case is a command line that must be refused.

Every case runs in a private workspace (a copy of the dummy data, config files, folders it
makes) and must end with exit 2 and one line on stderr naming the problem, no traceback, and
nothing that was on disk before changed or removed: the test hashes every file of the
workspace and of the model folder before and after.

The cases themselves live in `bad_inputs_*.py` beside this file, one module per area, each a
dict `CASES` of name -> builder(workspace) -> Case; `test_bad_input.py` runs them all.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass
class Case:
    argv: list[str]
    """The difftrain command line (without `difftrain`)."""
    expected: str
    """Text the one error line must contain."""
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    """Simulate what a test cannot make real (a full disk), in this process."""
    env: dict[str, str] | None = None
    """Run `python -m difftrain` in a child process with these variables added (for settings
    read at import time, such as HF_HUB_OFFLINE); None runs in this process."""
    may_create: tuple[str, ...] = ()
    """Workspace paths (relative) under which new files may appear: cases found only once the
    model is loaded have written config.yaml and env.json into their new output folder."""
    exit_code: int = 2
    cwd: Path | None = None
    """Run from this folder (a child process, or chdir here for an in-process run)."""


@dataclass
class Workspace:
    root: Path
    data: Path
    """A private copy of the eight dummy images (ImageFolder layout)."""
    model: Path
    """The built-in tiny pipeline folder (shared: cases must not change it)."""
    watched: list[Path] = field(default_factory=list)
    """Folders outside `root` whose files must not change either."""

    def config(self, name: str, text: str) -> str:
        path = self.root / f"{name}.yaml"
        path.write_text(text, encoding="utf-8")
        return str(path)

    def data_config(self, name: str, extra: str = "", data_dir: Path | None = None) -> str:
        """A config that trains the tiny model on `data_dir` (default: the dummy data)."""
        folder = data_dir or self.data
        return self.config(name, f"data: {{train_dir: '{folder}', resolution: 64}}\n" + extra)

    def folder(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def out(self) -> list[str]:
        """`--output-dir` pointing at a new folder of the workspace."""
        return ["--output-dir", str(self.root / "out")]


def make_workspace(root: Path, dummy_data_dir: Path, model_dir: Path) -> Workspace:
    data = root / "data"
    shutil.copytree(dummy_data_dir, data)
    return Workspace(root=root, data=data, model=model_dir, watched=[model_dir])


def snapshot(*folders: Path) -> dict[Path, str]:
    """sha256 of every file under `folders` (symlinks by their target text)."""
    hashes = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_symlink():
                hashes[path] = "link:" + os.readlink(path)
            elif path.is_file():
                hashes[path] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def run_case(case: Case, monkeypatch: pytest.MonkeyPatch, capsys) -> tuple[int, str]:
    """Run the case's command; returns (exit code, stderr)."""
    if case.env is not None:
        env = {**os.environ, **case.env}
        result = subprocess.run(
            [sys.executable, "-m", "difftrain", *case.argv],
            capture_output=True,
            text=True,
            env=env,
            cwd=case.cwd,
            timeout=300,
        )
        return result.returncode, result.stderr
    from difftrain.cli import main

    if case.patch is not None:
        case.patch(monkeypatch)
    if case.cwd is not None:
        monkeypatch.chdir(case.cwd)
    code = main(list(case.argv))
    return code, capsys.readouterr().err
