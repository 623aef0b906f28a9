"""Checkpoint files: written to a temporary file, flushed and renamed; loaded without unpickling code."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from .errors import BidstError

_NAME = re.compile(r"^step-(\d+)\.pt$")


def checkpoint_path(folder: Path, step: int) -> Path:
    """The file name of the checkpoint taken after optimizer step `step`."""
    return folder / f"step-{step:08d}.pt"


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first (temporary files are ignored)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(state: dict[str, Any], folder: Path, step: int, keep: int) -> Path:
    """Write `state` atomically as the checkpoint of `step`, then delete all but the newest `keep`."""
    folder.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(folder, step)
    tmp = final.with_name(final.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BidstError(f"could not write checkpoint {final}: {exc.strerror or exc}") from None
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return final


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`; an unreadable file is a BidstError."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise BidstError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BidstError(f"checkpoint {path} cannot be loaded: {first}") from None


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in `folder`, or None."""
    found = list_checkpoints(folder)
    return found[-1] if found else None
