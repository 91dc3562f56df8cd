"""Validate a config and write the resolved config and env snapshot (runbook step 2).

    python ./difftrain/scripts/validate_config.py --config ./difftrain/configs/smoke_text2image.yaml --output-dir ./difftrain/_tmp_run --deterministic

A thin wrapper over `difftrain validate-config`: same flags, same code, same exit codes.
"""

import sys

from difftrain.cli import run

if __name__ == "__main__":
    run(["validate-config", *sys.argv[1:]])
