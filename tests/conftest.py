"""Shared fixtures: a tiny Conv + Linear network and learnable random data, fast on 2 CPU cores."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from _runs import LOAD_DATA, reuse_datasets
from hypothesis import settings
from torch import nn

import bidst
from bidst import recipe

# Property tests draw the same examples on every run (a function of each test), so a clean clone
# sees what earlier runs saw; HYPOTHESIS_PROFILE=explore draws fresh ones each run.
settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


class TinyNet(nn.Module):
    """Two convolutions and two linear layers on 1x8x8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class Branchy(nn.Module):
    """An MLP whose middle layer runs only at the calls `uses_middle(call)` (1, 2, ...) approves: by default the
    odd ones (a branch some steps do not take)."""

    def __init__(self, uses_middle: Callable[[int], bool] = lambda call: call % 2 == 1) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 4)
        self.uses_middle = uses_middle
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = torch.relu(self.a(x))
        return self.c(torch.relu(self.b(h)) if self.uses_middle(self.calls) else h)


def make_data(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random 1x8x8 images whose label is the quadrant with the largest mean."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    quads = torch.stack([x[:, 0, :4, :4].mean((1, 2)), x[:, 0, :4, 4:].mean((1, 2)),
                         x[:, 0, 4:, :4].mean((1, 2)), x[:, 0, 4:, 4:].mean((1, 2))], 1)
    return x, quads.argmax(1)


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-4),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


def fast_options(method: str) -> dict:
    """Method options that make topology changes happen within a few dozen steps."""
    opts = bidst.method_options(method)
    out = {}
    if "interval" in opts:
        out["interval"] = 5
    if "interval_unit" in opts:
        out["interval_unit"] = "steps"
    if "iterations" in opts:
        out["iterations"] = 5
    if "mask_interval" in opts:
        out["mask_interval"] = 5
    return out


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny layers run fastest so, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return make_data()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder for many checkpoint-every-step runs: in RAM (/dev/shm) when it has room, as fsync there is free."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 4 << 30:
        folder = Path(tempfile.mkdtemp(prefix="bidst-test-", dir=shm))
        yield folder
        shutil.rmtree(folder, ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def tiny_runs() -> Iterator[None]:
    """For one test module: `reuse_datasets`, and torch's thread count restored after the runs' threads=1."""
    threads = torch.get_num_threads()
    reuse_datasets()
    yield
    recipe.load_data = LOAD_DATA
    torch.set_num_threads(threads)
