"""Checkpoints: weights as safetensors, training state, and a manifest that rebuilds the model.

A checkpoint is a directory::

    checkpoint/
        manifest.json        format, model name + keyword arguments, SHA-256 and size of every file below
        model.safetensors    the model's ``state_dict`` (temperature buffers included)
        training_state.pt    optional: optimizer, schedulers, temperature schedule, epoch, RNG states

The directory is written next to its final place under a temporary name and renamed into place, so a
reader never sees a half-written checkpoint; a file truncated or altered afterwards no longer matches its
SHA-256 in the manifest and is refused with :class:`CheckpointError`.

Example:
    >>> save_checkpoint("runs/a/checkpoint", model, model_name="dy_resnet10",
    ...                 model_kwargs={"num_classes": 10, "in_channels": 1, "small_input": True})
    >>> model = load_model("runs/a")        # a run folder, a checkpoint folder or one of its files
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "dyconv-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
TRAINING_STATE = "training_state.pt"
# Where a run folder (``dyconv train --output DIR``) keeps its checkpoints, in the order load_model tries them.
RUN_CHECKPOINTS = ("checkpoint", "best")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupted or of an unknown format."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    # The rename is only durable once the directory entry itself reaches the disk.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _weights_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights, views); each entry gets its own copy.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(directory: str | os.PathLike, model: nn.Module, *, model_name: str,
                    model_kwargs: Mapping[str, Any] | None = None, training_state: Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` (and optionally the training state) to the checkpoint folder ``directory``, atomically.

    Args:
        directory: the checkpoint folder to create or replace.
        model: the module whose ``state_dict`` is saved (unwrap DDP first).
        model_name: the registry name that :func:`dyconv.create_model` rebuilds it from.
        model_kwargs: JSON-serialisable keyword arguments of ``create_model`` (``num_classes``, ...).
        training_state: anything ``torch.save`` can store with ``weights_only`` loading (tensors, numbers,
            strings, lists, dicts): optimizer and scheduler state dicts, epoch, RNG states.
        extra: JSON-serialisable information stored in the manifest (config, metrics).

    Returns:
        The checkpoint folder.
    """
    directory = Path(directory)
    model_kwargs = dict(model_kwargs or {})
    try:
        json.dumps(model_kwargs)
        json.dumps(dict(extra or {}))
    except TypeError as e:
        raise TypeError(f"model_kwargs and extra must be JSON-serialisable ({e}). Received: "
                        f"model_kwargs={model_kwargs!r}") from None
    from safetensors.torch import save_file

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        save_file(_weights_for_saving(model), str(tmp / WEIGHTS), metadata={"format": FORMAT})
        files = [WEIGHTS]
        if training_state is not None:
            torch.save(dict(training_state), tmp / TRAINING_STATE)
            files.append(TRAINING_STATE)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": model_name,
            "model_kwargs": model_kwargs,
            "files": {name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size} for name in files},
            "extra": dict(extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        for name in [*files, MANIFEST]:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        # Swap in: the old checkpoint is moved aside (not deleted) until the new one is in place, so a crash
        # at any moment leaves either the old or the new checkpoint readable (load falls back to ``.old``).
        old = directory.with_name(directory.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        _fsync_dir(directory.parent)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _checkpoint_dir(path: Path) -> Path:
    """The checkpoint folder that ``path`` (run folder, checkpoint folder or a file in one) designates."""
    if path.is_file():
        return path.parent
    if (path / MANIFEST).is_file():
        return path
    for name in RUN_CHECKPOINTS:
        if (path / name / MANIFEST).is_file():
            return path / name
    old = path.with_name(path.name + ".old")
    if not path.exists() and (old / MANIFEST).is_file():
        return old  # interrupted between the two renames of save_checkpoint
    for name in RUN_CHECKPOINTS:
        if (path / (name + ".old") / MANIFEST).is_file():
            return path / (name + ".old")
    if not path.exists():
        raise CheckpointError(f"No checkpoint at {str(path)!r}: the path does not exist.")
    raise CheckpointError(
        f"No checkpoint at {str(path)!r}: expected a checkpoint folder containing {MANIFEST}, a file inside one, "
        f"or a run folder with one of the subfolders {list(RUN_CHECKPOINTS)}.")


def read_manifest(path: str | os.PathLike, *, verify: bool = True) -> tuple[Path, dict[str, Any]]:
    """Locate the checkpoint for ``path``, read its manifest and (by default) verify every file's SHA-256.

    Returns:
        ``(checkpoint folder, manifest dict)``.

    Raises:
        CheckpointError: missing folder or file, unknown format, or a size/SHA-256 mismatch.
    """
    directory = _checkpoint_dir(Path(path))
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"Checkpoint {str(directory)!r} has an unreadable {MANIFEST} ({e}).") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{str(directory / MANIFEST)!r} is not a dyconv checkpoint manifest. Received: "
                              f"format={manifest.get('format') if isinstance(manifest, dict) else None!r}")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"Checkpoint {str(directory)!r} has format_version={manifest['format_version']}; "
                              f"this dyconv reads up to {FORMAT_VERSION}. Upgrade dyconv.")
    if verify:
        for name, info in manifest.get("files", {}).items():
            file = directory / name
            if not file.is_file():
                raise CheckpointError(f"Checkpoint {str(directory)!r} is incomplete: {name} is missing.")
            size = file.stat().st_size
            if size != info["bytes"]:
                raise CheckpointError(
                    f"Checkpoint file {str(file)!r} is truncated or corrupted: {size} bytes, the manifest "
                    f"records {info['bytes']}. Re-create the checkpoint (e.g. resume from an earlier copy).")
            if _sha256(file) != info["sha256"]:
                raise CheckpointError(
                    f"Checkpoint file {str(file)!r} is corrupted: its SHA-256 does not match the manifest. "
                    f"Re-create the checkpoint (e.g. resume from an earlier copy).")
    return directory, manifest


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The verified weights of the checkpoint at ``path`` as a ``state_dict`` (CPU tensors)."""
    from safetensors.torch import load_file

    directory, manifest = read_manifest(path)
    if WEIGHTS not in manifest.get("files", {}):
        raise CheckpointError(f"Checkpoint {str(directory)!r} lists no {WEIGHTS}.")
    return load_file(str(directory / WEIGHTS))


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """The verified training state (optimizer, schedulers, epoch, RNG) of the checkpoint at ``path``."""
    directory, manifest = read_manifest(path)
    if TRAINING_STATE not in manifest.get("files", {}):
        raise CheckpointError(f"Checkpoint {str(directory)!r} has no training state (it holds weights only), "
                              f"so training cannot resume from it.")
    return torch.load(directory / TRAINING_STATE, map_location="cpu", weights_only=True)


def load_model(path: str | os.PathLike, *, create_model: Callable[..., nn.Module] | None = None,
               map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model saved at ``path`` and load its verified weights; returned in eval mode.

    Args:
        path: a run folder (``dyconv train --output``), a checkpoint folder, or a file inside one.
        create_model: builds the model from ``(name, **model_kwargs)``; default :func:`dyconv.create_model`.
        map_location: device to put the model on.

    Example:
        >>> model = load_model("runs/dy_resnet10")
        >>> logits = model(images)
    """
    directory, manifest = read_manifest(path)
    if create_model is None:
        try:
            from .models import create_model
        except ImportError as e:
            raise CheckpointError("The model registry (dyconv.models) is not available; pass create_model=.") from e
    model = create_model(manifest["model"], **manifest.get("model_kwargs", {}))
    model.load_state_dict(load_state_dict(directory), strict=True)
    return model.to(map_location).eval()
