"""The latent cache's store (`data.cache`): exact round trips, keys that change with any input,
broken entries recomputed instead of trained on, safe concurrent writes, and a `clear` that
touches nothing but its own files."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from difftrain.data import cache
from difftrain.data.cache import TensorCache, entry_key, file_hash, weights_hash
from difftrain.io import OLD_SUFFIX, TEMP_SUFFIX

KEY = entry_key("latents", image="0" * 64, resolution=64)


@pytest.fixture
def store(tmp_path: Path) -> TensorCache:
    return TensorCache(tmp_path / "cache")


def sample_tensors(seed: int = 0, size: int = 8) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(4, size, size, generator=generator),
        "pooled": torch.randn(2, 16, generator=generator).to(torch.bfloat16),
        "ids": torch.randint(0, 2**40, (77,), generator=generator),
        "nan": torch.tensor(float("nan")),  # 0-d, and only a bitwise compare calls it equal
        "strided": torch.randn(6, 4, generator=generator).t(),  # not contiguous
    }


def bits(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same(got: dict[str, torch.Tensor] | None, want: dict[str, torch.Tensor]) -> None:
    assert got is not None
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert bits(got[name]) == bits(tensor), name


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith((TEMP_SUFFIX, OLD_SUFFIX))]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "difftrain" and r.levelno >= logging.WARNING]


def test_round_trip_is_bit_exact(store: TensorCache) -> None:
    tensors = sample_tensors()
    assert store.get("latents", KEY) is None
    store.put("latents", KEY, tensors)
    got = store.get("latents", KEY)
    assert_same(got, tensors)
    assert {t.dtype for t in got.values()} >= {torch.float32, torch.bfloat16, torch.int64}
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in got.values())
    assert store.path_for("latents", KEY) == store.root / "latents" / KEY[:2] / f"{KEY}.safetensors"


def test_default_cache_dir_follows_difftrain_cache(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DIFFTRAIN_CACHE", str(tmp_path))
    assert cache.default_cache_dir() == tmp_path / "latents"
    monkeypatch.delenv("DIFFTRAIN_CACHE")
    assert cache.default_cache_dir() == Path.home() / ".cache" / "difftrain" / "latents"


@pytest.mark.parametrize("kind, key", [("../up", KEY), ("latents", "../" + KEY[3:]), ("a/b", KEY),
                                       ("latents", KEY.upper()), ("", KEY)])  # fmt: skip
def test_paths_cannot_leave_the_root(store: TensorCache, kind: str, key: str) -> None:
    with pytest.raises(ValueError):
        store.path_for(kind, key)


def test_entry_key_changes_with_every_part(monkeypatch) -> None:
    parts = {"image": "ab" * 32, "size": [64, 64], "crop": {"top": 0, "flip": False}, "eps": 0.1}
    base = entry_key("latents", **parts)
    variants = [
        entry_key("text", **parts),
        entry_key("latents", **{**parts, "image": "cd" * 32}),
        entry_key("latents", **{**parts, "size": [64, 32]}),
        entry_key("latents", **{**parts, "crop": {"top": 0, "flip": True}}),
        entry_key("latents", **{**parts, "eps": math.nextafter(0.1, 1.0)}),  # one ulp
        entry_key("latents", **{**parts, "extra": None}),
    ]
    assert len({base, *variants}) == len(variants) + 1
    # Order matters in lists, not in dicts; a tuple is its list; 1, 1.0 and True are three.
    assert entry_key("k", v=[1, 2]) != entry_key("k", v=[2, 1])
    assert entry_key("k", v=[1, 2]) == entry_key("k", v=(1, 2))
    assert entry_key("k", v={"a": 1, "b": 2}) == entry_key("k", v={"b": 2, "a": 1})
    assert len({entry_key("k", v=1), entry_key("k", v=1.0), entry_key("k", v=True)}) == 3
    monkeypatch.setattr(cache, "CACHE_FORMAT_VERSION", cache.CACHE_FORMAT_VERSION + 1)
    assert entry_key("latents", **parts) != base


def test_entry_key_is_the_same_in_another_process() -> None:
    code = (
        "from difftrain.data.cache import entry_key\n"
        "print(entry_key('latents', image='ab' * 32, size=(64, 64), eps=0.1, "
        "crop={'top': 3, 'flip': True}, prompt='a cat \\u00e9'))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    here = entry_key("latents", crop={"flip": True, "top": 3}, prompt="a cat \u00e9", eps=0.1,
                     size=[64, 64], image="ab" * 32)  # fmt: skip
    assert out.stdout.strip() == here
    assert entry_key("latents", image="x") == entry_key("latents", image="x")


@pytest.mark.parametrize("value", [{1, 2}, b"bytes", Path("x"), torch.tensor(1.0), object(),
                                   {1: "int key"}, [1, {"a": {2.0}}]])  # fmt: skip
def test_entry_key_refuses_what_json_cannot_hold_exactly(value: object) -> None:
    with pytest.raises(TypeError):
        entry_key("latents", value=value)


def test_entry_key_refuses_a_version_part() -> None:
    with pytest.raises(TypeError):
        entry_key("latents", version=7)


def write_bmp(path: Path, red: int) -> None:
    from PIL import Image

    Image.new("RGB", (8, 8), (red, 10, 20)).save(path, format="BMP")  # uncompressed: fixed size


def test_file_hash_follows_the_pixels_not_the_name_or_mtime(tmp_path: Path) -> None:
    image = tmp_path / "cat.bmp"
    write_bmp(image, 200)
    before = image.stat()
    first = file_hash(image)
    assert first == hashlib.sha256(image.read_bytes()).hexdigest()
    write_bmp(image, 201)  # in place: same name, same inode, same size ...
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))  # ... and the old mtime
    after = image.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size, before.st_mtime_ns, before.st_ino)  # fmt: skip
    assert file_hash(image) != first
    twin = tmp_path / "other name.bmp"
    twin.write_bytes(image.read_bytes())
    assert file_hash(twin) == file_hash(image)


def test_file_hash_reads_a_settled_file_once(tmp_path: Path, monkeypatch) -> None:
    reads: list[Path] = []
    real = cache.sha256_file
    monkeypatch.setattr(cache, "sha256_file", lambda path: reads.append(path) or real(path))
    image = tmp_path / "dog.bmp"
    write_bmp(image, 1)
    file_hash(image), file_hash(image)
    assert len(reads) == 2  # just written: within the racy window, never memoised
    monkeypatch.setattr(cache, "RACY_WINDOW_NS", -(10**18))  # as if written long ago
    reads.clear()
    first = file_hash(image)
    assert file_hash(tmp_path / "." / "dog.bmp") == first and len(reads) == 1
    image.write_bytes(image.read_bytes() + b"\0")
    assert file_hash(image) != first and len(reads) == 2


def tiny_module(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))


def test_weights_hash_follows_the_weights() -> None:
    one, two = tiny_module(0), tiny_module(0)
    assert weights_hash(one) == weights_hash(two)
    assert weights_hash(tiny_module(1)) != weights_hash(one)
    with torch.no_grad():
        two[0].weight[2, 3] += 1e-6
    assert weights_hash(two) != weights_hash(one)
    with torch.no_grad():
        two[0].weight[2, 3] -= 1e-6
        two[1].running_mean[0] = 0.5  # a buffer is part of what the module computes
    assert weights_hash(two) != weights_hash(one)
    assert weights_hash(tiny_module(0).to(torch.bfloat16)) != weights_hash(one)


def corrupt_flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # the last tensor's data: the structure stays valid
    path.write_bytes(bytes(data))


def corrupt_truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def corrupt_garbage(path: Path) -> None:
    path.write_bytes(b"not a safetensors file at all " * 20)


def corrupt_empty(path: Path) -> None:
    path.write_bytes(b"")


def rewrite(path: Path, tensors: dict[str, torch.Tensor], **changes: str) -> None:
    """The file rewritten with other tensors and its old metadata (with `changes`)."""
    from safetensors.torch import save_file

    data = path.read_bytes()
    metadata = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    save_file(tensors, str(path), metadata={**metadata, **changes})


def forge_values(path: Path) -> None:
    tensors = {name: t.contiguous() for name, t in sample_tensors(seed=1).items()}
    rewrite(path, tensors)  # valid safetensors, old (now wrong) checksum


def forge_version(path: Path) -> None:
    from safetensors.torch import load

    rewrite(path, load(path.read_bytes()), format=str(cache.CACHE_FORMAT_VERSION + 1))


def forge_key(path: Path) -> None:
    from safetensors.torch import load

    rewrite(path, load(path.read_bytes()), key="f" * 64)  # another key's entry, copied here


@pytest.mark.parametrize("damage", [corrupt_flip, corrupt_truncate, corrupt_garbage, corrupt_empty,
                                    forge_values, forge_version, forge_key])  # fmt: skip
def test_a_broken_entry_is_removed_and_recomputed(store: TensorCache, caplog, damage) -> None:
    caplog.set_level(logging.WARNING, logger="difftrain")
    tensors = sample_tensors()
    store.put("latents", KEY, tensors)
    path = store.path_for("latents", KEY)
    damage(path)
    assert store.get("latents", KEY) is None
    (warning,) = warnings_of(caplog)
    assert str(path) in warning.getMessage()
    assert not path.exists() and not leftovers(store.root)
    assert store.get("latents", KEY) is None and len(warnings_of(caplog)) == 1  # absent: quiet
    store.put("latents", KEY, tensors)
    assert_same(store.get("latents", KEY), tensors)


def put_repeatedly(root: str, key: str, seed: int, rounds: int, barrier) -> None:
    """One of two processes writing (and reading back) the same entry at the same time."""
    problems: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            problems.append(record.getMessage())

    logging.getLogger("difftrain").addHandler(Collect(logging.WARNING))
    store = TensorCache(Path(root))
    mine = sample_tensors(seed, size=128)  # ~300 kB a write, so that writes overlap
    barrier.wait()
    for _ in range(rounds):
        store.put("latents", key, mine)
        if store.get("latents", key) is None:
            problems.append("no valid entry right after a put")
    if problems:
        raise SystemExit(f"process {seed}: {problems[:3]}")


def test_concurrent_puts_of_one_key_leave_one_valid_entry(store: TensorCache) -> None:
    context = multiprocessing.get_context("spawn")  # no fork of a process running torch
    barrier = context.Barrier(2)
    workers = [
        context.Process(target=put_repeatedly, args=(str(store.root), KEY, seed, 40, barrier))
        for seed in (1, 2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=240)
    assert [worker.exitcode for worker in workers] == [0, 0]
    got = store.get("latents", KEY)
    assert got is not None
    assert any(
        bits(got["latents"]) == bits(sample_tensors(seed, 128)["latents"]) for seed in (1, 2)
    )
    assert list(store.root.rglob("*.safetensors")) == [store.path_for("latents", KEY)]
    assert not leftovers(store.root)


def fail_with(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
@pytest.mark.parametrize("where", ["os.replace", "os.fsync", "tempfile.mkstemp"])
def test_a_full_disk_costs_a_warning_not_the_run(store, caplog, monkeypatch, where, code) -> None:
    caplog.set_level(logging.DEBUG, logger="difftrain")
    module, name = where.split(".")
    monkeypatch.setattr(sys.modules[module], name, fail_with(code))
    store.put("latents", KEY, sample_tensors())
    store.put("latents", entry_key("latents", n=2), sample_tensors())  # once is enough
    monkeypatch.undo()
    (warning,) = warnings_of(caplog)
    assert os.strerror(code) in warning.getMessage()
    assert not leftovers(store.root) and not list(store.root.rglob("*.safetensors"))
    assert store.get("latents", KEY) is None
    store.put("latents", KEY, sample_tensors())  # space again: cached again
    assert_same(store.get("latents", KEY), sample_tensors())


def test_other_write_errors_are_raised_without_leaving_a_temp_file(store, monkeypatch) -> None:
    monkeypatch.setattr(os, "replace", fail_with(errno.EACCES))
    with pytest.raises(PermissionError):
        store.put("latents", KEY, sample_tensors())
    monkeypatch.undo()
    assert not leftovers(store.root)


def test_info_and_clear_touch_only_cache_entries(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    store = TensorCache(root)
    keys = [entry_key("latents", n=n) for n in range(3)]
    for key in keys:
        store.put("latents", key, sample_tensors())
    text_key = entry_key("prompt_embeds", prompt="a cat")
    store.put("prompt_embeds", text_key, {"embeds": torch.ones(77, 32)})
    # The user's own files, and what a killed writer left behind.
    (root / "notes.txt").write_text("mine")
    (root / "latents" / "readme").write_text("mine too")
    shard = store.path_for("latents", keys[0]).parent
    (shard / "mine.tmp").write_text("mine")
    stale = shard / f".{keys[0]}.safetensors.x1y2z3{TEMP_SUFFIX}"
    stale.write_bytes(b"half an entry")
    # Entries outside the root, reached by symlinks from inside it.
    outside = TensorCache(tmp_path / "outside")
    outside_key = entry_key("latents", n="outside")
    outside.put("latents", outside_key, sample_tensors())
    outside_file = outside.path_for("latents", outside_key)
    (root / "linked").symlink_to(outside.root / "latents", target_is_directory=True)
    (root / "latents" / outside_key[:2]).symlink_to(outside_file.parent, target_is_directory=True)
    real_shard = root / "other" / outside_key[:2]
    real_shard.mkdir(parents=True)
    (real_shard / outside_file.name).symlink_to(outside_file)

    sizes = [store.path_for("latents", key).stat().st_size for key in keys]
    text_size = store.path_for("prompt_embeds", text_key).stat().st_size
    assert store.info() == {
        "latents": {"entries": 3, "bytes": sum(sizes)},
        "prompt_embeds": {"entries": 1, "bytes": text_size},
    }
    assert store.clear() == 4
    assert store.info() == {}
    assert not any(store.path_for("latents", key).exists() for key in keys)
    assert not stale.exists() and not (root / "prompt_embeds").exists()  # emptied: removed
    for kept in [root / "notes.txt", root / "latents" / "readme", shard / "mine.tmp"]:
        assert kept.is_file(), kept
    assert_same(outside.get("latents", outside_key), sample_tensors())
    assert (real_shard / outside_file.name).is_symlink()
    assert store.clear() == 0 and TensorCache(tmp_path / "absent").clear() == 0
