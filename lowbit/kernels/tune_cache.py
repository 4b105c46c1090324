"""The tuner's choices on disk, per GPU model and kernel source: a restarted process (a server, a
benchmark) takes the configs an earlier one timed instead of timing every candidate again, which
makes start-up faster and the choice the same from run to run (two processes timing the same
candidates could pick differently: benchmarks/README.md saw 2303 against 2437 us steps).

One JSON file per (GPU name, torch, Triton, hash of lowbit/kernels' sources) in
$LOWBIT_TUNE_CACHE (default ~/.cache/lowbit/tune; `LOWBIT_TUNE_CACHE=0` turns it off): a change of
any kernel file starts a new one. Entries map repr(key) -> repr(config); a stored config is used
only while it is still among the key's candidates, so a changed candidate list retunes by itself.
Writes go through a temporary file and a rename: a reader never sees half a file, and of two
processes writing at once the later wins (what is lost is only retuned).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_KERNELS = Path(__file__).resolve().parent


def cache_dir() -> Path | None:
    value = os.environ.get("LOWBIT_TUNE_CACHE")
    if value == "0":
        return None
    return Path(value) if value else Path.home() / ".cache" / "lowbit" / "tune"


@functools.lru_cache(maxsize=None)
def sources_hash() -> str:
    """Of every kernel source (Python and CUDA): a changed kernel invalidates what was timed."""
    h = hashlib.sha256()
    for path in sorted([*_KERNELS.glob("*.py"), *_KERNELS.glob("csrc/*")]):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def cache_file(device_name: str, versions: str) -> Path | None:
    root = cache_dir()
    if root is None:
        return None
    tag = "".join(c if c.isalnum() or c in "-." else "_" for c in f"{device_name}-{versions}")
    return root / f"{tag}-{sources_hash()}.json"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # a broken cache is retuned, never fatal
        log.warning("tuner cache %s unreadable (%s): ignored", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def lookup(path: Path | None, key, candidates) -> object | None:
    """The stored choice for `key` if it is one of `candidates`, else None."""
    if path is None:
        return None
    stored = _read(path).get(repr(key))
    return next((c for c in candidates if repr(c) == stored), None)


def store(path: Path | None, key, config) -> None:
    """Adds key -> config to the file (atomically replaced); an unwritable place only logs."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read(path)
        data[repr(key)] = repr(config)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=0, sort_keys=True)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        log.warning("tuner cache %s not written (%s)", path, e)


@functools.lru_cache(maxsize=None)
def versions() -> str:
    """torch and Triton versions (Triton's without importing it)."""
    import importlib.metadata

    import torch

    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = "none"
    return f"torch{torch.__version__}-triton{triton}"
