"""The storage layer of a latent / text-embedding cache that cannot go stale.

An entry's key hashes everything its tensors came from (`entry_key` over the image's bytes, the
encoder's weights, the transform's settings): a changed input finds no entry, never a wrong one.
Each file holds a checksum of its tensors, checked on every read, so a torn or bit-flipped entry is
recomputed, never trained on. Files are safetensors (a shared cache must run no code when read:
no pickle), written atomically, at `<root>/<kind>/<key[:2]>/<key>.safetensors`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch

from difftrain.io import OLD_SUFFIX, TEMP_SUFFIX, sha256_file

logger = logging.getLogger("difftrain")

CACHE_FORMAT_VERSION = 1
"""In every key and every file's metadata: bump it when what an entry means changes (layout,
checksum, how keys are built), and the old entries are simply never found again."""

RACY_WINDOW_NS = 2_000_000_000
"""A file changed this recently is never memoised: times come from a coarse clock, so a rewrite
in the same tick can leave size, mtime and ctime unchanged (git's "racily clean" files)."""
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_KIND = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_KEY = re.compile(r"[0-9a-f]{64}")
_SHARD = re.compile(r"[0-9a-f]{2}")
_ENTRY = re.compile(r"([0-9a-f]{64})\.safetensors")
_LEFTOVER = re.compile(
    rf"\.([0-9a-f]{{64}})\.safetensors\..+(?:{re.escape(TEMP_SUFFIX)}|{re.escape(OLD_SUFFIX)})"
)
_file_hashes: dict[tuple, str] = {}


def default_cache_dir() -> Path:
    """$DIFFTRAIN_CACHE/latents (or ~/.cache/difftrain/latents), beside the built-in models
    (`models.tiny.builtin_cache_dir`, not imported: that would load the model code)."""
    root = os.environ.get("DIFFTRAIN_CACHE") or Path.home() / ".cache" / "difftrain"
    return Path(root) / "latents"


def file_hash(path: Path) -> str:
    """sha256 of the file's bytes (never its name or mtime): a renamed or touched image keeps
    its entries, edited pixels lose them.

    Memoised per process by (resolved path, size, mtime_ns, ctime_ns, inode, device) so a run
    hashes each image once: ctime too, as mtime can be set back (`os.utime`) and ctime cannot.
    """
    resolved = Path(path).resolve()
    signature = _signature(resolved)
    if signature in _file_hashes:
        return _file_hashes[signature]
    started = time.time_ns()
    digest = sha256_file(resolved)
    settled = max(signature[2], signature[3]) < started - RACY_WINDOW_NS
    if settled and _signature(resolved) == signature:
        _file_hashes[signature] = digest
    return digest


def _signature(path: Path) -> tuple:
    stat = path.stat()
    return (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev)


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 over the module's class and state_dict (names, dtypes, shapes, bytes): the same
    weights give the same hash in any process, any changed weight (or dtype) another.

    Settings that are no tensors (a VAE's scaling factor) are not covered: they go in the key's
    parts. A non-tensor state_dict value is refused (TypeError), not hashed by some repr.
    """
    cls = type(module)
    digest = hashlib.sha256(f"{cls.__module__}.{cls.__qualname__}\n".encode())
    state = module.state_dict()
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"weights_hash: state_dict entry {name!r} is not a tensor")
    return _checksum(state, digest)


def _checksum(tensors: dict[str, torch.Tensor], digest: hashlib._Hash | None = None) -> str:
    """Per tensor in name order a JSON line (name, dtype, shape, byte count), then its bytes:
    the lines delimit the bytes, so no two different tensor sets feed the same stream."""
    digest = digest or hashlib.sha256()
    for name in sorted(tensors):
        flat = tensors[name].detach().cpu().contiguous().reshape(-1)
        size = flat.numel() * flat.element_size()
        line = json.dumps([name, str(flat.dtype), list(tensors[name].shape), size])
        digest.update(line.encode() + b"\n")
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def entry_key(kind: str, **parts: object) -> str:
    """sha256 hex of canonical JSON of {"kind", "version", **parts}: sorted keys, no spaces,
    tuples as lists, floats exact (JSON writes `repr`), so equal parts give one key everywhere.

    Anything but JSON scalars, lists and str-keyed dicts is refused (TypeError): the `str()` of
    an object may hide a difference, or put a memory address in the key.
    """
    if "version" in parts:
        raise TypeError("entry_key: 'version' is the cache format's, not a part")
    document = _canonical({"kind": kind, "version": CACHE_FORMAT_VERSION, **parts}, "key")
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _canonical(value: object, where: str) -> object:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_canonical(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(name, str) for name in value):
            raise TypeError(f"entry_key: {where} has a key that is not a string")
        return {name: _canonical(item, f"{where}.{name}") for name, item in value.items()}
    raise TypeError(f"entry_key: {where} is a {type(value).__name__}, not JSON data")


class TensorCache:
    """Entries of tensors under `root`, each one file; see the module docstring."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._disk_full_reported = False

    def path_for(self, kind: str, key: str) -> Path:
        """Where an entry lives; `kind` and `key` are checked, so neither can leave `root`."""
        if not isinstance(kind, str) or not _KIND.fullmatch(kind):
            raise ValueError(f"cache kind {kind!r}: letters, digits, '_' and '-' only")
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ValueError(f"cache key {key!r}: 64 lowercase hex digits (from entry_key)")
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def get(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        """The entry, or None when absent or broken (removed, warned about once, recomputed).

        Read whole into memory, not mmapped (`safe_open`): what is checked is what is returned,
        and a file truncated under the tensors cannot kill the run with SIGBUS.
        """
        path = self.path_for(kind, key)
        try:
            inode = os.stat(path).st_ino
        except FileNotFoundError:
            return None
        try:
            return _read_entry(path, kind, key)
        except FileNotFoundError:
            return None  # discarded or cleared by another process just now
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with the file, it is recomputed
            _discard(path, inode)
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else repr(exc)
            logger.warning(
                "cache entry %s is broken (%s); removed, it will be recomputed", path, reason
            )
            return None

    def put(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Store an entry atomically; a full disk or a cache cleared underneath costs a warning
        and the entry (the caller computes without caching), never the run."""
        from safetensors.torch import save

        path = self.path_for(kind, key)
        # Fresh contiguous CPU copies: safetensors refuses shared memory, and the caller may
        # change its tensors while these are checksummed and written.
        stored = {
            str(name): t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()
        }
        metadata = {"format": str(CACHE_FORMAT_VERSION), "kind": kind, "key": key}
        metadata["checksum"] = _checksum(stored)
        data = save(stored, metadata=metadata)
        try:
            _write_atomically(path, data)
        except OSError as exc:
            if exc.errno not in _DISK_FULL and not isinstance(exc, FileNotFoundError):
                raise
            report = logger.debug if self._disk_full_reported else logger.warning
            self._disk_full_reported = self._disk_full_reported or exc.errno in _DISK_FULL
            report("cache: could not write %s (%s); going on without caching it", path, exc)

    def info(self) -> dict[str, dict[str, int]]:
        """{kind: {"entries": n, "bytes": total}} for the entries under root."""
        summary: dict[str, dict[str, int]] = {}
        for kind, path, is_entry in self._files():
            with contextlib.suppress(FileNotFoundError):  # removed since it was listed
                size = path.lstat().st_size
                if is_entry:
                    counts = summary.setdefault(kind, {"entries": 0, "bytes": 0})
                    counts["entries"] += 1
                    counts["bytes"] += size
        return summary

    def clear(self) -> int:
        """Delete the entries (and leftover temporary files) this cache wrote; returns the number
        of entries. Other files are left alone, and so are folders that still hold any."""
        removed = 0
        shards = set()
        for _kind, path, is_entry in list(self._files()):
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            removed += is_entry
            shards.add(path.parent)
        for folder in sorted(shards) + sorted({shard.parent for shard in shards}):
            with contextlib.suppress(OSError):  # not empty: someone else's file, or a new entry
                folder.rmdir()
        return removed

    def _files(self) -> Iterator[tuple[str, Path, bool]]:
        """(kind, path, is_entry) of each regular file named as our entries and temps are, in
        real folders: a symlink is never followed, so nothing outside root is counted or deleted."""
        for kind in _subfolders(self.root, _KIND):
            for shard in _subfolders(kind, _SHARD):
                with os.scandir(shard) as items:
                    for item in items:
                        entry = _ENTRY.fullmatch(item.name)
                        match = entry or _LEFTOVER.fullmatch(item.name)
                        regular = item.is_file(follow_symlinks=False)
                        if match and regular and match.group(1)[:2] == shard.name:
                            yield kind.name, Path(item.path), entry is not None


def _subfolders(folder: Path, pattern: re.Pattern) -> list[Path]:
    try:
        with os.scandir(folder) as items:
            return [
                Path(item.path)
                for item in items
                if pattern.fullmatch(item.name) and item.is_dir(follow_symlinks=False)
            ]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _read_entry(path: Path, kind: str, key: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    data = path.read_bytes()
    tensors = load(data)  # checks the structure: header, dtypes, offsets covering the file
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    metadata = header.get("__metadata__") or {}
    expected = {"format": str(CACHE_FORMAT_VERSION), "kind": kind, "key": key}
    found = {name: metadata.get(name) for name in expected}
    if found != expected:
        raise ValueError(f"written as {found}, expected {expected}")
    if metadata.get("checksum") != _checksum(tensors):
        raise ValueError("its tensors do not match their checksum")
    return tensors


def _discard(path: Path, inode: int) -> None:
    """Rename a broken entry aside, then delete it: racing readers find the broken file or none.
    Should the rename catch a valid entry written meanwhile (another inode), it is put back."""
    aside = path.with_name(f".{path.name}.{uuid.uuid4().hex}{OLD_SUFFIX}")
    with contextlib.suppress(OSError):  # gone already: another reader discarded it
        os.replace(path, aside)
        if os.stat(aside).st_ino != inode:
            os.replace(aside, path)
            return
        aside.unlink()


def _write_atomically(path: Path, data: bytes) -> None:
    """`io.atomic_write_text` for bytes: with a unique temporary name per writer, concurrent
    writers of one key each put a complete file in place, and the last one stays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a cache may be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
