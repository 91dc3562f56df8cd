"""Write a small captioned image folder (runbook debug path, step 1).

    python ./difftrain/scripts/make_dummy_imagefolder.py --output-dir ./data/smoke_text2image --num-images 4 --image-size 64

A thin wrapper over `difftrain make-dummy-data`: same flags, same code, same exit codes.
"""

import sys

from difftrain.cli import run

if __name__ == "__main__":
    run(["make-dummy-data", *sys.argv[1:]])
