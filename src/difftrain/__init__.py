"""difftrain: reproducible fine-tuning of text-to-image diffusion pipelines from a YAML config.

Importing the package is cheap on purpose (no torch): `difftrain --help` must answer fast.
"""

import time as _time

__version__ = "0.1.0"

IMPORTED_AT = _time.perf_counter()
"""When this process first imported difftrain: where a run's start-up time is counted from
(`timings.json`), so the seconds spent importing torch and diffusers count as start-up."""
