"""Running a study's cells: in this process (``jobs=1``) or in ``jobs`` spawned worker processes.

A finished cell (summary.json present, same config) is reused and an interrupted one resumes from its
checkpoint, so a study can be stopped and started again.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
import yaml

from ..config import ConfigError, SpannormError, to_dict
from ..data import prepare
from ..device import resolve as resolve_device
from ..files import atomic_write_text, dumps, temp_dir
from ..probe_command import run_probe
from ..run import RunDir
from ..run_config import RunConfig, run_config_from_dict
from ..train import diverged_at, train_or_reuse
from .grid import PROBE_BATCH, Cell, StudyConfig


def run_cell(
    cfg_dict: dict, run_dir: str, probe: bool, keep_checkpoints: bool, threads: int | None = None, nproc: int = 1
) -> dict:
    """Train (or reuse, or resume) one cell, probe its final model, drop its checkpoints.

    Runs in a worker process when the study has ``jobs > 1``; everything it writes is atomic, so
    a kill at any point leaves a cell that the next run of the study reuses or resumes. ``nproc`` > 1:
    the cell trains under torchrun in that many processes (:func:`train_under_torchrun`).
    """
    if threads:
        torch.set_num_threads(threads)
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    where = f"--out {str(run_dir.parent.parent)!r} holds a cell {run_dir.name!r}"
    cfg = run_config_from_dict(cfg_dict)
    if nproc > 1 and not RunDir(run_dir).summary_file.is_file():
        summary = train_under_torchrun(cfg, run_dir, nproc, threads or torch.get_num_threads(), where)
    else:
        summary = train_or_reuse(cfg, run_dir, False, where)
    reused = bool(summary.get("reused"))
    ckpts = run_dir / "checkpoints"
    if probe and not summary["diverged"] and not (run_dir / "probe.json").is_file() and (ckpts / "latest").is_file():
        row = run_probe(None, [], [], PROBE_BATCH, checkpoint=run_dir)[0]
        atomic_write_text(run_dir / "probe.json", dumps(row))
    if not keep_checkpoints and ckpts.exists():
        shutil.rmtree(ckpts)
    if not reused or not (run_dir / "cell.json").is_file():  # the wall time of the session that finished it
        atomic_write_text(run_dir / "cell.json", dumps({"wall_s": time.perf_counter() - t0}))
    return summary | {"reused": reused}


def train_under_torchrun(cfg: RunConfig, run_dir: Path, nproc: int, threads: int, where: str) -> dict:
    """Train (or resume) the run ``cfg`` in ``run_dir`` as ``torchrun --standalone --nproc_per_node nproc -m
    spannorm train``, each process with ``threads // nproc`` threads; returns rank 0's summary. A process that
    fails ends the job (torchrun's doing) and raises a SpannormError with its error line; a kill of this
    process (Ctrl-C, SIGTERM) ends the job first, so that no rank outlives the study."""
    run = RunDir(run_dir)
    resume = run.has_run()
    if resume:
        run.check_config(cfg, where)
    with temp_dir(run_dir.parent, "torchrun") as tmp:  # (in the study: one that a kill left is deleted there)
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        what = ["--resume"] if resume else ["--config", str(config)]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd += ["-m", "spannorm", "train", "--quiet", "--out", str(run_dir), *what]
        env = os.environ | {"OMP_NUM_THREADS": str(max(1, threads // nproc))}
        old_term = _sigterm_interrupts()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            output, _ = proc.communicate()
        except BaseException:
            proc.terminate()  # torchrun passes it on to its processes and waits for them
            proc.wait()
            raise
        finally:
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
    if proc.returncode != 0:
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        why = next((line for line in lines if line.startswith("spannorm: error:")), lines[-1] if lines else "no output")
        raise SpannormError(f"torchrun with {nproc} processes exited with code {proc.returncode}: {why}")
    return run.summary() | {"reused": False}


def _cell_threads(jobs: int) -> int:
    return max(1, (os.cpu_count() or 1) // jobs)


def _outcome(summary: dict) -> str:
    """What a progress line says of a finished cell: reused or trained, its val loss, its verdict."""
    val = summary["final_val_loss"]
    verdict = (
        f"{diverged_at(summary)} ({summary['diverged_reason']})"
        if summary["diverged"]
        else "stalled"
        if summary.get("stalled")
        else "ok"
    )
    return f"{'reused' if summary['reused'] else 'trained'}, val loss {'—' if val is None else f'{val:.4f}'}, {verdict}"


def run_cells(study: StudyConfig, cells: list[Cell], out: Path, jobs: int, log, launcher=None) -> dict[str, str]:
    """Run every cell (in this process, in ``jobs`` workers, or each a job of ``launcher``'s cluster:
    :class:`spannorm.study.launch.Slurm`); returns {cell name: error} for the cells that failed."""
    for cell in cells:  # a cell directory of another config is a user error: refuse before any training
        RunDir(out / "cells" / cell.name).check_config(cell.cfg, f"--out {str(out)!r} holds a cell {cell.name!r}")
    for data in {json.dumps(to_dict(c.cfg.data), sort_keys=True): c.cfg.data for c in cells}.values():
        prepare(data)  # once, here, before any worker starts
    failed: dict[str, str] = {}
    n = len(cells)

    def done(i: int, cell: Cell, summary: dict | None, error: str | None) -> None:
        if error is not None:
            failed[cell.name] = error
            log(f"[{i}/{n}] {cell.name}: FAILED: {error}")
            return
        log(f"[{i}/{n}] {cell.name}: {_outcome(summary)}")

    def args(cell: Cell) -> tuple:
        return (to_dict(cell.cfg), str(out / "cells" / cell.name), study.probe, study.keep_checkpoints)

    nproc = study.nproc_per_cell

    def here(todo: list[Cell]) -> None:
        for i, cell in enumerate(todo, 1):
            try:
                done(i, cell, run_cell(*args(cell), nproc=nproc), None)
            except (SpannormError, RuntimeError, OSError, ValueError) as e:
                done(i, cell, None, f"{type(e).__name__}: {' '.join(str(e).split())}")

    if launcher is not None:  # the finished cells reused here, the others each a job of the cluster's
        finished = [c for c in cells if (out / "cells" / c.name / "summary.json").is_file()]
        here(finished)
        todo = [c for c in cells if c not in finished]
        launcher.run(
            todo,
            out,
            run_cell,
            lambda cell: (*args(cell), launcher.threads, nproc),
            lambda i, *ended: done(len(finished) + i, *ended),
        )
        return failed
    if jobs == 1:
        here(cells)
        return failed

    _in_workers(cells, jobs, nproc, args, done)
    return failed


def _in_workers(cells: list[Cell], jobs: int, nproc: int, args, done) -> None:
    """:func:`run_cells` with ``jobs`` > 1: every cell in one of ``jobs`` spawned worker processes (on CUDA, each
    worker slot with its own GPUs), ``done(i, cell, summary, error)`` as each ends."""
    context = multiprocessing.get_context("spawn")
    gpus, slots = gpu_slots(jobs, nproc, cells), context.SimpleQueue()  # each worker takes one slot's GPUs
    for slot in gpus or []:
        slots.put(slot)
    pool = ProcessPoolExecutor(
        max_workers=jobs, mp_context=context, initializer=_worker_init, initargs=(slots, bool(gpus))
    )
    old_term = _sigterm_interrupts()
    try:
        futures = {pool.submit(run_cell, *args(cell), threads=_cell_threads(jobs), nproc=nproc): cell for cell in cells}
        for i, fut in enumerate(as_completed(futures), 1):
            try:
                done(i, futures[fut], fut.result(), None)
            except Exception as e:  # the worker's exception, or a dead worker (BrokenProcessPool)
                done(i, futures[fut], None, f"{type(e).__name__}: {' '.join(str(e).split())}")
    except BaseException:  # Ctrl-C or SIGTERM: stop the workers; their cells resume from a checkpoint next time
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    pool.shutdown()


def gpu_slots(jobs: int, nproc: int, cells: list[Cell]) -> list[str] | None:
    """With cells on CUDA and ``jobs`` worker slots of ``nproc`` processes each: each slot's own GPUs, as
    CUDA_VISIBLE_DEVICES values (the ones already visible, in order); None on the CPU. More GPUs asked for than the
    machine has is a one-line error."""
    if jobs == 1 or not any(resolve_device(c.cfg.train.device).type == "cuda" for c in cells):
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    if jobs * nproc > len(gpus):
        raise ConfigError(
            f"--jobs {jobs} with nproc_per_cell {nproc} needs {jobs * nproc} GPUs (each cell its own), but this "
            f"machine has {len(gpus)}: expected --jobs at most {max(1, len(gpus) // nproc)}"
        )
    return [",".join(gpus[i * nproc : (i + 1) * nproc]) for i in range(jobs)]


def _worker_init(slots, on_gpus: bool) -> None:
    """A cell worker: its slot's GPUs (before CUDA starts in it), and a thread lock for tqdm: the multiprocessing
    lock tqdm makes by default is a semaphore that a worker terminated by a Ctrl-C or SIGTERM of the study never
    releases, which Python then warns about as leaked."""
    from tqdm import tqdm

    if on_gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = slots.get()
    tqdm.set_lock(threading.RLock())


def _sigterm_interrupts():
    """Make SIGTERM interrupt like Ctrl-C, so that ``kill PID`` also stops the worker processes (a
    study started in the background with ``&`` ignores SIGINT). Returns the previous handler, or None
    where handlers cannot be set (not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)
