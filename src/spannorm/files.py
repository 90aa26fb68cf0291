"""File output that survives a kill: everything is written under a temporary name, fsynced, then renamed
into place; run and study directories are locked; JSON is strict (a non-finite float is written as null)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from .config import SpannormError

TEMP = ".*.tmp-*"  # the names of the temporary files and directories below: .<name>.tmp-<random>


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def os_error(e: OSError, what: str, fix: str = "") -> SpannormError:
    """A one-line error for an OS error at a file edge. ``what`` names the file or directory the user knows (a
    temporary name inside it means nothing to them), ``fix`` says what to do. A full disk says so."""
    reason = e.strerror or str(e) or type(e).__name__
    fix = f"; {fix}" if fix else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpannormError(f"cannot write {what}: the disk is full ({reason}){fix}")
    if e.filename is not None and str(e.filename) not in what:
        reason += f": {str(e.filename)!r}"
    return SpannormError(f"cannot use {what}: {reason}{fix}")


def fsync_dir(path: Path) -> None:
    """Make the entries of a directory (new, renamed, removed) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> the permissions of a normally created file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(dest: Path):
    """Yield a temporary directory that becomes ``dest`` (its files fsynced) only if the block succeeds.

    ``dest`` must not exist yet; if another process created it meanwhile, theirs is kept.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 -> the permissions of a normal directory
        yield tmp
        for path in sorted(tmp.rglob("*"), reverse=True):  # files before the directories that hold them
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            else:
                fsync_dir(path)
        fsync_dir(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(dest.parent)


def remove_dir(path: Path) -> None:
    """Delete a directory all at once: renamed to a temporary name first, so that a kill never leaves it
    half deleted (only a temporary directory, which :func:`sweep_temp` removes)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-deleted")
    shutil.rmtree(tmp, ignore_errors=True)
    os.rename(path, tmp)
    shutil.rmtree(tmp)


def sweep_temp(*dirs: Path) -> None:
    """Delete the temporary files and directories that a kill left in ``dirs`` (call it under the lock)."""
    for d in dirs:
        for path in Path(d).glob(TEMP):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


@contextlib.contextmanager
def locked(directory: Path, flag: str):
    """Hold an exclusive lock on ``directory`` (created if needed) for the block: a second spannorm process
    that asks for it gets a one-line error naming ``flag``. The OS releases it when the process dies."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        f = open(directory / ".lock", "a")
    except OSError as e:
        raise SpannormError(
            f"{flag} {str(directory)!r} cannot be used as a directory: {e.strerror or type(e).__name__}"
        ) from None
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SpannormError(
                f"{flag} {str(directory)!r} is in use by another spannorm process: wait for it to "
                f"end or choose another {flag}"
            ) from None
        yield
    finally:
        f.close()


def strict(obj):
    """``obj`` with every non-finite float (NaN, ±Infinity) replaced by None, for strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def dumps(obj, **kwargs) -> str:
    """Strict JSON (what every parser accepts): a non-finite float is written as null."""
    return json.dumps(strict(obj), allow_nan=False, **kwargs)


def read_json(path: Path, fix: str):
    """The JSON in a file the project wrote; a damaged one is a one-line error that says what to do (``fix``)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:  # (UnicodeDecodeError is a ValueError)
        raise SpannormError(f"{str(path)!r} cannot be read as JSON ({type(e).__name__}): {fix}") from None


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file ([] if it does not exist); a last row cut short by a kill is dropped."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:
                break
            raise SpannormError(f"{path} line {i + 1} is not valid JSON") from None
    return rows
