"""A study's cells as one compressed archive, ``cells.tar.xz`` beside ``cells/``: what a repository commits of a
study, with its report, results.csv, plots and study file (a few MB where the run directories are tens).

    pack(out)    makes out/cells.tar.xz hold the finished cells of out/cells (those with a summary.json): each
                 cell's files but its checkpoints (and other folders), where diagnostics.jsonl keeps only what a
                 study reads of it (ARCHIVED_DIAGNOSTICS), each number to 7 significant digits (the precision of
                 the float32 tensors it comes from); manifest.json names the archive, its cells and hashes.
                 The same cells give the same bytes (sorted, no times, no owners): a study run again that
                 trained nothing leaves both files as they were. A study packs after every run that may train
                 (--report-only: only where there is no archive yet).
    unpack(out)  where out/cells does not exist (a fresh checkout), makes it from the archive, all at once
                 (extracted beside it, then renamed), so that --report-only and a resumed study read the cells
                 as if they had run here. Where out/cells exists, it is the study's data, and the archive is
                 made from it (a cell deleted there is trained again, then archived).

A diagnostics.jsonl row's other fields (branch RMS, attention entropy, update ratios, ...) stay in the run
directories of whoever trained the cell; for the studies committed before the archives, the full rows are in
the repository's history (docs/README.md says where).
"""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import re
import tarfile
from pathlib import Path

from ..config import SpannormError
from ..files import atomic_write_bytes, atomic_write_text, dumps, os_error, read_json, read_jsonl, temp_dir

ARCHIVE = "cells.tar.xz"
MANIFEST = "manifest.json"
ARCHIVED_DIAGNOSTICS = ("step", "grad_norm", "stream_rms")  # what a study reads (the gradient heatmaps, RunDir)
MEMBER = re.compile(r"[\w+=-][\w.+=-]*/[\w+=-][\w.+=-]*")  # <cell>/<file>: no folder, no dot file, no '..'


def kept_digits(value):
    """``value`` with each float to 7 significant digits (lists followed): what the archive keeps of a diagnostic, and
    what the plots read of one, so that a study's plots are the same from its cells and from its archive."""
    if isinstance(value, list):
        return [kept_digits(v) for v in value]
    return float(f"{value:.7g}") if isinstance(value, float) else value


def _kept(path: Path) -> bytes:
    """What the archive keeps of one file of a cell."""
    if path.name != "diagnostics.jsonl":
        return path.read_bytes()
    rows = [{k: kept_digits(row[k]) for k in ARCHIVED_DIAGNOSTICS if k in row} for row in read_jsonl(path)]
    return "".join(dumps(r) + "\n" for r in rows).encode()


def _tar(cells: Path) -> tuple[bytes, int]:
    """The uncompressed archive of the finished cells under ``cells``, and how many there are."""
    buf = io.BytesIO()
    finished = sorted(p for p in cells.iterdir() if (p / "summary.json").is_file()) if cells.is_dir() else []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for cell in finished:
            for path in sorted(cell.iterdir()):
                name = f"{cell.name}/{path.name}"
                if not path.is_file() or path.is_symlink() or not MEMBER.fullmatch(name):
                    continue  # (checkpoints, trackers' folders, .lock)
                data = _kept(path)
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o644  # (mtime 0, no owner: the TarInfo defaults)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), len(finished)


def pack(out: Path) -> bool:
    """Make ``out``'s archive hold its finished cells; False if it already did (nothing written)."""
    out = Path(out)
    data, n = _tar(out / "cells")
    digest = hashlib.sha256(data).hexdigest()
    manifest = out / MANIFEST
    old = read_json(manifest, "delete it and run the study again to write it again") if manifest.is_file() else {}
    if n == 0 or (old.get("tar_sha256") == digest and (out / ARCHIVE).is_file()):
        return False
    packed = lzma.compress(data, preset=9)
    atomic_write_bytes(out / ARCHIVE, packed)
    record = {
        "archive": ARCHIVE,
        "cells": n,
        "sha256": hashlib.sha256(packed).hexdigest(),
        "tar_sha256": digest,  # (of the archive uncompressed: what pack compares to know it has nothing to do)
        "diagnostics": f"diagnostics.jsonl keeps {', '.join(ARCHIVED_DIAGNOSTICS)}, to 7 significant digits",
    }
    atomic_write_text(manifest, dumps(record, indent=1) + "\n")
    return True


def unpack(out: Path) -> bool:
    """Make ``out/cells`` from ``out``'s archive where it does not exist; False if it did, or there is none."""
    out = Path(out)
    archive, cells = out / ARCHIVE, out / "cells"
    if cells.exists() or not archive.is_file():
        return False
    fix = f"check it out again, or delete it and {MANIFEST} to train the study again"
    with temp_dir(out, "cells") as tmp:
        try:
            with tarfile.open(archive, "r:xz") as tar:
                for member in tar:
                    if not member.isfile() or not MEMBER.fullmatch(member.name):
                        raise SpannormError(
                            f"{str(archive)!r} holds {member.name!r}, which spannorm does not archive: {fix}"
                        )
                    (tmp / member.name).parent.mkdir(exist_ok=True)
                    (tmp / member.name).write_bytes(tar.extractfile(member).read())
        except (tarfile.TarError, lzma.LZMAError, EOFError) as e:
            raise SpannormError(
                f"{str(archive)!r} is not a readable archive ({type(e).__name__}: {e}): {fix}"
            ) from None
        except OSError as e:
            raise os_error(e, str(cells)) from None
        try:
            os.rename(tmp, cells)
        except OSError:
            if not cells.is_dir():  # (else another process unpacked it meanwhile)
                raise
    return True
