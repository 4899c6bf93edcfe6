"""Atomic checkpoints, exact resume, and export.

A checkpoint is a folder under the run's log dir::

    <log_path>/checkpoints/step_000010/
        state.json          step, data position, metrics state, config (JSON, human-readable)
        adapter/            the PEFT adapter (LoRA runs): adapter_config.json + safetensors
        model.safetensors   all weights (full fine-tuning runs)
        optimizer.pt        optimizer state
        scheduler.pt        LR scheduler state
        rng.pt              python, numpy, torch CPU and CUDA generator states

It is written into a hidden temporary folder next to its final place, every file fsynced, then
renamed into place: a folder named ``step_*`` is always complete, and a crash mid-write leaves
only a hidden temporary (removed by the next save) and the previous checkpoints intact.

Restoring all of it (:func:`load_checkpoint`) makes a resumed run continue exactly as an
uninterrupted one, provided the trainer keeps its data position in ``data_state`` and builds
the same model, optimizer and scheduler before loading. For LoRA runs the base weights are not
saved: they come from the base model, loaded again on resume.

Export for serving: :func:`export_adapter` (a PEFT adapter folder, e.g. for vLLM's LoRA
support) and :func:`export_merged` (a plain model folder ``AutoModelForCausalLM`` loads as is).
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from training.errors import CheckpointError

CHECKPOINTS = "checkpoints"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TEMP_PREFIX = ".tmp-"


@dataclass
class TrainingState:
    """What a run needs besides tensors to resume exactly. All fields must be JSON."""

    step: int
    """Optimizer steps completed."""
    data_state: dict[str, Any] = field(default_factory=dict)
    """The dataset's position (e.g. epoch, index, shuffle seed): where the next batch comes from."""
    metrics_state: dict[str, Any] = field(default_factory=dict)
    """Running metrics to carry on (first-step KL, best eval, counters, ...)."""
    config: dict[str, Any] = field(default_factory=dict)
    """The run's config, as dumped by ``recipes.cli.dump_config``."""


# ----------------------------------------------------------------------------- locating


def checkpoints_dir(log_path: str | Path) -> Path:
    return Path(log_path) / CHECKPOINTS


def list_checkpoints(log_path: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_dir(log_path)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / "state.json").is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(log_path: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(log_path)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the newest checkpoint of a log dir."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(
            f"no checkpoint at {path}: expected a checkpoint folder (with state.json) or a run's "
            f"log dir with {CHECKPOINTS}/step_*"
        )
    return latest


def later_checkpoints(log_path: str | Path, checkpoint: str | Path) -> list[Path]:
    """The checkpoints of the run in ``log_path`` newer than ``checkpoint``: a run resumed
    there from ``checkpoint`` would leave them to be mixed with its own (a later
    ``resume=true`` would pick one of them)."""
    match = _STEP_DIR.match(Path(checkpoint).name)
    if match is None:
        return []
    step = int(match.group(1))
    return [p for p in list_checkpoints(log_path) if int(p.name.split("_")[-1]) > step]


def refuse_later_checkpoints(log_path: str | Path, checkpoint: str | Path) -> None:
    """``CheckpointError`` when resuming ``checkpoint`` into ``log_path`` would mix two runs."""
    later = later_checkpoints(log_path, checkpoint)
    if later:
        names = ", ".join(p.name for p in later[:3]) + (", ..." if len(later) > 3 else "")
        raise CheckpointError(
            f"{checkpoint} is not the newest checkpoint of the run in {log_path} (later: "
            f"{names}); continuing there would mix the two futures. Continue the newest with "
            "resume=true, or branch from this one into a new folder with log_path=NEW_FOLDER"
        )


# ----------------------------------------------------------------------------- writing


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(Path(folder) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Delete a folder without ever leaving it half-deleted under its visible name."""
    hidden = path.with_name(f"{_TEMP_PREFIX}delete-{path.name}-{os.getpid()}-{time.time_ns()}")
    path.rename(hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def _write_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a fresh hidden folder beside ``final``, fsync it, then rename it to
    ``final`` (replacing an older one). On any error the temporary folder is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{final.name}-", dir=final.parent))
    try:
        write(tmp)
        _fsync_tree(tmp)
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _remove_stale_temporaries(root: Path) -> None:
    """Leftovers of a process that died mid-write."""
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(_TEMP_PREFIX):
                shutil.rmtree(child, ignore_errors=True)


def _is_peft(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # One state per visible device; a resume on fewer devices restores those it has.
        for device, device_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, device)


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)


def save_checkpoint(
    log_path: str | Path,
    state: TrainingState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    keep_last: int | None = None,
) -> Path:
    """Write ``<log_path>/checkpoints/step_<step>`` atomically and return its path; then keep
    only the newest ``keep_last`` checkpoints (None keeps all). A PEFT model saves its adapter,
    any other model all its weights."""
    if keep_last is not None and keep_last < 1:
        raise CheckpointError(f"keep_last must be >= 1 or None, got {keep_last}")
    try:
        state_json = json.dumps(
            {
                "format": FORMAT_VERSION,
                "step": state.step,
                "weights": "adapter" if _is_peft(model) else "full",
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "data_state": state.data_state,
                "metrics_state": state.metrics_state,
                "config": state.config,
            },
            indent=2,
            allow_nan=True,
        )
    except TypeError as error:
        raise CheckpointError(
            f"checkpoint state for step {state.step} is not JSON ({error}): data_state, "
            "metrics_state and config must hold only dicts, lists, strings, numbers, bools, None"
        ) from error

    def write(folder: Path) -> None:
        if _is_peft(model):
            model.save_pretrained(folder / "adapter")
        else:
            save_model(model, str(folder / "model.safetensors"))
        if optimizer is not None:
            _torch_save(optimizer.state_dict(), folder / "optimizer.pt")
        if scheduler is not None:
            _torch_save(scheduler.state_dict(), folder / "scheduler.pt")
        _torch_save(_rng_state(), folder / "rng.pt")
        (folder / "state.json").write_text(state_json)  # last: marks the content complete

    root = checkpoints_dir(log_path)
    _remove_stale_temporaries(root)
    path = _write_atomically(root / f"step_{state.step:06d}", write)
    if keep_last is not None:
        for old in list_checkpoints(log_path)[:-keep_last]:
            _remove(old)
    return path


# ----------------------------------------------------------------------------- reading


def _torch_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    restore_rng: bool = True,
) -> TrainingState:
    """Restore weights (or the adapter), optimizer, scheduler and RNG states in place from a
    checkpoint folder or a log dir's newest checkpoint, and return the rest of the state.

    Build ``model``, ``optimizer`` and ``scheduler`` exactly as the saving run did first (same
    parameters in the same order; for LoRA, the same base model and adapter config)."""
    folder = resolve_checkpoint(path)
    meta = json.loads((folder / "state.json").read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{folder}: checkpoint format {meta.get('format')!r}, this version reads "
            f"{FORMAT_VERSION}"
        )
    if _is_peft(model):
        if meta["weights"] != "adapter":
            raise CheckpointError(
                f"{folder} holds full weights but the model has a LoRA adapter: resume with "
                "the same fine-tuning mode (full vs LoRA) as the saving run"
            )
        _load_adapter(folder / "adapter", model)
    else:
        if meta["weights"] != "full":
            raise CheckpointError(
                f"{folder} holds a LoRA adapter but the model has none: resume with the same "
                "fine-tuning mode (full vs LoRA) as the saving run"
            )
        try:
            load_model(model, str(folder / "model.safetensors"), strict=True)
        except RuntimeError as error:
            raise CheckpointError(f"{folder}: weights do not fit the model: {error}") from error
    for obj, name in ((optimizer, "optimizer.pt"), (scheduler, "scheduler.pt")):
        if obj is None:
            continue
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder} has no {name}: it was saved without one")
        obj.load_state_dict(_torch_load(folder / name))
    if restore_rng:
        _restore_rng(_torch_load(folder / "rng.pt"))
    return TrainingState(
        step=meta["step"],
        data_state=meta["data_state"],
        metrics_state=meta["metrics_state"],
        config=meta["config"],
    )


def _load_adapter(folder: Path, model: torch.nn.Module) -> None:
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    weights = load_peft_weights(str(folder), device="cpu")
    result = set_peft_model_state_dict(model, weights)
    if result.unexpected_keys:
        raise CheckpointError(
            f"{folder}: adapter weights do not fit the model (unexpected "
            f"{sorted(result.unexpected_keys)[:5]}): build the same LoRA config (rank, target "
            "modules) as the saving run"
        )


# ----------------------------------------------------------------------------- schedule


class Checkpointer:
    """Saves every ``save_every`` steps (0: never) and at the end, keeping the last
    ``keep_last``; each step is saved at most once."""

    def __init__(self, log_path: str | Path, save_every: int, keep_last: int | None = 3) -> None:
        if save_every < 0:
            raise CheckpointError(f"save_every must be >= 0, got {save_every}")
        self.log_path = Path(log_path)
        self.save_every = save_every
        self.keep_last = keep_last
        self._saved_step: int | None = None

    def due(self, step: int, *, final: bool = False) -> bool:
        periodic = self.save_every > 0 and step % self.save_every == 0
        return (final or periodic) and step != self._saved_step

    def maybe_save(
        self,
        state: TrainingState,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        *,
        final: bool = False,
    ) -> Path | None:
        if not self.due(state.step, final=final):
            return None
        path = save_checkpoint(
            self.log_path, state, model, optimizer, scheduler, keep_last=self.keep_last
        )
        self._saved_step = state.step
        return path

    def latest(self) -> Path | None:
        return latest_checkpoint(self.log_path)


# ----------------------------------------------------------------------------- export


def export_adapter(model: torch.nn.Module, out_dir: str | Path, tokenizer: Any = None) -> Path:
    """Write the PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``,
    and the tokenizer when given) that ``PeftModel.from_pretrained`` and vLLM's LoRA support
    load. Atomic: ``out_dir`` appears complete or not at all."""
    if not _is_peft(model):
        raise CheckpointError(
            "export_adapter needs a model with a LoRA adapter; this model trains all its "
            "weights: use export_merged"
        )

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    return _write_atomically(Path(out_dir), write)


def export_merged(model: torch.nn.Module, out_dir: str | Path, tokenizer: Any = None) -> Path:
    """Write a plain transformers model folder that ``AutoModelForCausalLM.from_pretrained``
    loads as is: a LoRA model's adapter is merged into a copy of the base weights (the model
    passed in is left untouched; this needs memory for a second copy), a fully fine-tuned
    model is saved as it is. Atomic like :func:`export_adapter`."""
    merged = copy.deepcopy(model).merge_and_unload() if _is_peft(model) else model
    if not hasattr(merged, "save_pretrained"):
        raise CheckpointError(
            f"export_merged needs a transformers model (with save_pretrained), got "
            f"{type(merged).__name__}"
        )

    def write(folder: Path) -> None:
        merged.save_pretrained(folder, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    return _write_atomically(Path(out_dir), write)
