"""What every training recipe shares: the model keys, loading the student and teachers, the
student's sampler, GKD's ``lmbda`` mix of on-policy and off-policy steps, the log folder, the
closing summary and reports, and the command line's error handling.

A recipe's ``Config`` derives from ``TrainerConfig`` (the loop's knobs), ``StudentKeys`` (and
``TeacherKeys`` when it has one teacher, ``MixKeys`` when it mixes in off-policy steps) and
``RecipeConfig``; its ``main(config)`` builds the parts with the functions here and calls
``run_training``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import anyio
import torch
from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from envs.errors import EnvsError
from envs.harbor.builders import HarborEnvConfig
from recipes.cli import ConfigError, RecipeConfig, parse_cli
from tool_use.renderers import get_renderer
from tool_use.renderers.base import Renderer, RendererError
from training import models
from training.errors import ModelLoadError, TrainingError
from training.off_policy import LmbdaMix, TeacherPolicy, off_policy_objective
from training.rollouts import Policy
from training.samplers import HFSampler
from training.samplers.vllm import VLLMServerSampler
from training.samplers.vllm_engine import VLLMEngineSampler
from training.teachers import LocalTeacher, RemoteTeacher, VLLMServerTeacher
from training.trainer import Trainer, TrainResult, config_objective
from training.types import Sampler, Teacher
from training.vocab import check_same_vocabulary
from training.weights import load_weights

log = logging.getLogger(__name__)

Dtype = Literal["auto", "bf16", "fp32", "fp16"]


def is_server_url(value: str) -> bool:
    """Whether a ``sampler`` value names a vLLM server (an http(s) URL with a host)."""
    url = urlparse(value)
    return url.scheme in ("http", "https") and bool(url.netloc)


def _check_sampler(value: str) -> str:
    if value in ("hf", "vllm") or is_server_url(value):
        return value.rstrip("/")
    raise ValueError(
        "expected hf (this process), vllm (vLLM's engine in this process) or the http(s) URL "
        "of a vLLM server, e.g. http://127.0.0.1:8000"
    )


SamplerChoice = Annotated[str, AfterValidator(_check_sampler)]
"""The ``sampler`` key: ``hf``, ``vllm`` or a vLLM server's URL (``make_sampler``)."""


def check_served_name(value: str | None, info: ValidationInfo) -> str | None:
    """``sampler_served_name`` (declared after ``sampler``) only goes with a server."""
    sampler = info.data.get("sampler")
    if value is not None and sampler is not None and not is_server_url(sampler):
        raise ValueError(f"names the model of a sampler server, but sampler={sampler}")
    return value


class StudentKeys(RecipeConfig):
    """The student model."""

    model_name: str = models.EMBEDDED_MODEL
    """The student: a Hugging Face id, a local folder, or smollm2-135m-instruct (embedded)."""
    renderer: str | None = None
    """Chat-template renderer of the student and teachers (chatml, qwen2.5, qwen3, llama3,
    template); None: detected from each tokenizer."""
    dtype: Dtype = "auto"
    """auto (bf16 where the hardware computes it natively, else fp32) | bf16 | fp32 | fp16."""
    lora_rank: int = Field(16, ge=0)
    """LoRA rank; 0: full fine-tuning."""
    lora_alpha: float | None = None
    """LoRA alpha (default 2 * lora_rank)."""
    sampler: SamplerChoice = "hf"
    """Who samples the student's turns: hf (this process, batched Hugging Face generation) |
    vllm (vLLM's engine in this process; pip install 'apprentice[vllm]') | the http(s) URL of a
    vLLM server serving model_name with --enable-lora (the LoRA adapter is loaded there after
    every step, from this machine's temporary folder, which the server must be able to read)."""
    sampler_served_name: str | None = None
    """The model name the sampler server serves (default: model_name)."""

    @field_validator("sampler")
    @classmethod
    def _server_needs_lora(cls, value: str, info: ValidationInfo) -> str:
        if is_server_url(value) and info.data.get("lora_rank") == 0:
            raise ValueError(
                "a vLLM server loads LoRA adapters at run time, but full fine-tuning "
                "(lora_rank=0) cannot send its weights over HTTP; train with lora_rank > 0, or "
                "sample with sampler=vllm (full weights reloaded in the engine) or sampler=hf"
            )
        return value

    _served_name = field_validator("sampler_served_name")(check_served_name)


class HarborTaskKeys(RecipeConfig):
    """Which Harbor tasks, where they run, and how episodes are batched."""

    tasks: list[str] = Field(default_factory=lambda: ["bundled"])
    """Task sources: task dirs, dataset folders, registry.json, bundled[:train|:test]. Plain
    bundled trains on the suite's train split and evaluates on its test split."""
    eval_tasks: list[str] = Field(default_factory=list)
    """Held-out tasks for evaluation (default: the split of tasks, if any)."""
    backend: str = "local"
    """Sandbox backend: local (bubblewrap), docker, harbor:<type>, or module:attr (a factory)."""
    max_turns: int = Field(10, ge=1)
    """Assistant turns per episode."""
    group_size: int = Field(4, ge=1)
    """Episodes per task in a batch."""
    groups_per_batch: int = Field(8, ge=1)
    """Tasks per batch."""
    eval_group_size: int = Field(1, ge=1)
    """Episodes per held-out task in an evaluation."""
    epochs: int = Field(1, ge=1)
    """Passes over the training tasks (each a fresh shuffle)."""
    command_timeout_s: float = Field(30.0, gt=0)
    """Timeout of one bash command."""

    def harbor_env_config(self, seed: int, **overrides: Any) -> HarborEnvConfig:
        """These keys as the envs package's config (``overrides`` for recipe-specific ones)."""
        keys = {name: getattr(self, name) for name in HarborTaskKeys.model_fields}
        return HarborEnvConfig(**keys, seed=seed, **overrides)


class TeacherProtocol(StrEnum):
    """What the server at a teacher URL speaks (``teacher_protocol``, ``TeacherSpec.protocol``)."""

    VLLM = "vllm"
    """A vLLM OpenAI-compatible server: prompt_logprobs over /v1/completions
    (``VLLMServerTeacher``); it can also generate the teacher's turns."""
    APPRENTICE = "apprentice"
    """Our teacher server (``python -m recipes.serve_teacher``): any Hugging Face model scored
    by ``LocalTeacher`` on the server's machine, binary answers (``RemoteTeacher``); it only
    scores."""


def check_teacher_server(
    url: str | None, protocol: TeacherProtocol, served_name: str | None, keys: tuple[str, str, str]
) -> None:
    """A protocol other than the default, or a served name, only go with a server URL; our
    server serves one model under no name. ``keys``: the url, protocol, served-name keys."""
    url_key, protocol_key, name_key = keys
    if url is None and protocol is not TeacherProtocol.VLLM:
        raise ValueError(
            f"{protocol_key}={protocol} names a teacher server, but {url_key} is unset"
        )
    if protocol is TeacherProtocol.APPRENTICE and served_name is not None:
        raise ValueError(
            f"{name_key} names a vLLM server's model; our teacher server "
            f"({protocol_key}=apprentice) serves one model: leave {name_key} unset"
        )


class TeacherKeys(RecipeConfig):
    """One teacher, flat (the common keys of the single-teacher recipes)."""

    teacher_model: str = models.EMBEDDED_MODEL
    """The teacher (same vocabulary as the student). With teacher_url, its tokenizer is loaded
    from here and the server is asked for teacher_served_name."""
    teacher_checkpoint: str | None = None
    """Weights loaded onto teacher_model: a LoRA adapter folder, a checkpoint or run folder of
    ours (training.weights); None: teacher_model as it is."""
    teacher_url: str | None = None
    """Base URL of a server that scores for the teacher (e.g. http://127.0.0.1:8000), speaking
    teacher_protocol; None: the teacher runs in this process."""
    teacher_protocol: TeacherProtocol = TeacherProtocol.VLLM
    """What teacher_url speaks: vllm (a vLLM OpenAI-compatible server) | apprentice (ours:
    python -m recipes.serve_teacher, binary answers, any HF model, scoring only)."""
    teacher_served_name: str | None = None
    """The model name the vLLM teacher server serves (default: teacher_model)."""

    @model_validator(mode="after")
    def _check_teacher_server(self) -> TeacherKeys:
        check_teacher_server(
            self.teacher_url,
            self.teacher_protocol,
            self.teacher_served_name,
            ("teacher_url", "teacher_protocol", "teacher_served_name"),
        )
        return self


class TeacherSpec(RecipeConfig):
    """One teacher of a multi-teacher run."""

    model: str = models.EMBEDDED_MODEL
    """The teacher model (same vocabulary as the student)."""
    checkpoint: str | None = None
    """Weights loaded onto it: a LoRA adapter folder, a checkpoint or run folder of ours."""
    route: str | None = None
    """The route value rows name it by (default: its model name)."""
    weight: float = Field(1.0, ge=0.0)
    """Its weight in a blend (normalised over the teachers)."""
    url: str | None = None
    """A server that scores for it, speaking protocol (None: it runs in this process)."""
    protocol: TeacherProtocol = TeacherProtocol.VLLM
    """What url speaks: vllm (a vLLM OpenAI-compatible server) | apprentice (ours:
    python -m recipes.serve_teacher)."""
    served_name: str | None = None
    """The model name the vLLM server serves (default: model)."""

    @model_validator(mode="after")
    def _check_server(self) -> TeacherSpec:
        check_teacher_server(
            self.url, self.protocol, self.served_name, ("url", "protocol", "served_name")
        )
        return self


class OffPolicySource(StrEnum):
    """Where off-policy steps (``lmbda`` < 1) take their assistant turns from."""

    DATASET = "dataset"
    """The data's own references, replayed: a prompt row's trailing assistant messages, a
    Harbor task's reference solution (solution/solve.sh as one bash call)."""
    TEACHER = "teacher"
    """The teacher generates them, from its own (privileged) view of each episode."""


class MixKeys(RecipeConfig):
    """GKD's mixing of on-policy and off-policy steps."""

    lmbda: float = Field(1.0, ge=0.0, le=1.0)
    """Probability that a step is on-policy (student samples); the others are off-policy
    (turns written by off_policy_source). 1: pure on-policy distillation; 0: pure off-policy."""
    off_policy_source: OffPolicySource = OffPolicySource.DATASET
    """Who writes the off-policy turns: dataset (the rows' reference responses, the tasks'
    reference solutions) | teacher (generated from its privileged view)."""


@dataclass
class Student:
    """The trainable model and how it renders."""

    model: Any
    tokenizer: models.Tokenizer
    renderer: Renderer


@dataclass
class LoadedTeacher:
    """A ready teacher: scores, renders, and (local ones) the model it runs."""

    teacher: Teacher
    renderer: Renderer
    full_vocabulary: bool
    """Whether it can return full distributions (local teachers)."""
    model: Any = None
    """The frozen model of a local teacher (it can also generate, e.g. off-policy batches)."""
    tokenizer: Any = None


def load_student(config: StudentKeys, seed: int = 0) -> Student:
    """The student, its adapter initialised from ``seed`` (a run is repeatable)."""
    torch.manual_seed(seed)
    tokenizer = models.load_tokenizer(config.model_name)
    lora = (
        models.LoraSettings(rank=config.lora_rank, alpha=config.lora_alpha)
        if config.lora_rank > 0
        else None
    )
    model = models.load_model(config.model_name, dtype=config.dtype, lora=lora)
    return Student(model, tokenizer, get_renderer(config.renderer, tokenizer))


def load_teacher(
    spec: TeacherSpec,
    student: Student,
    *,
    config: StudentKeys,
    name: str | None = None,
) -> LoadedTeacher:
    """A teacher, after checking that it can score the student's token ids."""
    name = name or spec.model
    if spec.url:
        tokenizer = models.load_tokenizer(spec.model)
        if spec.protocol is TeacherProtocol.APPRENTICE:
            teacher: Teacher = RemoteTeacher(spec.url, name=name)
        else:
            teacher = VLLMServerTeacher(spec.url, spec.served_name or spec.model, name=name)
        vocab_size, full, model = None, False, None
    else:
        if spec.checkpoint:
            loaded = load_weights(spec.checkpoint, base_model=spec.model, dtype=config.dtype)
            model, tokenizer = loaded.model, loaded.tokenizer
        else:
            model = models.load_model(spec.model, dtype=config.dtype)
            tokenizer = models.load_tokenizer(spec.model)
        model.eval().requires_grad_(False)
        teacher = LocalTeacher(model, tokenizer, name=name)
        vocab_size, full = model.config.vocab_size, True
    check_same_vocabulary(
        student.tokenizer,
        tokenizer,
        student_name=config.model_name,
        teacher_name=spec.model,
        teacher_vocab_size=vocab_size,
    )
    renderer = get_renderer(config.renderer, tokenizer)
    return LoadedTeacher(teacher, renderer, full, model, tokenizer)


VLLM_DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ``max_lora_rank`` values vLLM accepts."""


def vllm_max_lora_rank(lora_rank: int) -> int:
    """The engine's ``max_lora_rank`` for adapters of ``lora_rank`` (0: no LoRA): the smallest
    value vLLM accepts that holds them."""
    if lora_rank == 0:
        return 0
    return next((r for r in VLLM_LORA_RANKS if r >= lora_rank), lora_rank)


def make_sampler(
    config: Any, student: Student, seed: int, *, base_model: str | None = None
) -> Sampler:
    """The student's sampler that ``config.sampler`` names (``StudentKeys``).

    The vLLM samplers start from ``base_model`` (default ``config.model_name``): the trainer
    sends them the student's own weights before the first rollout and after every step
    (``update_weights``: a LoRA adapter, or for the engine full weights too). They report the
    model's own logprobs, which are the sampling ones only at temperature 1 or greedy, so
    other temperatures are refused here rather than at the first sample."""
    if config.sampler == "hf":
        return HFSampler(student.model, student.tokenizer, seed=seed)
    for key in ("temperature", "eval_temperature"):
        value = getattr(config, key, None)
        if value not in (None, 0.0, 1.0):
            raise ConfigError(
                f"{key}={value} with sampler={config.sampler}: the vLLM samplers report the "
                "model's own logprobs, which are the sampling distribution's only at "
                f"temperature 1 (or 0, greedy); set {key}=1 or sample with sampler=hf"
            )
    model = base_model or config.model_name
    if config.sampler == "vllm":
        try:
            return VLLMEngineSampler(
                models.resolve(model),
                dtype=VLLM_DTYPES[config.dtype],
                max_model_len=getattr(config, "max_trajectory_tokens", None) or 4096,
                max_lora_rank=vllm_max_lora_rank(getattr(config, "lora_rank", 0)),
                seed=seed,
            )
        except ImportError as error:
            why = error.__cause__ or error  # the import's own error, not the sampler's advice
            raise ConfigError(
                f"sampler=vllm runs vLLM's engine in this process, but this Python "
                f"({sys.executable}) cannot import vllm ({why}); pip install "
                "'apprentice[vllm]' (GPU), or start a vLLM server (on CPU: python "
                "scripts/vllm_cpu.py serve --enable-lora ...) and pass sampler=http://HOST:PORT"
            ) from None
    return VLLMServerSampler(
        config.sampler,
        config.sampler_served_name or model,
        tokenizer=student.tokenizer,
        seed=seed,
    )


def single_teacher(config: Any) -> TeacherSpec:
    """The flat ``teacher_*`` keys as a ``TeacherSpec``."""
    return TeacherSpec(
        model=config.teacher_model,
        checkpoint=config.teacher_checkpoint,
        url=config.teacher_url,
        protocol=config.teacher_protocol,
        served_name=config.teacher_served_name,
    )


def teacher_policy(teacher: LoadedTeacher, config: Any) -> Policy:
    """The teacher writes every turn, from its own view of each episode (at ``temperature``)."""
    if teacher.model is not None:
        sampler: Any = HFSampler(teacher.model, teacher.tokenizer, seed=config.seed)
    else:
        spec = single_teacher(config)
        assert spec.url is not None
        if spec.protocol is TeacherProtocol.APPRENTICE:
            raise ConfigError(
                f"off_policy_source=teacher has the teacher generate turns, but our teacher "
                f"server at {spec.url} (teacher_protocol=apprentice) only scores; serve the "
                "teacher with vLLM (teacher_protocol=vllm), load it here (no teacher_url), or "
                "use off_policy_source=dataset"
            )
        sampler = VLLMServerSampler(
            spec.url, spec.served_name or spec.model, tokenizer=teacher.tokenizer, seed=config.seed
        )
    return TeacherPolicy(sampler, teacher.renderer, temperature=config.temperature)


def lmbda_mix(
    config: Any,
    references: Callable[[], Policy],
    teacher: LoadedTeacher | None,
    full_vocabulary: bool,
) -> LmbdaMix | None:
    """The off-policy half of the ``lmbda`` mix (None when ``lmbda`` is 1). ``references``
    builds the replay of the data's references (``off_policy_source=dataset``), raising
    ``ConfigError`` when some have none; ``teacher`` writes the turns otherwise."""
    if config.lmbda >= 1.0:
        return None
    if config.off_policy_source is OffPolicySource.DATASET:
        policy = references()
    else:
        if teacher is None:
            raise ConfigError("off_policy_source=teacher needs a teacher loaded at start-up")
        policy = teacher_policy(teacher, config)
    objective = config_objective(config, full_vocabulary)
    return LmbdaMix(
        config.lmbda, policy, off_policy_objective(config.loss, objective), seed=config.seed
    )


def default_log_path(recipe: str, config: Any) -> Path:
    """``log_path``, else the run ``resume`` points at, else ``runs/<recipe>-<timestamp>``."""
    if config.log_path:
        return Path(config.log_path)
    resume = getattr(config, "resume", False)
    if isinstance(resume, Path):
        return resume.parent.parent if (resume / "state.json").is_file() else resume
    return Path("runs") / f"{recipe}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_resume(config: Any) -> None:
    if getattr(config, "resume", False) is True and not config.log_path:
        raise ConfigError("resume=true continues the run in log_path: set log_path=RUN_FOLDER")


async def run_training(trainer: Trainer) -> TrainResult:
    """Train (the trainer writes the reports at the end), close the teacher (also one made
    during the run, ``teacher_from_warmup``) and the sampler (a vLLM engine's processes, a
    server's adapter), print the summary."""
    try:
        result = await trainer.train()
    finally:
        try:
            if trainer.teacher is not None:
                await trainer.teacher.close()
        finally:
            await close_sampler(trainer.sampler)
    print(summary(result))
    return result


async def close_sampler(sampler: Any) -> None:
    """``close`` the sampler where it has one (the vLLM samplers; ``HFSampler`` holds nothing)."""
    close = getattr(sampler, "close", None)
    if close is not None:
        await close()


def summary(result: TrainResult) -> str:
    """The closing lines: teacher KL first -> last step, eval success before -> after (and in
    between), where the checkpoint, export, logs and reports are."""
    h = result.history

    def num(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = [
        "",
        f"Done: {result.steps} steps.",
        f"  teacher KL   step {h.get('teacher_kl_first_step', '-')}: "
        f"{num(h.get('teacher_kl_first'))}  ->  step {h.get('teacher_kl_last_step', '-')}: "
        f"{num(h.get('teacher_kl_last'))}",
        "  eval success on held-out tasks:",
    ]
    for e in h.get("evals", []):
        calls = f"   ({e['tool_calls']:.2f} tool calls/episode)" if "tool_calls" in e else ""
        lines.append(f"    after {e['step']:>3} steps: {num(e['success_rate'])}{calls}")
    lines += [
        f"  logs:        {result.log_path} (metrics.jsonl, rollouts/, config.json)",
        f"  checkpoint:  {result.checkpoint}",
    ]
    lines += [f"  export:      {path} ({kind})" for kind, path in result.exported.items()]
    lines.append(
        f"  reports:     {result.log_path / 'report.png'}, {result.log_path / 'rollouts.html'}"
    )
    return "\n".join(lines)


def quiet_libraries() -> None:
    """Terminal output for people: no per-file loading bars from transformers, no deprecation
    noise from peft's use of transformers."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def parse_or_explain[C: BaseModel](config_cls: type[C], argv: Sequence[str] | None) -> C | None:
    """The config from the command line; None after saying on stderr what is wrong with it."""
    try:
        return parse_cli(config_cls, argv)
    except ConfigError as error:
        print(f"error: {error}\n(run with --help to list every key)", file=sys.stderr)
        return None


def cli[C: BaseModel](
    main: Callable[[C], Awaitable[Any]], config_cls: type[C], argv: Sequence[str] | None = None
) -> int:
    """Parse, run ``main``; a bad config, bad data, models that cannot work together: one
    paragraph on stderr and exit status 2, no traceback."""
    quiet_libraries()
    config = parse_or_explain(config_cls, argv)
    if config is None:
        return 2
    try:
        anyio.run(main, config)
    except (ConfigError, EnvsError, ModelLoadError, TrainingError, RendererError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
