"""Write a whole output directory or nothing: build it in a hidden sibling, rename at the end."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from lowbit.errors import LowbitError


def check_output_dir(out: str | Path, overwrite: bool = False, what: str = "path") -> None:
    """LowbitError if `out` is taken (a file, or a non-empty directory) and not to be overwritten:
    callers check before their work, atomic_output_dir checks again before writing. `what` names
    the option the user should change (e.g. --work-dir)."""
    out = Path(out)
    if out.exists() and not overwrite:
        if not out.is_dir() or any(out.iterdir()):
            raise LowbitError(f"{out}: already exists; choose a new {what} or pass --overwrite")


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    # same parent, so the final rename stays on one filesystem and is atomic
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        _publishable(tmp)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise LowbitError(f"{out}: disk full while writing; nothing was left behind") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publishable(tmp: Path) -> None:
    """mkdtemp makes a 0700 directory; give the result the modes a plain mkdir/open would."""
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    for p in tmp.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
