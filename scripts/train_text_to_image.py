"""Run a training from a config (runbook debug path, step 3).

    python ./difftrain/scripts/train_text_to_image.py --config ./difftrain/configs/smoke_text2image.yaml --output-dir ./difftrain/_tmp_run

A thin wrapper over `difftrain train`: same flags, same code, same exit codes.
"""

import sys

from difftrain.cli import run

if __name__ == "__main__":
    run(["train", *sys.argv[1:]])
