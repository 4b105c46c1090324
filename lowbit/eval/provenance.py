"""What an evaluation result carries besides its numbers: the command that made it, the sha256 of
every data file read, and the versions of what ran, so a number can be traced and reproduced."""
from __future__ import annotations

import platform
import shlex
import sys
import time
from pathlib import Path


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    try:
        ours = version("lowbit")
    except PackageNotFoundError:  # run from a source tree that was never installed
        ours = "unknown"
    out = {"lowbit": ours, "torch": torch.__version__, "python": platform.python_version()}
    for name in ("tokenizers", "safetensors", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def provenance(files: dict[str, str] | list[str | Path], device: str | None = None) -> dict:
    """files: path -> sha256 already computed, or paths to hash."""
    from lowbit.eval.task_data import sha256_file

    if not isinstance(files, dict):
        files = {str(p): sha256_file(Path(p)) for p in files}
    return {"command": "lowbit " + shlex.join(sys.argv[1:]), "data_sha256": files, "versions": versions(),
            "device": device, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
