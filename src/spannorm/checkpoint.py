"""The checkpoint format: writing a run's checkpoints, verifying them, finding the newest good one, loading it.

A run's checkpoints/ directory::

    latest              the name of the newest complete checkpoint directory
    step-N/             model.safetensors (a sharded run: dcp/, every rank's shards of the weights and optimizer);
                        state.pt: the step, the run's id, the optimizer (a whole run's), the RNGs and the state of
                        each of the trainer's parts; manifest.json: the sha256 of each of its files

A checkpoint is written whole or not at all (a temporary directory renamed into place). The trainer decides when to
save and what its state holds (:class:`spannorm.train.Trainer`); the run directory names the run
(:class:`spannorm.run.RunDir`); this module owns the files.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_model, save_model
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from .config import SpannormError
from .device import rng_state, set_rng_state
from .files import atomic_dir, atomic_write_text, remove_dir, sha256_file

CHECKPOINT = re.compile(r"step-(\d+)")
SHARDS_METADATA = "dcp/.metadata"  # torch.distributed.checkpoint's index of a sharded checkpoint's files


def checkpoint_step(ckpt: Path) -> int:
    """The step of a checkpoint directory (step-0000040: 40)."""
    return int(CHECKPOINT.fullmatch(ckpt.name)[1])


def checkpoint_dirs(directory: Path) -> list[Path]:
    """The checkpoint directories in ``directory``, newest first (a symbolic link is none: it may lead out of the
    run)."""
    dirs = [p for p in directory.glob("step-*") if CHECKPOINT.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(dirs, key=checkpoint_step, reverse=True)


def save(
    directory: Path,
    step: int,
    model: torch.nn.Module,
    state: dict,
    keep: int,
    write_weights: Callable[[Path], None] | None = None,
) -> None:
    """Write checkpoint ``step`` into ``directory``: the weights and ``state`` (the run's id, optimizer, RNGs, the
    trainer's parts), and keep the newest ``keep`` (newer ones than ``step`` are the damaged ones a resume fell back
    past: deleted). Optimizer tensors are saved where they live and loaded onto the device of the run that resumes.
    ``write_weights(tmp)``: how the weights are written into the checkpoint's directory (default model.safetensors;
    a sharded run: the ranks' shards in dcp/)."""
    name = f"step-{step:07d}"
    if (directory / name).exists():  # a damaged one a resume fell back past
        remove_dir(directory / name)
    with atomic_dir(directory / name) as tmp:
        if write_weights is None:
            _save_weights(model, tmp / "model.safetensors")
        else:
            write_weights(tmp)
        _save_state({"step": step, **state}, tmp / "state.pt")
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        atomic_write_text(tmp / "manifest.json", json.dumps({f: sha256_file(tmp / f) for f in files}))
    atomic_write_text(directory / "latest", name)
    dirs = checkpoint_dirs(directory)
    newer = [d for d in dirs if checkpoint_step(d) > step]
    for old in newer + [d for d in dirs if checkpoint_step(d) <= step][keep:]:
        remove_dir(old)


def newest(directory: Path, owner: str | None) -> Path | None:
    """The newest checkpoint in ``directory`` whose files verify (None if there is none yet); a damaged newer one is
    reported on stderr and passed over; if every one is damaged, an error. A ``latest`` that names no checkpoint
    directory there, and a checkpoint of another run than ``owner`` (a run id; None: a run from before runs had
    ids), are refused (a resume would start again at step 0, or continue another run)."""
    latest = directory / "latest"
    if latest.is_file():
        name = latest.read_text(errors="replace").strip()
        if not CHECKPOINT.fullmatch(name):
            raise SpannormError(f"{str(latest)!r} names {name!r}, not a checkpoint directory of this run: refused")
        if not (directory / name).is_dir():
            raise SpannormError(
                f"{str(latest)!r} names {name!r}, which is missing or not a directory: refused (put it back, "
                "or delete checkpoints/latest to continue from the newest checkpoint there)"
            )
    damaged = []
    for ckpt in checkpoint_dirs(directory):
        if (problem := damage(ckpt)) is None:
            check_owner(ckpt, owner)
            for bad, why in damaged:
                print(
                    f"spannorm: warning: checkpoint {str(bad)!r} is corrupt or truncated ({why}); using {ckpt.name}",
                    file=sys.stderr,
                )
            return ckpt
        damaged.append((ckpt, problem))
    if damaged:
        ckpt, why = damaged[0]
        older = f" (and the {len(damaged) - 1} older ones)" if len(damaged) > 1 else ""
        raise SpannormError(f"checkpoint {str(ckpt)!r}{older} is corrupt or truncated: {why}")
    return None


def check_owner(ckpt: Path, owner: str | None) -> None:
    """Refuse a checkpoint that another run wrote (its state.pt holds another run id than ``owner``)."""
    if owner is None:  # (a run from before runs had ids: its checkpoints have none)
        return
    try:
        theirs = torch.load(ckpt / "state.pt", weights_only=True, map_location="cpu", mmap=True).get("run_id")
    except Exception as e:  # (damage() checked the file's sha256: this is a file of another program)
        raise SpannormError(f"checkpoint {str(ckpt)!r} cannot be read: {type(e).__name__}") from None
    if theirs != owner:
        raise SpannormError(
            f"checkpoint {str(ckpt)!r} was written by another run (run id {theirs}, this run's is {owner}): "
            "refused; delete it"
        )


def load_weights(ckpt: Path, model: torch.nn.Module) -> None:
    """Load a verified checkpoint's weights into ``model`` (whole, from a whole or a sharded checkpoint)."""
    if sharded(ckpt):
        load_shards(ckpt, model)
    else:
        load_model(model, str(ckpt / "model.safetensors"))


@contextlib.contextmanager
def safetensors_os_errors(path: Path):
    """Within the block, an I/O error that safetensors reports as a SafetensorError of its own ("... (os error
    28)": a full disk) is raised as the OSError it is, naming ``path``."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:
        if (m := re.search(r"\(os error (\d+)\)", str(e))) is None:
            raise
        raise OSError(int(m[1]), os.strerror(int(m[1])), str(path)) from None


def _save_weights(model: torch.nn.Module, path: Path) -> None:
    """safetensors' save_model; an I/O error (a full disk) is raised as the OSError it is."""
    with safetensors_os_errors(path):
        save_model(model, str(path))


def _save_state(state: dict, path: Path) -> None:
    """torch.save through a Python file, so that an I/O error (a full disk) is raised as the OSError it is (torch
    raises a RuntimeError of its own on the way out, and a path gives only that)."""
    try:
        with open(path, "wb") as f:
            torch.save(state, f)
    except RuntimeError as e:
        if isinstance(e.__context__, OSError):
            raise e.__context__ from None
        raise


def damage(ckpt: Path) -> str | None:
    """What is wrong with a checkpoint directory's files (None: each matches its sha256 in manifest.json)."""
    try:
        manifest = json.loads((ckpt / "manifest.json").read_text())
        digests = {str(f): str(d) for f, d in manifest.items()}
    except (OSError, ValueError, TypeError, AttributeError) as e:
        return f"cannot read manifest.json ({type(e).__name__})"
    for needed in ("state.pt", "model.safetensors" if not sharded(ckpt) else SHARDS_METADATA):
        if needed not in digests:
            return f"manifest.json does not list {needed}"
    for fname, digest in digests.items():
        path = ckpt / fname
        if ".." in Path(fname).parts or not path.is_file() or sha256_file(path) != digest:
            return f"{fname} is missing or does not match its sha256"
    return None


def sharded(ckpt: Path) -> bool:
    """Whether a checkpoint holds its weights and optimizer as the shards of a sharded run (dcp/)."""
    return (ckpt / "dcp").is_dir()


def save_shards(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the weights and the optimizer state (torch.distributed.checkpoint)."""
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path), no_dist=not dist.is_initialized())


def load_shards(ckpt: Path, model: torch.nn.Module, opt: torch.optim.Optimizer | None = None) -> None:
    """Load a sharded checkpoint's weights (and optimizer state) into ``model`` (and ``opt``), sharded over any
    number of ranks or whole in one process: torch.distributed.checkpoint reshards."""
    no_dist = not dist.is_initialized()
    if no_dist:  # (one process reading a sharded checkpoint is what is meant: torch's warning says nothing)
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
    if opt is None:
        msd = get_model_state_dict(model)
        dcp.load({"model": msd}, checkpoint_id=str(ckpt / "dcp"), no_dist=no_dist)
        set_model_state_dict(model, msd)
        return
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(ckpt / "dcp"), no_dist=no_dist)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_checkpoint(ckpt: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator) -> dict:
    """Restore a verified checkpoint (:func:`newest`): the weights, the optimizer and the RNGs;
    returns its whole state (the step and the trainer's parts). A sharded checkpoint loads into a model sharded
    over any number of ranks or whole; a whole one (model.safetensors) into a whole model."""
    bad = f"checkpoint {str(ckpt)!r} is corrupt or truncated"
    try:
        device = next(model.parameters()).device
        state = torch.load(ckpt / "state.pt", weights_only=True, map_location="cpu")
        if sharded(ckpt):
            load_shards(ckpt, model, opt)
            missing = unexpected = []
        else:
            missing, unexpected = load_model(model, str(ckpt / "model.safetensors"), strict=False, device=str(device))
            opt.load_state_dict(state["optimizer"])  # moves the optimizer state onto the parameters' device
        gen.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        set_rng_state(device, state.get("device_rng"))
    except Exception as e:  # any failure here means the files do not fit this run
        raise SpannormError(f"{bad} or does not match the run's config: {str(e).splitlines()[0]}") from None
    if missing or unexpected:
        raise SpannormError(f"{bad} or does not match the run's config: missing {missing}, unexpected {unexpected}")
    return state


def rng_states(model: torch.nn.Module, gen: torch.Generator) -> dict:
    """The RNG states a checkpoint saves: the data order's, torch's and the model's device's."""
    device = next(model.parameters()).device
    return {"data_rng": gen.get_state(), "torch_rng": torch.get_rng_state(), "device_rng": rng_state(device)}
