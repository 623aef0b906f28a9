"""The training recipe: data, model, optimizer, one Sparsifier, metrics, checkpoints. Read it in one sitting."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm import tqdm

from . import distributed
from .backend import check_method_backend
from .budget import matched_steps, model_rows
from .checkpoint import (
    atomic_write,
    latest_checkpoint,
    load_checkpoint,
    make_folder,
    nearest_folder,
    remove_partial,
    save_checkpoint,
)
from .config import OPERATIONAL_KEYS, TrainConfig, load_config
from .data import (
    HOLDOUT_SPLIT_SEED,
    create_dataset,
    dataset_info,
    fixed_split,
    indexed_batches,
    make_loader,
)
from .density import check_distribution, check_sparsity
from .engine import Sparsifier, sparsify
from .errors import BidstError, DataError, SharedError
from .evolution import MaskEvolution
from .flops import (
    CostMeter,
    dense_grad_flops,
    dense_train_step_flops,
    inference_flops,
    layer_shapes,
    train_step_flops,
)
from .methods import METHODS, create_method, with_defaults
from .models import MODELS, create_model
from .signals import RunInterrupted, StopSignals, requested
from .sparse import set_threads

# config keys that may differ between a run and its resumption (they do not change the result, or only
# from a non-finite loss on: a run stopped by one may go on with on_nonfinite=skip)
RESUMABLE_KEYS = OPERATIONAL_KEYS | {"device", "on_nonfinite"}
# what every training checkpoint holds
CHECKPOINT_KEYS = {"config", "model", "optimizer", "sparsifier", "scaler", "epoch", "batch", "best_val", "running",
                   "skipped", "val_acc", "test_acc", "metrics_offset", "rng_cpu", "rng_cuda", "meter", "evolution"}


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without one is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BidstError("device 'cuda' was asked for but no CUDA device is available")
    return torch.device(name)


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int, total_steps: int = 0) -> float:
    """The learning rate for optimizer step `step` (0-based): warm-up, then the chosen decay over `total_steps`."""
    total = total_steps or cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.lr_schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    if cfg.lr_schedule == "step":  # x0.1 at 50% and 75% of training
        return cfg.lr * 0.1 ** sum(step >= f * total for f in (0.5, 0.75))
    return cfg.lr


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov), Adam or AdamW over all parameters."""
    params = model.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """torch.amp autocast for bf16/fp16, nothing for fp32."""
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Any, device: torch.device, cfg: TrainConfig, stop: StopSignals | None = None
) -> tuple[float, int]:
    """Top-1 accuracy in percent, and the stop signal any rank got meanwhile (0 if none: a rank that gets one stops
    scoring, its accuracy is then partial); under DDP each rank scores its shard and the counts are summed."""
    stop = stop if stop is not None else StopSignals()  # not entered: it never asks to stop
    rank, world = distributed.rank(), distributed.world_size()
    loader = make_loader(dataset, batch_size=512, shuffle=False, seed=0, epoch=0, rank=rank, world_size=world,
                         num_workers=cfg.num_workers)
    own = len(range(rank, len(dataset), world))  # the shard's items, without the repeats padding it
    was_training = model.training
    model.eval()
    correct = seen = 0
    for x, y in loader:
        if seen == own or stop.signum:
            break
        x, y = x[: own - seen].to(device, non_blocking=True), y[: own - seen].to(device, non_blocking=True)
        with autocast(cfg, device):
            correct += int((model(x).argmax(1) == y).sum())
        seen += y.numel()
    model.train(was_training)
    local = torch.tensor([correct, seen, *stop.flags()], dtype=torch.float64, device=device)
    counts = distributed.all_reduce_sum(local).tolist()
    return 100.0 * int(counts[0]) / max(1, int(counts[1])), requested(counts[2:])


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl, flushed at once; truncatable for resume.

    With `path` None (DDP ranks other than 0) it writes nothing.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.file = None if path is None else open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as exc:
            raise self._failed(exc) from None

    def _failed(self, exc: OSError) -> BidstError:
        return BidstError(f"could not write {self.path}: {exc.strerror or exc}; the last checkpoint is intact")

    def stopped(self, step: int, epoch: int, reason: str) -> None:
        """Record, as the last line, why the run stopped before its end (resuming cuts the line off again);
        a file that cannot take it is left as it is."""
        try:
            self.write({"kind": "stopped", "step": step, "epoch": epoch, "reason": reason})
        except BidstError:
            pass

    def offset(self) -> int:
        return 0 if self.file is None else self.file.tell()

    def sync(self) -> None:
        """Put the lines written so far on disk, so that a checkpoint never points past the file's end."""
        if self.file is not None:
            try:
                os.fsync(self.file.fileno())
            except OSError as exc:
                raise self._failed(exc) from None

    def truncate(self, offset: int) -> None:
        """Cut the lines written after a checkpoint; a file shorter than the checkpoint says is refused, not padded."""
        if self.file is not None:
            size = os.fstat(self.file.fileno()).st_size
            if size == 0 < offset:  # deleted by the user: the run goes on, its lines before the checkpoint are gone
                print(f"bidst: warning: {self.path} was empty; it holds the lines from here on only", file=sys.stderr)
                return
            if size < offset:
                raise BidstError(f"{self.path} is shorter ({size} bytes) than its checkpoint recorded ({offset}): "
                                 "it lost lines, so the run cannot continue it")
            self.file.truncate(offset)
            self.file.seek(offset)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _write_text(path: Path, text: str) -> None:
    """Write `text` atomically (temporary file, fsync, rename)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def config_diff(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """The keys in which `cfg` differs from a saved run's config, other than those a resumed run may change (method
    options and distribution compared with their defaults written out)."""
    defaults = TrainConfig().to_dict()  # keys added since the run was saved hold their defaults there
    old = with_defaults({k: saved.get(k, v) for k, v in defaults.items()})
    return [k for k, v in with_defaults(cfg.to_dict()).items() if k not in RESUMABLE_KEYS and old[k] != v]


def check_config(cfg: TrainConfig) -> None:
    """The checks of a config that need no data or model: sparsity, method and its options, match_flops, model
    and dataset names. `train` makes them first, and `bidst sweep` for every run before it starts any."""
    check_sparsity(cfg.sparsity)
    if cfg.distribution is not None:
        check_distribution(cfg.distribution)
    if not -(2**63) <= cfg.seed < 2**64:  # what torch.manual_seed takes
        raise BidstError(f"seed must be in [-2**63, 2**64), got {cfg.seed}")
    method = create_method(cfg.method, **cfg.method_args)
    if cfg.precision == "fp16" and hasattr(method, "check_loss_scaling"):  # fp16 trains with a GradScaler
        method.check_loss_scaling()
    check_method_backend(cfg.backend, method)
    check_setting = getattr(method, "check_setting", None)  # options the backend or the data must serve
    if check_setting is not None:
        check_setting(cfg.backend, bool(cfg.holdout_size))
    if cfg.match_flops and cfg.match_flops not in METHODS:
        raise BidstError(f"match_flops: unknown method {cfg.match_flops!r}; known: {', '.join(METHODS.names())}")
    if cfg.match_flops:  # (without it, match_flops_args is unused: `match_flops=` turns matching off in a recipe)
        try:
            create_method(cfg.match_flops, **cfg.match_flops_args)
        except BidstError as err:
            raise BidstError(f"match_flops_args: {err} (they are {cfg.match_flops}'s options; "
                             "match_flops_args={} for its defaults)") from None
    MODELS.get(cfg.model)
    dataset_info(cfg.dataset)


def check_new_run_dir(run_dir: Path) -> None:
    """Refuse, before any work, a new run's folder that is a file, lies under a file or an unwritable folder, or holds files."""
    existing = nearest_folder(run_dir)
    if existing == run_dir and any(run_dir.iterdir()):
        raise BidstError(f"run folder {run_dir} already exists and is not empty; use --resume or another --run-dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BidstError(f"cannot use {run_dir} as a folder: {existing} is not writable")


def saved_config_diff(cfg: TrainConfig, run_dir: Path) -> list[str]:
    """The config keys in which `cfg` differs from the one saved in `run_dir`; a missing or damaged one is refused."""
    config_file = run_dir / "config.yaml"
    if not config_file.exists():
        raise BidstError(f"cannot resume: {run_dir} holds no config.yaml")
    try:
        saved = load_config(config_file).to_dict()
    except BidstError as e:
        raise BidstError(f"{config_file} is damaged: {e}") from None
    return config_diff(saved, cfg)


def check_resumed_config(cfg: TrainConfig, run_dir: Path) -> None:
    """Refuse to resume (or to report a finished run for) a config that differs from the one saved in `run_dir`."""
    diff = saved_config_diff(cfg, run_dir)
    if diff:
        raise BidstError(f"cannot resume {run_dir}: config differs from the saved run in {', '.join(diff)}")


def check_resumable(cfg: TrainConfig, run_dir: Path) -> None:
    """Refuse, before any work, to resume a run of another config or in a folder that cannot be written."""
    check_resumed_config(cfg, run_dir)
    unwritable = [p for p in (run_dir, run_dir / "checkpoints") if p.exists() and not os.access(p, os.W_OK | os.X_OK)]
    if unwritable:
        raise BidstError(f"cannot resume {run_dir}: {unwritable[0]} is not writable")


def prepare_run_dir(cfg: TrainConfig, run_dir: Path, resume: bool) -> TrainConfig:
    """Create the run folder (refusing to reuse a non-empty one) or check a resumed run's config."""
    config_file = run_dir / "config.yaml"
    if resume:  # checked by check_resumable before any work
        remove_partial(run_dir / "checkpoints")
        return cfg
    check_new_run_dir(run_dir)
    make_folder(run_dir)
    _write_text(config_file, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return cfg


def check_checkpoint(state: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    """Refuse a file that is not a training checkpoint, or one written by a run with another config."""
    if not isinstance(state, dict):
        raise BidstError(f"checkpoint {path} is not a bidst training checkpoint (it holds a {type(state).__name__})")
    missing = sorted(CHECKPOINT_KEYS - set(state))
    if missing:
        raise BidstError(f"checkpoint {path} is not a bidst training checkpoint (it lacks {', '.join(missing[:3])})")
    kinds = {"config": dict, "epoch": int, "batch": int, "skipped": int, "metrics_offset": int, "running": dict,
             "rng_cpu": torch.Tensor}
    wrong = [k for k, kind in kinds.items() if not isinstance(state[k], kind) or isinstance(state[k], bool)]
    wrong += ["rng_cpu"] if "rng_cpu" not in wrong and state["rng_cpu"].dtype != torch.uint8 else []
    if wrong:
        raise BidstError(f"checkpoint {path} is damaged: {', '.join(wrong)} of the wrong type")
    diff = config_diff(state["config"], cfg)
    if diff:
        raise BidstError(f"checkpoint {path} does not match this run: its config differs in {', '.join(diff)}")


def restore(path: Path, part: str, load: Callable[[], object]) -> None:
    """Run `load`, one part of resuming from checkpoint `path`; a part that does not load (a damaged or hand-edited
    file) is a one-line BidstError naming it."""
    try:
        load()
    except BidstError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
        raise BidstError(f"checkpoint {path} is damaged: its {part} state does not load "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None


def load_data(cfg: TrainConfig) -> tuple[Any, Any, Any, Any]:
    """The train set (its first `train_subset` items less the held-out ones), the held-out set (`holdout_size`
    fixed items of the former, unaugmented; None if 0), the validation set (None if val_size is 0) and the test set."""
    train_set = create_dataset(cfg.dataset, "train", root=cfg.data_root, val_size=cfg.val_size, augment=cfg.augment)
    if cfg.train_subset:
        train_set = train_set.subset(torch.arange(min(cfg.train_subset, len(train_set))))
    holdout_set = None
    if cfg.holdout_size:
        if cfg.holdout_size >= len(train_set):
            raise BidstError(f"holdout_size {cfg.holdout_size} must be below the {len(train_set)} training items")
        plain = train_set
        if cfg.augment:
            plain = create_dataset(cfg.dataset, "train", root=cfg.data_root, val_size=cfg.val_size)
            if cfg.train_subset:
                plain = plain.subset(torch.arange(len(train_set)))
        held, rest = fixed_split(len(train_set), cfg.holdout_size, HOLDOUT_SPLIT_SEED)
        holdout_set, train_set = plain.subset(held), train_set.subset(rest)
    val_set = create_dataset(cfg.dataset, "val", root=cfg.data_root, val_size=cfg.val_size) if cfg.val_size else None
    test_set = create_dataset(cfg.dataset, "test", root=cfg.data_root, val_size=cfg.val_size)
    return train_set, holdout_set, val_set, test_set


def step_stats(loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, stop: StopSignals) -> tuple[float, int, int]:
    """The loss averaged over ranks, the correct count summed, and the stop signal any rank got (one all-reduce)."""
    local = [float(loss.detach()), float((logits.argmax(1) == y).sum()), *stop.flags()]
    stats = distributed.all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=loss.device)).tolist()
    return stats[0] / distributed.world_size(), int(stats[1]), requested(stats[2:])


def train(cfg: TrainConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Train one run into `run_dir` and return its summary (also written to summary.json).

    Under torchrun every process calls this: `batch_size` is the global batch, split evenly over the ranks;
    rank 0 alone writes the run folder. SIGINT/SIGTERM save a checkpoint and raise RunInterrupted.
    """
    with distributed.launch(resolve_device(cfg.device)) as device, StopSignals() as stop:
        return _train(cfg, Path(run_dir), resume, device, stop)


def _train(cfg: TrainConfig, run_dir: Path, resume: bool, device: torch.device, stop: StopSignals) -> dict[str, Any]:
    """The body of `train` on one rank, on `device`, watching `stop` for SIGINT/SIGTERM."""
    if resume and (run_dir / "summary.json").exists():  # finished: its results, if they are this config's
        try:  # every rank reads the same files: rank 0 says what is wrong
            check_resumed_config(cfg, run_dir)
            return json.loads((run_dir / "summary.json").read_text())
        except BidstError as exc:
            raise SharedError.of(exc) from None
        except (OSError, ValueError) as exc:  # ValueError: a truncated or undecodable file
            raise SharedError(f"{run_dir / 'summary.json'} cannot be read ({exc}): the finished run's results are "
                              "damaged; restore the file or train the run again in another folder") from exc
    try:
        check_config(cfg)
    except BidstError as exc:  # the same config fails the same way on every rank: rank 0 says so once
        raise SharedError.of(exc) from None
    world = distributed.world_size()
    if cfg.batch_size % world:
        raise SharedError(f"batch_size {cfg.batch_size} (the global batch) must be divisible by the {world} processes")
    # refuses before any work is done
    distributed.on_rank0(lambda: check_resumable(cfg, run_dir) if resume else check_new_run_dir(run_dir))
    if cfg.threads > 0:  # the sparse backend's Numba kernels too: more threads than free cores stall them
        set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # the same on every rank: same initial weights, same random streams
    run = Run(cfg, run_dir, device, stop)
    run.start(resume)  # only now: bad input never leaves a half-made run folder
    run.train()
    summary = run.summary()
    distributed.on_rank0(lambda: _write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n"))
    return summary


def _fresh_running() -> dict[str, Any]:
    return {"loss": 0.0, "correct": 0, "seen": 0}


@dataclass
class Progress:
    """Where the loop is and what it has recorded: the part of a checkpoint that is neither model, optimizer nor
    Sparsifier."""

    epoch: int = 0
    batch: int = 0  # the next batch of `epoch`
    best_val: float = -1.0
    skipped: int = 0  # steps skipped for a non-finite loss
    val_acc: float = math.nan
    test_acc: float = math.nan
    running: dict[str, Any] = field(default_factory=_fresh_running)  # this epoch's loss, correct and seen so far


class Run:
    """One run on one rank: its data, model, optimizer, Sparsifier and records, and the loop over epochs and steps."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, device: torch.device, stop: StopSignals) -> None:
        self.cfg, self.run_dir, self.device, self.stop = cfg, run_dir, device, stop
        self.rank, self.world = distributed.rank(), distributed.world_size()
        # data: each rank reads its DistributedSampler-style shard of every global batch
        info = dataset_info(cfg.dataset)
        self.train_set, holdout_set, self.val_set, self.test_set = distributed.each_node_first(lambda: load_data(cfg))
        self.steps_per_epoch = len(self.loader(0))
        if self.steps_per_epoch == 0:
            raise SharedError(f"batch_size {cfg.batch_size} is larger than the training set "
                              f"({len(self.train_set)} items)")
        self.total_steps = cfg.epochs * self.steps_per_epoch

        # model, optimizer, sparsifier
        self.net = create_model(cfg.model, num_classes=info.num_classes, in_channels=info.in_channels,
                                image_size=info.image_size).to(device)
        # DDP averages gradients over ranks (the sparse backend's Sparsifier does it itself: DDP cannot follow its
        # resized parameters); checkpoints hold `net`'s state
        self.model = self.net if cfg.backend == "sparse" else distributed.wrap(self.net, device)
        self.optimizer = make_optimizer(cfg, self.model)
        init_x, init_y = next(iter(self.loader(0)))
        init_x, init_y = init_x.to(device), init_y.to(device)
        self.sparsifier: Sparsifier = sparsify(
            self.model, self.optimizer, cfg.method, cfg.sparsity, total_steps=self.total_steps,
            distribution=cfg.distribution, steps_per_epoch=self.steps_per_epoch, dense_first=cfg.dense_first,
            dense_last=cfg.dense_last, seed=cfg.seed, init_batch=(init_x, init_y), backend=cfg.backend,
            holdout_batches=None if holdout_set is None else self._holdout_draw(holdout_set), **cfg.method_args,
        )
        if cfg.match_flops:  # fewer steps, so that forward/backward + the method's own work cost what the baseline does
            rows = {n: r * self.world for n, r in model_rows(self.model, init_x).items()}  # of the global batch
            baseline = create_method(cfg.match_flops, **cfg.match_flops_args)
            self.total_steps = self.sparsifier.total_steps = matched_steps(self.sparsifier, baseline, rows)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        # cost accounting: FLOPs of the sparse step (recomputed after topology changes) and the dense reference
        self.shapes = layer_shapes(self.net, init_x)
        self.shapes_batch = init_x.shape[0]  # the (per-rank) batch the per-layer shapes were measured with
        self.changeable_shapes = {n: self.shapes[n] for n in self.sparsifier.sparse_names()}
        self.dense_step_flops = dense_train_step_flops(self.shapes)
        self.step_flops, self.dense_grad = self._step_costs()
        self.meter = CostMeter(device)
        self.evolution = MaskEvolution(cfg.iou_interval, pooled=self.sparsifier.sparse_names())
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.ckpt_dir = run_dir / "checkpoints"
        self.progress = Progress()
        self.metrics = MetricsLog(None)
        # the batches of this epoch trained on, between steps; None inside a step (a held-out batch BiDST reads there
        # may fail when the step is half done)
        self.done: int | None = 0
        self.started = time.perf_counter()  # when training (not set-up) began: reset by `train`

    def loader(self, epoch: int, start_batch: int = 0) -> Any:
        """This rank's shard of the training batches of `epoch`, from batch `start_batch` on."""
        return make_loader(self.train_set, batch_size=self.cfg.batch_size // self.world, shuffle=True,
                           seed=self.cfg.seed, epoch=epoch, start_batch=start_batch, rank=self.rank,
                           world_size=self.world, drop_last=True, num_workers=self.cfg.num_workers)

    def _holdout_draw(self, holdout_set: Any) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
        """Held-out batch j on this rank's device, for methods that learn on data the weights do not train on."""
        draw = indexed_batches(holdout_set, batch_size=self.cfg.holdout_batch or self.cfg.batch_size,
                               seed=self.cfg.seed, rank=self.rank, world_size=self.world)

        def holdout_batches(j: int) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = draw(j)
            return x.to(self.device), y.to(self.device)

        return holdout_batches

    def _step_costs(self) -> tuple[dict[str, float], float]:
        """FLOPs of a training step at the current masks, and of a dense gradient (of the layers the method may
        change, as the plan counts it: a layer kept dense, or at density 1, has its whole gradient from the ordinary
        backward already; where budgets move between layers, which the plan cannot follow, every changeable layer
        counts)."""
        masks = self.sparsifier.masks
        step = train_step_flops(self.shapes, masks)
        if getattr(self.sparsifier.method, "moves_budgets", False):
            return step, dense_grad_flops(self.changeable_shapes)
        return step, dense_grad_flops(self.changeable_shapes, masks={n: masks[n] for n in self.changeable_shapes})

    def start(self, resume: bool) -> None:
        """Make the run folder (or take the existing one up again) and its metrics log; continue from the latest
        checkpoint if `resume` finds one."""
        distributed.on_rank0(lambda: prepare_run_dir(self.cfg, self.run_dir, resume))
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl" if self.rank == 0 else None)
        latest = latest_checkpoint(self.ckpt_dir) if resume else None  # every rank reads the run folder (shared)
        if latest is not None:
            self._resume(latest)
        else:
            self.metrics.truncate(0)
            self.metrics.write(self.evolution.update(self.sparsifier.masks, 0))
        p = self.progress
        place = torch.tensor([self.sparsifier.step_count, p.epoch, p.batch])
        if distributed.differing({"place": place}):  # each rank read the run folder itself
            raise SharedError("the processes resumed from different checkpoints (or some from none): the run folder "
                              "must be on storage that every node shares")
        self.done = p.batch

    def _resume(self, latest: Path) -> None:
        state = load_checkpoint(latest)
        check_checkpoint(state, self.cfg, latest)
        try:
            self.net.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise BidstError(f"checkpoint {latest} does not match this model: {str(exc).splitlines()[0]}") from None
        restore(latest, "sparsifier", lambda: self.sparsifier.load_state_dict(state["sparsifier"]))
        restore(latest, "scaler", lambda: self.scaler.load_state_dict(state["scaler"]))
        torch.set_rng_state(state["rng_cpu"])
        if self.device.type == "cuda" and state["rng_cuda"] is not None:
            torch.cuda.set_rng_state(state["rng_cuda"])
        running = dict(state["running"])
        lacking = sorted({"correct", "loss", "seen"} - set(running))
        if lacking:
            raise BidstError(f"checkpoint {latest} is damaged: its running epoch statistics lack {', '.join(lacking)}")
        self.progress = Progress(epoch=state["epoch"], batch=state["batch"], best_val=state["best_val"],
                                 skipped=state["skipped"], val_acc=state["val_acc"], test_acc=state["test_acc"],
                                 running=running)
        saved_threads = state.get("threads")  # absent in checkpoints written before it was saved
        if self.device.type == "cpu" and self.rank == 0 and saved_threads not in (None, torch.get_num_threads()):
            print(f"bidst: warning: the run ran on {saved_threads} CPU threads and continues on "
                  f"{torch.get_num_threads()}; its results will differ from an uninterrupted run's in float rounding "
                  f"(threads={saved_threads} continues it bit for bit)", file=sys.stderr)
        saved_world = state.get("processes", self.world)  # absent in checkpoints written before it was saved
        if self.rank == 0 and saved_world != self.world:
            print(f"bidst: warning: the run ran on {saved_world} process(es) and continues on {self.world}; its "
                  "results will differ from an uninterrupted run's in float rounding (gradients are averaged over "
                  "another count)", file=sys.stderr)
        restore(latest, "cost meter", lambda: self.meter.load_state_dict(state["meter"]))
        restore(latest, "mask evolution", lambda: self.evolution.load_state_dict(state["evolution"]))
        self.step_flops, self.dense_grad = self._step_costs()
        self.metrics.truncate(state["metrics_offset"])

    def checkpoint(self, next_batch: int) -> None:
        """Save everything to continue exactly before batch `next_batch` of the current epoch (rank 0 writes)."""
        def save() -> None:
            p = self.progress
            state = {
                "config": self.cfg.to_dict(), "model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "sparsifier": self.sparsifier.state_dict(), "scaler": self.scaler.state_dict(), "epoch": p.epoch,
                "batch": next_batch, "best_val": p.best_val, "running": dict(p.running), "skipped": p.skipped,
                "val_acc": p.val_acc, "test_acc": p.test_acc,
                "metrics_offset": self.metrics.offset(), "rng_cpu": torch.get_rng_state(),
                "meter": self.meter.state_dict(), "evolution": self.evolution.state_dict(),
                "rng_cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else None,
                "threads": torch.get_num_threads(),  # CPU reductions round differently on another thread count
                "processes": self.world,  # and DDP averages on another process count
            }
            self.metrics.sync()
            save_checkpoint(state, self.ckpt_dir, self.sparsifier.step_count, self.cfg.keep_checkpoints)

        distributed.on_rank0(save)

    def train(self) -> None:
        """Train to the end of the schedule, leaving a "stopped" record (and, where it can, a checkpoint) when the
        run stops on an error or a signal."""
        self.started = time.perf_counter()
        p = self.progress
        try:
            self.model.train()
            # a run stopped right after its last step (mid-epoch) still owes that epoch's evaluation and records
            while p.epoch < self.cfg.epochs and (self.sparsifier.step_count < self.total_steps or p.batch > 0):
                self._train_epoch()
                self._end_epoch()
            self.metrics.close()
        except DataError as exc:  # a file that cannot be read, between steps: keep the training done, to go on once
            if self.done is None or self.world > 1:  # it is replaced (under DDP the other ranks, still training,
                self.metrics.stopped(self.sparsifier.step_count, p.epoch, str(exc))  # cannot join in)
                raise
            self.checkpoint(self.done)
            failure = DataError(f"{exc}; the run saved a checkpoint: replace the file and continue with --resume")
            self.metrics.stopped(self.sparsifier.step_count, p.epoch, str(failure))
            raise failure from None
        except (BidstError, RunInterrupted) as exc:  # `bidst report` names the run with this reason
            self.metrics.stopped(self.sparsifier.step_count, p.epoch, str(exc))
            raise

    def _train_epoch(self) -> None:
        """The steps of the current epoch from `progress.batch` on, checkpointing on a stop signal or as configured."""
        cfg, p = self.cfg, self.progress
        bar = tqdm(self.loader(p.epoch, p.batch), total=self.steps_per_epoch, initial=p.batch,
                   desc=f"epoch {p.epoch + 1}/{cfg.epochs}", disable=not cfg.progress or self.rank > 0,
                   file=sys.stderr, leave=False, dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0)
        self.done = p.batch
        for batch_index, (x, y) in enumerate(bar, start=p.batch):
            self.done = None
            step = self.sparsifier.step_count
            if step >= self.total_steps:
                break
            stop_signal = self._step(step, batch_index, x, y, bar)
            self.done = batch_index + 1
            if stop_signal is None:  # skipped: a stop signal is honoured after the next step
                continue
            if stop_signal:
                self.checkpoint(self.done)
                raise RunInterrupted(stop_signal, self.sparsifier.step_count)
            every = cfg.checkpoint_every
            if every and (step + 1) % every == 0 and batch_index + 1 < self.steps_per_epoch:
                self.checkpoint(batch_index + 1)
        bar.close()
        self.done = self.steps_per_epoch

    def _step(self, step: int, batch_index: int, x: torch.Tensor, y: torch.Tensor, bar: Any) -> int | None:
        """One training step on batch (x, y) and its records; returns the stop signal any rank got (0 if none), or
        None for a step skipped for its non-finite loss."""
        cfg, p, world = self.cfg, self.progress, self.world
        lr = lr_at(cfg, step, self.steps_per_epoch, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with self.meter.time("forward"), autocast(cfg, self.device):
            logits = self.model(x)
            loss = self.loss_fn(logits, y)
        loss_value, correct, stop_signal = step_stats(loss, logits, y, self.stop)
        if not math.isfinite(loss_value):  # every rank sees the same averaged loss, so all stop or skip
            if cfg.on_nonfinite == "stop":
                kept = ("its last checkpoint is intact" if latest_checkpoint(self.ckpt_dir)
                        else "it had no checkpoint yet")
                raise SharedError(f"non-finite loss ({loss_value}) at step {step + 1}; the run stopped and "
                                  f"{kept} (continue it with --resume on_nonfinite=skip to skip such steps)")
            p.skipped += 1
            self.metrics.write({"kind": "skipped", "step": step, "epoch": p.epoch, "batch": batch_index})
            return None
        with self.meter.time("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
        with self.meter.time("update"):
            changed = self.sparsifier.step(self.scaler if self.scaler.is_enabled() else None, batch=(x, y))
        scale = y.numel() * world / self.shapes_batch  # FLOPs of the global batch, summed over ranks
        for phase, flops in self.step_flops.items():
            self.meter.add(phase, flops * scale)
        self.meter.add_dense_reference(self.dense_step_flops * scale)
        if self.sparsifier.captured_dense_grad:
            self.meter.add("dense_grad", self.dense_grad * scale)
        if changed:
            self.evolution.commit(self.sparsifier.last_swaps, self.sparsifier.masks)
            self.step_flops, self.dense_grad = self._step_costs()
        p.running["loss"] += loss_value * y.numel() * world
        p.running["correct"] += correct
        p.running["seen"] += y.numel() * world
        if (step + 1) % cfg.log_every == 0:
            self.metrics.write({"kind": "step", "step": step + 1, "epoch": p.epoch, "loss": loss_value, "lr": lr,
                                "topology_changes": self.sparsifier.topology_changes,
                                "rebuild_s": self.sparsifier.rebuild_seconds})
            bar.set_postfix(loss=f"{loss_value:.3f}")
        return stop_signal

    def _end_epoch(self) -> None:
        """Evaluate, record the epoch and checkpoint; a stop signal during evaluation keeps the epoch's training and
        owes its evaluation on resume."""
        cfg, p, sparsifier = self.cfg, self.progress, self.sparsifier
        distributed.broadcast_buffers(self.net)  # rank 0's BatchNorm statistics, which DDP trains with
        val, stop_signal = (evaluate(self.net, self.val_set, self.device, cfg, self.stop) if self.val_set is not None
                            else (math.nan, 0))
        if not stop_signal:
            test, stop_signal = evaluate(self.net, self.test_set, self.device, cfg, self.stop)
        if stop_signal:
            self.checkpoint(self.steps_per_epoch)
            raise RunInterrupted(stop_signal, sparsifier.step_count)
        p.val_acc, p.test_acc = val, test
        p.best_val = max(p.best_val, val) if self.val_set is not None else p.best_val
        self.metrics.write({
            "kind": "epoch", "epoch": p.epoch + 1, "step": sparsifier.step_count,
            "train_loss": p.running["loss"] / max(1, p.running["seen"]),
            "train_acc": 100.0 * p.running["correct"] / max(1, p.running["seen"]),
            "val_acc": None if self.val_set is None else p.val_acc, "test_acc": p.test_acc,
            "sparsity": sparsifier.measured_sparsity(), "topology_changes": sparsifier.topology_changes,
        })
        self.metrics.write(self.evolution.update(sparsifier.masks, p.epoch + 1))
        if cfg.progress and self.rank == 0:
            print(f"epoch {p.epoch + 1}/{cfg.epochs}: test {p.test_acc:.2f}%"
                  + ("" if self.val_set is None else f", val {p.val_acc:.2f}%")
                  + f", sparsity {100 * sparsifier.measured_sparsity():.1f}%", file=sys.stderr)
        p.epoch, p.batch, p.running = p.epoch + 1, 0, _fresh_running()
        self.checkpoint(0)

    def summary(self) -> dict[str, Any]:
        """The run's results, settings and costs, as summary.json holds them."""
        cfg, p, sparsifier, has_val = self.cfg, self.progress, self.sparsifier, self.val_set is not None
        return {
            "method": cfg.method, "sparsity": cfg.sparsity, "seed": cfg.seed, "model": cfg.model,
            "dataset": cfg.dataset, "epochs": cfg.epochs, "steps": sparsifier.step_count,
            "final_test_acc": p.test_acc, "final_val_acc": p.val_acc if has_val else None,
            "best_val_acc": p.best_val if has_val else None,
            "measured_sparsity": sparsifier.measured_sparsity(), "topology_changes": sparsifier.topology_changes,
            "skipped_steps": p.skipped, "processes": self.world,
            "method_costs": dict(sparsifier.costs),
            "method_stats": sparsifier.method.stats() if hasattr(sparsifier.method, "stats") else {},
            "layers": [
                {"name": r.name, "shape": list(r.shape), "target_density": r.target_density, "density": r.density}
                for r in sparsifier.report()
            ],
            "wall_time_s": time.perf_counter() - self.started,
            "backend": cfg.backend, "rebuild_s": sparsifier.rebuild_seconds,
            "inference_flops": inference_flops(self.shapes, sparsifier.masks),
            "dense_inference_flops": inference_flops(self.shapes),
            # against dense training of the recipe's whole schedule (full batches: drop_last), so a run that
            # match_flops shortened shows what it saved instead of its cost over fewer steps
            **self.meter.summary(extra_flops=sparsifier.costs,
                                 dense_total=self.dense_step_flops * self.world * cfg.epochs * self.steps_per_epoch),
        }
