"""`difftrain cache build | info | clear`: the latent and text-embedding cache from the shell.

    difftrain cache build --config CONFIG.yaml [--set k=v ...]
    difftrain cache info [--config CONFIG.yaml | --cache-dir DIR]
    difftrain cache clear [--config CONFIG.yaml | --cache-dir DIR]

`build` fills what a run of the config will read (every image in each orientation it can
draw, every caption, and the empty one when captions drop out), encoding with the models
placed as training places them, so the run then computes nothing. Under a launcher
(`torchrun`, `accelerate launch`) each process builds its share (RANK / WORLD_SIZE).
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

from difftrain.errors import UserError


def cache_root(args: argparse.Namespace) -> Path:
    from difftrain.data.cache import default_cache_dir

    if getattr(args, "cache_dir", None):
        return Path(args.cache_dir).expanduser()
    if getattr(args, "config", None):
        from difftrain.config import resolve_run_config

        cfg = resolve_run_config(args.config, args.set)
        if cfg.data.cache_dir:
            return Path(cfg.data.cache_dir).expanduser()
    return default_cache_dir()


def cmd_cache(args: argparse.Namespace) -> int:
    from difftrain.data.cache import TensorCache

    if args.action == "build":
        build(args)
        return 0
    cache = TensorCache(cache_root(args))
    if args.action == "info":
        info = cache.info()
        print(f"cache {cache.root}")
        for kind, facts in sorted(info.items()):
            print(f"  {kind}: {facts['entries']} entries, {facts['bytes'] / 2**20:.1f} MiB")
        if not info:
            print("  (empty)")
    else:
        print(f"removed {cache.clear()} entries from {cache.root}")
    return 0


def build(args: argparse.Namespace) -> None:
    import torch

    from difftrain.config import resolve_run_config
    from difftrain.data.dataset import CaptionedImageDataset
    from difftrain.data.sources import scan_sources
    from difftrain.models.loading import load_components, model_family
    from difftrain.training.cached_inputs import build_input_cache
    from difftrain.training.model_setup import DTYPES, freeze_for_encoding

    if not args.config:
        raise UserError("cache build: --config is required (the run whose inputs to cache)")
    cfg = resolve_run_config(args.config, args.set)
    if not (cfg.data.cache_latents or cfg.data.cache_text_embeddings):
        raise UserError(
            f"cache build: {args.config} caches nothing; set data.cache_latents and/or "
            "data.cache_text_embeddings: true"
        )
    examples = scan_sources(cfg.data)
    family = model_family(cfg.model, cfg.train)
    family.check_config(cfg)
    components = load_components(cfg.model, family)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    components.device = device
    freeze_for_encoding(
        components, cfg, device, DTYPES.get(cfg.train.mixed_precision, torch.float32)
    )
    cached = build_input_cache(cfg, components)
    tokenize = partial(family.tokenize, components.tokenizers())
    buckets = None
    if cfg.data.buckets:  # the shapes the run will crop to
        from difftrain.data.buckets import bucket_examples

        block = cfg.train.batch_size * int(os.environ.get("WORLD_SIZE", 1))
        paths = [example.image_path for example in examples]
        buckets = bucket_examples(paths, cfg.data, family.size_step, block)
    dataset = CaptionedImageDataset(examples, tokenize, cfg.data, cached.latent_keys, buckets)
    cached.dataset = dataset
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    mine = list(range(rank, len(examples), world))
    batch = cfg.train.batch_size
    with torch.no_grad(), _progress(len(mine), "caching") as bar:
        for start in range(0, len(mine), batch):
            chunk = mine[start : start + batch]
            if cached.latents:
                _build_latents(cached, dataset, chunk)
            if cached.text:
                captions = [examples[i].caption for i in chunk]
                if cfg.data.caption_dropout and start == 0 and rank == 0:
                    captions.append("")
                ids = [tokenize(caption) for caption in captions]
                cached.conditioning({k: torch.stack([i[k] for i in ids]) for k in ids[0]})
            bar.update(len(chunk))
    print(f"{cached.summary()}; {len(mine)} of {len(examples)} images on this process")


def _build_latents(cached, dataset, chunk: list[int]) -> None:
    import torch

    todo = []
    for index in chunk:
        for box in dataset.centre_boxes(index):
            key = cached.latent_keys.key(dataset.examples[index].image_path, box)
            if cached.cache.get("latent", key) is None:
                todo.append((index, box, key))
    cached.counts["latent"][0] += sum(len(dataset.centre_boxes(i)) for i in chunk) - len(todo)
    if not todo:
        return
    device = cached.components.device
    pixels = torch.stack([dataset.pixels_in_box(i, box) for i, box, _ in todo]).to(device)
    cached.store_latents([key for _, _, key in todo], pixels)
    cached.counts["latent"][1] += len(todo)


class _progress:
    """A tqdm bar on a terminal; nothing otherwise (logs stay clean)."""

    def __init__(self, total: int, desc: str):
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="image")

    def __enter__(self):
        return self

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
