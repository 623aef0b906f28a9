"""The training recipe: data, model, optimizer, one Sparsifier, metrics, checkpoints. Read it in one sitting."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm import tqdm

from .budget import layer_rows, matched_steps
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig, build_config
from .data import create_dataset, dataset_info, make_loader
from .engine import Sparsifier, sparsify
from .errors import BidstError
from .models import create_model

# config keys that may differ between a run and its resumption (they do not change the result)
RESUMABLE_KEYS = {"progress", "threads", "num_workers", "log_every", "checkpoint_every", "keep_checkpoints", "device"}


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
def evaluate(model: nn.Module, loader: Any, device: torch.device, cfg: TrainConfig) -> float:
    """Top-1 accuracy in percent."""
    was_training = model.training
    model.eval()
    correct = seen = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(cfg, device):
            correct += int((model(x).argmax(1) == y).sum())
        seen += y.numel()
    model.train(was_training)
    return 100.0 * correct / max(1, seen)


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl, flushed at once; truncatable for resume."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def offset(self) -> int:
        return self.file.tell()

    def truncate(self, offset: int) -> None:
        self.file.truncate(offset)
        self.file.seek(offset)

    def close(self) -> None:
        self.file.close()


def _write_json(path: Path, data: Any) -> None:
    """Write JSON to a temporary file and rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def prepare_run_dir(cfg: TrainConfig, run_dir: Path, resume: bool) -> TrainConfig:
    """Create the run folder (refusing to reuse a non-empty one) or check a resumed run's config."""
    config_file = run_dir / "config.yaml"
    if resume:
        if not config_file.exists():
            raise BidstError(f"cannot resume: {run_dir} holds no config.yaml")
        saved = build_config(yaml.safe_load(config_file.read_text()))
        diff = [k for k, v in cfg.to_dict().items() if k not in RESUMABLE_KEYS and saved.to_dict()[k] != v]
        if diff:
            raise BidstError(f"cannot resume {run_dir}: config differs from the saved run in {', '.join(diff)}")
        return cfg
    if run_dir.exists() and any(run_dir.iterdir()):
        raise BidstError(f"run folder {run_dir} already exists and is not empty; use --resume or another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = config_file.with_name("config.yaml.tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, config_file)
    return cfg


def train(cfg: TrainConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Train one run into `run_dir` and return its summary (also written to summary.json)."""
    run_dir = Path(run_dir)
    if resume and (run_dir / "summary.json").exists():
        return json.loads((run_dir / "summary.json").read_text())
    prepare_run_dir(cfg, run_dir, resume)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    # data
    info = dataset_info(cfg.dataset)
    train_set = create_dataset(cfg.dataset, "train", root=cfg.data_root, val_size=cfg.val_size, augment=cfg.augment)
    if cfg.train_subset:
        train_set = train_set.subset(torch.arange(min(cfg.train_subset, len(train_set))))
    val_set = create_dataset(cfg.dataset, "val", root=cfg.data_root, val_size=cfg.val_size) if cfg.val_size else None
    test_set = create_dataset(cfg.dataset, "test", root=cfg.data_root, val_size=cfg.val_size)

    def train_loader(epoch: int, start_batch: int = 0) -> Any:
        return make_loader(train_set, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                           start_batch=start_batch, drop_last=True, num_workers=cfg.num_workers)

    def eval_loader(dataset: Any) -> Any:
        return make_loader(dataset, batch_size=512, shuffle=False, seed=0, epoch=0, num_workers=cfg.num_workers)

    steps_per_epoch = len(train_loader(0))
    if steps_per_epoch == 0:
        raise BidstError(f"batch_size {cfg.batch_size} is larger than the training set ({len(train_set)} items)")
    total_steps = cfg.epochs * steps_per_epoch

    # model, optimizer, sparsifier
    model = create_model(cfg.model, num_classes=info.num_classes, in_channels=info.in_channels,
                         image_size=info.image_size).to(device)
    optimizer = make_optimizer(cfg, model)
    init_x, init_y = next(iter(train_loader(0)))
    sparsifier: Sparsifier = sparsify(
        model, optimizer, cfg.method, cfg.sparsity, total_steps=total_steps, distribution=cfg.distribution,
        steps_per_epoch=steps_per_epoch, dense_first=cfg.dense_first, dense_last=cfg.dense_last, seed=cfg.seed,
        init_batch=(init_x.to(device), init_y.to(device)), **cfg.method_args,
    )
    if cfg.match_flops:  # fewer steps, so that forward/backward + the method's own work cost what the baseline does
        rows = layer_rows(model, sparsifier.modules, init_x.to(device))
        total_steps = sparsifier.total_steps = matched_steps(sparsifier, cfg.match_flops, rows)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    metrics = MetricsLog(run_dir / "metrics.jsonl")
    epoch, start_batch, best_val = 0, 0, -1.0
    running = {"loss": 0.0, "correct": 0, "seen": 0}
    ckpt_dir = run_dir / "checkpoints"
    latest = latest_checkpoint(ckpt_dir) if resume else None
    if latest is not None:
        state = load_checkpoint(latest, map_location=device)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise BidstError(f"checkpoint {latest} does not match this model: {str(exc).splitlines()[0]}") from None
        sparsifier.load_state_dict(state["sparsifier"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"])
        epoch, start_batch, best_val = state["epoch"], state["batch"], state["best_val"]
        running = dict(state["running"])
        metrics.truncate(state["metrics_offset"])
    elif resume:
        metrics.truncate(0)

    def checkpoint(next_batch: int) -> None:
        state = {
            "config": cfg.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "sparsifier": sparsifier.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
            "batch": next_batch, "best_val": best_val, "running": dict(running),
            "metrics_offset": metrics.offset(), "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
        }
        save_checkpoint(state, ckpt_dir, sparsifier.step_count, cfg.keep_checkpoints)

    started = time.perf_counter()
    model.train()
    val_acc = test_acc = float("nan")
    while epoch < cfg.epochs and sparsifier.step_count < total_steps:
        loader = train_loader(epoch, start_batch)
        bar = tqdm(loader, total=steps_per_epoch, initial=start_batch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not cfg.progress, file=sys.stderr, leave=False, dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 10.0)
        for batch_index, (x, y) in enumerate(bar, start=start_batch):
            step = sparsifier.step_count
            if step >= total_steps:
                break
            lr = lr_at(cfg, step, steps_per_epoch, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(cfg, device):
                logits = model(x)
                loss = loss_fn(logits, y)
            if not torch.isfinite(loss.detach()):
                raise BidstError(f"non-finite loss {loss.item()} at step {step + 1}; the last checkpoint is intact")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            sparsifier.step(scaler if scaler.is_enabled() else None, batch=(x, y))
            loss_value = float(loss.detach())
            running["loss"] += loss_value * y.numel()
            running["correct"] += int((logits.argmax(1) == y).sum())
            running["seen"] += y.numel()
            if (step + 1) % cfg.log_every == 0:
                metrics.write({"kind": "step", "step": step + 1, "epoch": epoch, "loss": loss_value, "lr": lr,
                               "topology_changes": sparsifier.topology_changes})
                bar.set_postfix(loss=f"{loss_value:.3f}")
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and batch_index + 1 < steps_per_epoch:
                checkpoint(batch_index + 1)
        bar.close()
        val_acc = evaluate(model, eval_loader(val_set), device, cfg) if val_set is not None else float("nan")
        test_acc = evaluate(model, eval_loader(test_set), device, cfg)
        best_val = max(best_val, val_acc) if val_set is not None else best_val
        metrics.write({
            "kind": "epoch", "epoch": epoch + 1, "step": sparsifier.step_count,
            "train_loss": running["loss"] / max(1, running["seen"]),
            "train_acc": 100.0 * running["correct"] / max(1, running["seen"]),
            "val_acc": None if val_set is None else val_acc, "test_acc": test_acc,
            "sparsity": sparsifier.measured_sparsity(), "topology_changes": sparsifier.topology_changes,
        })
        if cfg.progress:
            print(f"epoch {epoch + 1}/{cfg.epochs}: test {test_acc:.2f}%"
                  + ("" if val_set is None else f", val {val_acc:.2f}%")
                  + f", sparsity {100 * sparsifier.measured_sparsity():.1f}%", file=sys.stderr)
        epoch, start_batch = epoch + 1, 0
        running = {"loss": 0.0, "correct": 0, "seen": 0}
        checkpoint(0)
    metrics.close()

    summary = {
        "method": cfg.method, "sparsity": cfg.sparsity, "seed": cfg.seed, "model": cfg.model,
        "dataset": cfg.dataset, "epochs": cfg.epochs, "steps": sparsifier.step_count,
        "final_test_acc": test_acc, "final_val_acc": None if val_set is None else val_acc,
        "best_val_acc": None if val_set is None else best_val,
        "measured_sparsity": sparsifier.measured_sparsity(), "topology_changes": sparsifier.topology_changes,
        "method_costs": dict(sparsifier.costs),
        "layers": [
            {"name": r.name, "shape": list(r.shape), "target_density": r.target_density, "density": r.density}
            for r in sparsifier.report()
        ],
        "wall_time_s": time.perf_counter() - started,
    }
    _write_json(run_dir / "summary.json", summary)
    return summary
