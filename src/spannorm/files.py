"""File output that survives a kill: everything is written under a temporary name, fsynced, then renamed
into place; run and study directories are locked; JSON is strict (a non-finite float is written as null)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from .config import SpannormError, short

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
    if disk_full(e):
        return SpannormError(f"cannot write {what}: the disk is full ({reason}){fix}")
    if e.filename is not None and str(e.filename) not in what:
        reason += f": {str(e.filename)!r}"
    return SpannormError(f"cannot use {what}: {reason}{fix}")


def disk_full(e: OSError) -> bool:
    """Whether an OS error says that the disk (or the user's quota) is full."""
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def no_links(root: Path, flag: str, opaque: tuple[str, ...] = ("tensorboard", "wandb")) -> None:
    """Refuse a directory (a run's, a study's) that holds a symbolic link anywhere below it: nothing in it is
    followed out of it (a link to another run's checkpoints would be read, and rotated away). ``opaque``: the
    folders of other programs (the trackers'), themselves checked but not what they hold. ``root`` itself may
    be a link (the user named it)."""
    root = Path(root)
    for top, dirs, names in os.walk(root):
        for name in dirs + names:
            path = Path(top) / name
            if path.is_symlink():
                raise SpannormError(
                    f"{flag} {str(root)!r} holds {str(path.relative_to(root))!r}, a symbolic link (to "
                    f"{os.readlink(path)!r}): nothing in it is followed out of it; delete the link or put "
                    "what it points to in its place"
                )
        dirs[:] = [d for d in dirs if d not in opaque]


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


STALE_S = 60.0  # a temporary directory unlocked and untouched this long was left by a process that died


@contextlib.contextmanager
def temp_dir(parent: Path, name: str):
    """A temporary directory ``parent/.<name>.tmp-<random>``, held (flock) while the block runs and deleted after
    it, unless the block moved it away. Those of ``name`` that a killed process left in ``parent`` (no longer
    held, untouched for STALE_S seconds) are deleted first: a kill leaves nothing behind for long."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for old in parent.glob(f".{glob.escape(name)}.tmp-*"):
        with contextlib.suppress(OSError):  # (one that its owner removed meanwhile)
            if old.is_dir() and not old.is_symlink() and time.time() - old.lstat().st_mtime > STALE_S and _unheld(old):
                shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.tmp-"))
    fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # (released by the OS when this process dies)
        yield tmp
    finally:
        os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)


def _unheld(path: Path) -> bool:
    """Whether no process holds the flock of a temporary directory of :func:`temp_dir`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(dest: Path):
    """Yield a temporary directory that becomes ``dest`` (its files fsynced) only if the block succeeds.

    ``dest`` must not exist yet; if another process created it meanwhile, theirs is kept. A temporary
    directory of ``dest`` that a killed process left is deleted (:func:`temp_dir`).
    """
    dest = Path(dest)
    with temp_dir(dest.parent, dest.name) as tmp:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 -> the permissions of a normal directory
        yield tmp
        for path in sorted(tmp.rglob("*"), reverse=True):  # files before the directories that hold them
            if path.is_file():
                os.chmod(path, 0o666 & ~_umask())  # (what a library wrote 0600, safetensors: readable as any file)
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
        # O_NOFOLLOW: a .lock that is a symbolic link is refused, not followed to create a file elsewhere
        fd = os.open(directory / ".lock", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o666)
        f = os.fdopen(fd, "a")
    except OSError as e:
        why = "its .lock is a symbolic link" if e.errno == errno.ELOOP else e.strerror or type(e).__name__
        raise SpannormError(f"{flag} {str(directory)!r} cannot be used as a directory: {why}") from None
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


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read in chunks (a token file may not fit in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def dumps(obj, **kwargs) -> str:
    """Strict JSON (what every parser accepts): a non-finite float is written as null."""
    return json.dumps(strict(obj), allow_nan=False, **kwargs)


def read_json(path: Path, fix: str, check=None):
    """The JSON in a file the project wrote; a damaged one, or one ``check`` (a :func:`shape_problem`-like
    function of the value) finds a problem with, is a one-line error that says what to do (``fix``)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as e:  # (UnicodeDecodeError is a ValueError; deep nesting)
        raise SpannormError(f"{str(path)!r} cannot be read as JSON ({type(e).__name__}): {fix}") from None
    if check is not None and (problem := check(data)) is not None:
        raise SpannormError(f"{str(path)!r} is not the file spannorm writes ({problem}): {fix}")
    return data


def read_jsonl(path: Path, check=None) -> list[dict]:
    """Rows of a JSON-lines file ([] if it does not exist); a last row cut short by a kill is dropped. ``check``:
    a function of a row that returns what is wrong with it (None: nothing), as :func:`shape_problem` does."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [line for line in path.read_bytes().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError):  # (a row cut inside a UTF-8 character: UnicodeDecodeError)
            if i == len(lines) - 1:
                break
            raise SpannormError(f"{path} line {i + 1} is not valid JSON") from None
        if check is not None and (problem := check(row)) is not None:
            raise SpannormError(f"{path} line {i + 1} is not a row spannorm writes: {problem}")
        rows.append(row)
    return rows


KINDS = {  # the kinds of value shape_problem checks: (test, what it is called)
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "numbers": (
        lambda v: isinstance(v, list) and all(v is None or KINDS["number"][0](x) for x in v),
        "a list of numbers",
    ),
}


def shape_problem(obj, fields: dict[str, str], required=()) -> str | None:
    """What makes ``obj`` (JSON read back) other than an object whose ``fields`` ({key: kind}: a kind of
    :data:`KINDS`, with a trailing ? also null) have their kinds and whose ``required`` keys are there; None when
    nothing does. Other keys are let be."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {short(obj)}"
    for key in required:
        if key not in obj:
            return f"it has no {key!r}"
    for key, kind in fields.items():
        if key not in obj or (kind.endswith("?") and obj[key] is None):
            continue
        ok, what = KINDS[kind.rstrip("?")]
        if not ok(obj[key]):
            return f"{key}={short(obj[key])} is not {what}" + (" or null" if kind.endswith("?") else "")
    return None
