"""Checkpoint files: written to a temporary file, flushed and renamed; loaded without unpickling code."""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .errors import BidstError

_NAME = re.compile(r"^step-(\d+)\.pt$")
DELAY_ENV = "BIDST_TEST_CHECKPOINT_DELAY"  # seconds to hold each temporary checkpoint file open (crash tests only)


def checkpoint_path(folder: Path, step: int) -> Path:
    """The file name of the checkpoint taken after optimizer step `step`."""
    return folder / f"step-{step:08d}.pt"


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first (temporary files are ignored)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def nearest_folder(path: Path) -> Path:
    """`path` or its nearest existing parent, which must be a folder: a file there (`path` or above) is a BidstError."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise BidstError(f"cannot use {path} as a folder: {'it' if existing == path else existing} is a file")
    return existing


def make_folder(path: Path) -> None:
    """`mkdir -p path` and prove it takes files (a probe file, removed again), with a file in the way or a
    refusal by the OS as a one-line BidstError: the jobs that write there find out before they start."""
    nearest_folder(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BidstError(f"cannot create folder {path}: {exc.strerror or exc}") from None
    probe_folder(path)


def probe_folder(path: Path) -> None:
    """Prove that the existing folder `path` takes files (a probe file, removed again; the OS's permission bits
    do not tell for root, nor for a read-only or virtual file system), or raise a one-line BidstError."""
    try:
        with tempfile.TemporaryFile(dir=path, prefix=".bidst-probe-"):
            pass
    except OSError as exc:
        raise BidstError(f"cannot write in folder {path}: {exc.strerror or exc}") from None


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write `path` through a temporary file that is flushed, fsynced and renamed, so readers see old or new.

    An OSError (a full disk, say) removes the temporary file, leaves `path` as it was and becomes a BidstError.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as exc:  # a full disk, or a kill's exception: no temporary file is left either way
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise BidstError(f"could not write {path}: {exc.strerror or exc}; files written before are intact") from None
        raise


def _write_state(state: dict[str, Any], f: BinaryIO) -> None:
    """torch.save `state` into `f`, then wait BIDST_TEST_CHECKPOINT_DELAY seconds if the crash tests ask for it."""
    try:
        torch.save(state, f)
    except RuntimeError as exc:  # torch's zip writer turns a failed write (a full disk) into a RuntimeError
        if isinstance(exc.__context__, OSError):
            raise exc.__context__ from None
        raise
    delay = float(os.environ.get(DELAY_ENV, "0"))
    if delay > 0:  # crash tests widen the window in which a kill lands mid-write
        f.flush()
        time.sleep(delay)


def save_checkpoint(state: dict[str, Any], folder: Path, step: int, keep: int) -> Path:
    """Write `state` atomically as the checkpoint of `step`, then delete all but the newest `keep`."""
    folder.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(folder, step)
    atomic_write(final, lambda f: _write_state(state, f))
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return final


def remove_partial(folder: Path) -> None:
    """Delete temporary files a killed run left behind (complete checkpoints are never touched)."""
    if folder.is_dir():
        for tmp in folder.glob("step-*.pt.tmp"):
            tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`; an unreadable file is a BidstError."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise BidstError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise BidstError(f"checkpoint {path} cannot be loaded (not a complete PyTorch checkpoint): "
                         f"{type(exc).__name__} {first}".rstrip()) from None


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in `folder`, or None."""
    found = list_checkpoints(folder)
    return found[-1] if found else None
