"""Training and evaluation loops: :func:`fit` (one run, resumable, DDP-aware) and :func:`evaluate`.

A run folder (``output``) holds::

    config.yaml       the resolved configuration
    metrics.jsonl     one JSON object per epoch (train/val loss and accuracy, lr, temperature, throughput)
    checkpoint/       the last epoch's weights + training state (see dyconv.checkpoint)
    results.json      final numbers: test accuracy and loss, parameter count, timings
    attention.json    attention statistics on the test set (dynamic models only)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import checkpoint as ckpt
from ..data import BatchLoader, DataSplits, load_dataset
from ..temperature import TemperatureScheduler, dynamic_layers, get_temperature
from . import distributed
from .analysis import attention_statistics, uniform_attention
from .config import TrainConfig, parse_temperature, save_config
from .optim import build_optimizer, warmup_cosine

# Options that may differ between an interrupted run and its resumption without changing the result.
RUN_CONTROL = {"resume", "stop_after", "progress", "device", "num_workers", "data_dir", "output", "download",
               "threads"}


def _default_create_model() -> Callable[..., nn.Module]:
    try:
        from ..models import create_model
    except ImportError as e:
        raise RuntimeError("The model registry (dyconv.models) is not available; pass create_model=.") from e
    return create_model


def model_kwargs_for(config: TrainConfig, data: DataSplits) -> dict[str, Any]:
    """``create_model`` keyword arguments: the dataset's classes and channels (and, for images, whether to use
    the small-input stem), overridden by ``config.model_kwargs``."""
    kwargs: dict[str, Any] = {"num_classes": data.num_classes, "in_channels": data.in_channels}
    if len(data.input_size) == 2:
        kwargs["small_input"] = data.small_input
    kwargs.update(config.model_kwargs)
    return kwargs


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _autocast(device: torch.device, config: TrainConfig):
    if not config.amp:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if config.amp_dtype == "bfloat16" else torch.float16
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError("amp_dtype='float16' needs CUDA; use bfloat16 on CPU. Received: amp_dtype='float16'")
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, batches, device: torch.device | str = "cpu", *, autocast=None) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` (eval mode) over ``batches``, summed over all
    processes when distributed. Returns ``{"loss", "acc", "samples"}``."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loss_sum = correct = n = 0.0
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast or contextlib.nullcontext():
                logits = model(x)
            loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            correct += float((logits.argmax(1) == y).sum())
            n += y.numel()
    finally:
        model.train(was_training)
    loss_sum, correct, n = distributed.all_reduce_sum([loss_sum, correct, n], device)
    return {"loss": loss_sum / max(n, 1), "acc": correct / max(n, 1), "samples": int(n)}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class _Progress:
    """tqdm bar on the main process (plain per-epoch lines when disabled or not installed)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def start(self, total: int, desc: str):
        if not self.enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            self.enabled = False
            return
        self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False, file=sys.stderr)

    def update(self, **postfix):
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _config_mismatch(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    current = config.to_dict()
    return [k for k in current if k not in RUN_CONTROL and saved.get(k, current[k]) != current[k]]


def fit(config: TrainConfig | None = None, *, create_model: Callable[..., nn.Module] | None = None,
        **options) -> dict[str, Any]:
    """Train ``config.model`` on ``config.dataset`` and write the run folder ``config.output``.

    Args:
        config: the recipe; keyword ``options`` override its fields (or build one from scratch).
        create_model: model builder ``(name, **kwargs)``; default :func:`dyconv.create_model`.

    Returns:
        The final results (also written to ``results.json``): ``test_acc``, ``test_loss``, ``val_acc``,
        ``params``, ``history`` (per-epoch metrics), ``output``, ... When the run stops early because of
        ``stop_after``, ``finished`` is ``False`` and there are no test numbers.

    Example:
        >>> results = fit(model="dy_resnet10", dataset="fashion-mnist", epochs=5, output="runs/dy_resnet10")
        >>> results["test_acc"]
    """
    if config is None:
        config = TrainConfig(**options)
    elif options:
        config = TrainConfig.from_dict({**config.to_dict(), **options})
    if not config.model:
        raise ValueError("No model given. Received: model=''")
    create_model = create_model or _default_create_model()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    info, device = distributed.init_distributed(config.device)
    try:
        results = _fit(config, create_model, info, device)
        # every process leaves together: rank 0 alone still works after the test set (attention statistics, the
        # results file), and one CI run saw the other rank abort in gloo's teardown at exit after finishing first
        distributed.barrier()
        return results
    finally:
        distributed.cleanup()


def _fit(config: TrainConfig, create_model, info: distributed.DistInfo, device: torch.device) -> dict[str, Any]:
    out = Path(config.output)
    ckpt_dir = out / "checkpoint"
    resume_state = None
    if config.resume:
        try:
            resume_state = ckpt.load_training_state(ckpt_dir)
        except ckpt.CheckpointError as e:
            if "does not exist" not in str(e) and "No checkpoint" not in str(e):
                raise
            resume_state = None  # nothing to resume yet: start from scratch
    elif (ckpt_dir / ckpt.MANIFEST).exists():
        raise ValueError(f"{str(out)!r} already holds a checkpoint. Pass resume=True (--resume) to continue it, "
                         f"or choose another output folder. Received: output={config.output!r}")
    if resume_state is not None:
        mismatch = _config_mismatch(resume_state["config"], config)
        if mismatch:
            raise ValueError(f"Cannot resume {str(out)!r} with a different recipe; changed option(s): "
                             + ", ".join(f"{k}={getattr(config, k)!r} (was {resume_state['config'].get(k)!r})"
                                         for k in mismatch))

    seed_everything(config.seed)
    data = load_dataset(config.dataset, config.data_dir, val_fraction=config.val_fraction,
                        split_seed=config.split_seed, train_subset=config.train_subset,
                        image_size=config.image_size, download=config.download)
    model_kwargs = model_kwargs_for(config, data)
    seed_everything(config.seed)  # the weights depend only on the seed, not on what loading the data consumed
    model = create_model(config.model, **model_kwargs).to(device)
    raw_model = model
    if config.sync_bn and info.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        raw_model = model
    if info.enabled:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    loader_args = dict(mean=data.mean, std=data.std, rank=info.rank, world_size=info.world_size,
                       num_workers=config.num_workers)
    train_loader = BatchLoader(data.train, config.batch_size, train=True, augment=data.augment, seed=config.seed,
                               limit_batches=config.limit_train_batches, **loader_args)
    eval_bs = max(config.batch_size, 256)
    val_loader = BatchLoader(data.val, eval_bs, train=False, **loader_args) if len(data.val) else None
    test_loader = BatchLoader(data.test, eval_bs, train=False, **loader_args)
    if len(train_loader) == 0:
        raise ValueError(f"The training split ({len(data.train)} samples per {info.world_size} process(es)) is "
                         f"smaller than one batch. Received: batch_size={config.batch_size}")

    steps_per_epoch = len(train_loader)
    optimizer = build_optimizer(raw_model, config.optimizer, config.lr, config.weight_decay, config.momentum)
    lr_schedule = warmup_cosine(optimizer, config.epochs * steps_per_epoch,
                                int(round(config.warmup_epochs * steps_per_epoch)),
                                config.min_lr / config.lr)
    t_start, t_end, t_epochs = parse_temperature(config.temperature, config.epochs)
    temperature = (TemperatureScheduler(raw_model, t_start, t_end, t_epochs, steps_per_epoch)
                   if dynamic_layers(raw_model) else None)
    scaler = torch.amp.GradScaler(device.type) if config.amp and config.amp_dtype == "float16" else None
    _autocast(device, config)  # fails early on an impossible amp setting; a fresh context is made per use

    history: list[dict[str, Any]] = []
    start_epoch = 0
    if resume_state is not None:
        raw_model.load_state_dict(ckpt.load_state_dict(ckpt_dir))
        optimizer.load_state_dict(resume_state["optimizer"])
        lr_schedule.load_state_dict(resume_state["lr_schedule"])
        if temperature is not None:
            temperature.load_state_dict(resume_state["temperature"])
        if scaler is not None and resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        history = json.loads(resume_state["history"])
        start_epoch = int(resume_state["epoch"])
        _set_rng_state(resume_state["rng"])

    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
        _write_history(out, history)
    params = count_parameters(raw_model)
    log = _Logger(info.is_main, config.progress)
    if start_epoch == 0:
        log.line(f"{config.model} on {config.dataset}: {params:,} parameters, {len(data.train)} train / "
                 f"{len(data.val)} val / {len(data.test)} test samples, {steps_per_epoch} steps per epoch, "
                 f"{info.world_size} process(es) on {device}")
    else:
        log.line(f"resuming {str(out)!r} at epoch {start_epoch + 1}/{config.epochs}")

    last_epoch = config.epochs if config.stop_after is None else min(config.epochs, start_epoch + config.stop_after)
    train_time = sum(h.get("epoch_time_s", 0.0) for h in history)
    for epoch in range(start_epoch, last_epoch):
        train_loader.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        loss_sum = correct = seen = 0.0
        log.progress.start(steps_per_epoch, f"epoch {epoch + 1}/{config.epochs}")
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with _autocast(device, config):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"Training loss became {loss.item()} at epoch {epoch + 1}; lower the lr "
                                         f"(lr={config.lr}) or disable amp.")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            lr_schedule.step()
            if temperature is not None:
                temperature.step()
            n = y.numel()
            loss_sum += loss.item() * n
            correct += float((logits.argmax(1) == y).sum())
            seen += n
            elapsed = time.perf_counter() - t0
            shown = {"loss": f"{loss_sum / seen:.4f}", "acc": f"{correct / seen:.4f}",
                     "samples/s": f"{seen * info.world_size / max(elapsed, 1e-9):.0f}"}
            tau = get_temperature(raw_model)
            if tau is not None:  # static models have no temperature
                shown["tau"] = f"{tau:.2f}"
            log.progress.update(**shown)
        log.progress.close()
        distributed.broadcast_buffers(raw_model)
        epoch_time = time.perf_counter() - t0
        train_time += epoch_time
        loss_sum, correct, seen = distributed.all_reduce_sum([loss_sum, correct, seen], device)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                  "lr": optimizer.param_groups[0]["lr"], "temperature": get_temperature(raw_model),
                  "epoch_time_s": epoch_time, "samples_per_s": seen / epoch_time}
        if val_loader is not None:
            v = evaluate(raw_model, val_loader, device, autocast=_autocast(device, config))
            record.update(val_loss=v["loss"], val_acc=v["acc"])
        history.append(record)
        log.line(f"epoch {epoch + 1}/{config.epochs}: train loss {record['train_loss']:.4f} acc "
                 f"{record['train_acc']:.4f}" + (f" | val loss {record['val_loss']:.4f} acc {record['val_acc']:.4f}"
                                                 if "val_acc" in record else "")
                 + f" | lr {record['lr']:.4g}" + (f" tau {record['temperature']:.2f}" if temperature else "")
                 + f" | {record['samples_per_s']:.0f} samples/s, {epoch_time:.1f}s")
        if info.is_main:
            state = {"epoch": epoch + 1, "optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict(),
                     "temperature": temperature.state_dict() if temperature else {},
                     "scaler": scaler.state_dict() if scaler else {}, "rng": _rng_state(),
                     "history": json.dumps(history), "config": config.to_dict()}
            ckpt.save_checkpoint(ckpt_dir, raw_model, model_name=config.model, model_kwargs=model_kwargs,
                                 training_state=state, extra={"epoch": epoch + 1, "dataset": config.dataset,
                                                              "val_acc": record.get("val_acc")})
            _write_history(out, history)
        distributed.barrier()

    results: dict[str, Any] = {
        "model": config.model, "dataset": config.dataset, "model_kwargs": model_kwargs, "seed": config.seed,
        "epochs": config.epochs, "epochs_done": len(history), "finished": len(history) >= config.epochs,
        "params": params, "train_samples": len(data.train), "train_time_s": train_time,
        "val_acc": history[-1].get("val_acc") if history else None,
        "temperature": get_temperature(raw_model), "history": history, "output": str(out),
    }
    if results["finished"] and config.eval_test:
        t = evaluate(raw_model, test_loader, device, autocast=_autocast(device, config))
        results.update(test_acc=t["acc"], test_loss=t["loss"], test_samples=t["samples"])
        log.line(f"test: loss {t['loss']:.4f} acc {t['acc']:.4f} ({t['samples']} samples)")
        if temperature is not None and config.attention_stats and info.is_main:
            # Single-process pass over the whole test set (the statistics are not reduced across ranks).
            full_test = BatchLoader(data.test, eval_bs, data.mean, data.std, train=False)
            stats = attention_statistics(raw_model, full_test, data.num_classes, device)
            stats["classes"] = data.classes
            (out / "attention.json").write_text(json.dumps(stats))
    if info.is_main:
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _write_history(out: Path, history: list[dict[str, Any]]) -> None:
    tmp = out / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
    os.replace(tmp, out / "metrics.jsonl")


class _Logger:
    def __init__(self, is_main: bool, progress: bool):
        self.is_main = is_main
        self.progress = _Progress(is_main and progress)

    def line(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)


def evaluate_checkpoint(path: str | os.PathLike, dataset: str, *, data_dir: str | None = None,
                        split: str = "test", batch_size: int = 256, val_fraction: float = 0.1, split_seed: int = 0,
                        image_size: int = 32, attention: str = "dynamic", device: str = "auto",
                        create_model: Callable[..., nn.Module] | None = None) -> dict[str, float]:
    """Top-1 and loss of the checkpoint at ``path`` on ``split`` (``test`` or ``val``) of ``dataset``.

    ``attention="uniform"`` evaluates with every attention replaced by 1/K (experts averaged).
    """
    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val'. Received: split={split!r}")
    if attention not in ("dynamic", "uniform"):
        raise ValueError(f"attention must be 'dynamic' or 'uniform'. Received: attention={attention!r}")
    info, dev = distributed.init_distributed(device)
    model = ckpt.load_model(path, create_model=create_model or _default_create_model(), map_location=dev)
    data = load_dataset(dataset, data_dir, val_fraction=val_fraction, split_seed=split_seed, image_size=image_size)
    loader = BatchLoader(getattr(data, split), batch_size, data.mean, data.std, train=False, rank=info.rank,
                         world_size=info.world_size)
    with uniform_attention(model) if attention == "uniform" else contextlib.nullcontext():
        return evaluate(model, loader, dev)
