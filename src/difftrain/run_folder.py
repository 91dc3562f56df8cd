"""What makes a folder a difftrain run folder: the marker training writes into every output
folder it claims. Torch-free, so `difftrain report` can ask too (training/run_dir.py, which
claims folders, imports the training stack)."""

from __future__ import annotations

import json
from pathlib import Path

RUN_MARKER = ".difftrain-run.json"
"""Written into every folder difftrain claims: what makes it a difftrain run folder."""


def records_a_run(folder: Path) -> bool:
    """True for a folder difftrain claimed: its marker, or (difftrain 0.1) a config.yaml
    beside an env.json that names difftrain."""
    if (folder / RUN_MARKER).is_file():
        return True
    try:
        env = json.loads((folder / "env.json").read_text(encoding="utf-8"))
        return (folder / "config.yaml").is_file() and "difftrain" in env.get("packages", {})
    except (OSError, ValueError, AttributeError, TypeError, RecursionError):
        # TypeError: "packages": 5; RecursionError: absurdly nested JSON
        return False
