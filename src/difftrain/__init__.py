"""difftrain: reproducible fine-tuning of text-to-image diffusion pipelines from a YAML config.

Importing the package is cheap on purpose (no torch): `difftrain --help` must answer fast.
"""

__version__ = "0.1.0"
