"""Load whatever a user points at as a model: a name, an exported folder, or one of our runs.

``load_weights(source, base_model=...)`` accepts

- a Hugging Face id, a local model folder (e.g. a run's ``export/merged``) or the embedded
  ``smollm2-135m-instruct``: loaded as is;
- a PEFT adapter folder (``adapter_config.json``, e.g. a run's ``export/adapter``): loaded onto
  ``base_model`` (default: the base the adapter names) and merged;
- a checkpoint folder of our runs (``state.json``): its adapter or full weights, on the base
  model the run trained (``model_name`` in its config) unless ``base_model`` is given;
- a run folder (``checkpoints/step_*``): its newest checkpoint.

Teachers with a ``checkpoint`` and ``recipes.harbor_rl.eval`` use it; the result is a plain
(merged) transformers model, ready to be frozen or sampled from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from training import checkpoints, models
from training.errors import CheckpointError, ModelLoadError

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class LoadedWeights:
    """A loaded model, its tokenizer, and what was loaded (for logs and reports)."""

    model: PreTrainedModel
    tokenizer: models.Tokenizer
    kind: str
    """``model``, ``adapter`` or ``checkpoint``."""
    base_model: str
    """The model the weights sit on (the source itself for ``model``)."""
    source: str


def _adapter_base(folder: Path) -> str:
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{folder / ADAPTER_CONFIG}: cannot read it ({error})") from error
    base = config.get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(
            f"{folder / ADAPTER_CONFIG} names no base_model_name_or_path; pass the base model "
            "explicitly"
        )
    return str(base)


def _with_adapter(base: PreTrainedModel, folder: Path) -> PreTrainedModel:
    from peft import PeftModel

    try:
        with models.peft_quietly():
            adapted = PeftModel.from_pretrained(base, str(folder))
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise ModelLoadError(
            f"the adapter {folder} does not fit its base model ({error}); pass the base model it "
            "was trained on"
        ) from error
    return adapted.merge_and_unload()


def _tokenizer(folder: Path, fallback: str) -> models.Tokenizer:
    if (folder / "tokenizer_config.json").is_file():
        return models.load_tokenizer(folder)
    return models.load_tokenizer(fallback)


def load_weights(
    source: str | Path,
    *,
    base_model: str | None = None,
    dtype: torch.dtype | str | None = "auto",
    device: torch.device | str | None = None,
) -> LoadedWeights:
    """The model ``source`` names (see the module docstring), merged and ready to use."""
    path = Path(source)
    if path.is_dir() and (path / ADAPTER_CONFIG).is_file():
        base = base_model or _adapter_base(path)
        model = _with_adapter(models.load_model(base, dtype=dtype, device=device), path)
        return LoadedWeights(model, _tokenizer(path, base), "adapter", base, str(source))
    if path.is_dir() and (
        (path / "state.json").is_file() or checkpoints.checkpoints_dir(path).is_dir()
    ):
        return _from_checkpoint(checkpoints.resolve_checkpoint(path), base_model, dtype, device)
    model = models.load_model(str(source), dtype=dtype, device=device)
    return LoadedWeights(
        model, models.load_tokenizer(str(source)), "model", str(source), str(source)
    )


def _from_checkpoint(
    folder: Path,
    base_model: str | None,
    dtype: torch.dtype | str | None,
    device: torch.device | str | None,
) -> LoadedWeights:
    meta = json.loads((folder / "state.json").read_text())
    base = base_model or (meta.get("config") or {}).get("model_name")
    if not base:
        raise CheckpointError(
            f"{folder}: its run config names no model_name; pass the base model explicitly"
        )
    model = models.load_model(base, dtype=dtype, device=device)
    if meta.get("weights") == "adapter":
        model = _with_adapter(model, folder / "adapter")
    else:
        from safetensors.torch import load_model

        try:
            load_model(model, str(folder / "model.safetensors"), strict=True)
        except (OSError, RuntimeError) as error:
            raise CheckpointError(
                f"{folder}: its weights do not fit {base} ({error}); pass the base model the run "
                "trained"
            ) from error
    return LoadedWeights(model, models.load_tokenizer(base), "checkpoint", base, str(folder))
