"""What every training recipe shares: the model keys, loading the student and teachers, the
student's sampler, GKD's ``lmbda`` mix of on-policy and off-policy steps, the log folder, the
closing summary and reports, and the command line's error handling.

A recipe's ``Config`` derives from ``TrainerConfig`` (the loop's knobs), ``StudentKeys`` (and
``TeacherKeys`` when it has one teacher, ``MixKeys`` when it mixes in off-policy steps) and
``RecipeConfig``; its ``main(config)`` builds the parts with the functions here and calls
``run_training``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
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
from envs.harbor.builders import HarborEnvConfig, SandboxBackend
from envs.harbor.tasks import HarborTask
from envs.types import Dataset
from recipes.cli import (
    INTERRUPTED_EXIT,
    ConfigError,
    RecipeConfig,
    dump_config,
    interrupted_message,
    object_reference,
    parse_cli,
)
from tool_use.renderers import get_renderer
from tool_use.renderers.base import Renderer, RendererError
from training import checkpoints, models
from training.errors import (
    CheckpointError,
    InferenceServerError,
    ModelLoadError,
    TrainingError,
)
from training.metrics import METRICS_FILE, ROLLOUTS_DIR
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


def check_model_name(name: str) -> str:
    """A model name that reads as a local path (it starts with ``/``, ``.`` or ``~``, or has more
    parts than a Hugging Face ``namespace/name`` id) must exist; ``~`` is expanded."""
    path = Path(name).expanduser()
    if name.startswith(("/", ".", "~")) or len(name.replace(os.sep, "/").split("/")) > 2:
        if not path.exists():
            raise ValueError(f"local folder {name} does not exist")
        return str(path) if name.startswith("~") else name
    return name


ModelName = Annotated[str, AfterValidator(check_model_name)]
"""A Hugging Face id, a local folder (which must exist) or the embedded model's name."""


def check_served_name(value: str | None, info: ValidationInfo) -> str | None:
    """``sampler_served_name`` (declared after ``sampler``) only goes with a server."""
    sampler = info.data.get("sampler")
    if value is not None and sampler is not None and not is_server_url(sampler):
        raise ValueError(f"names the model of a sampler server, but sampler={sampler}")
    return value


class StudentKeys(RecipeConfig):
    """The student model."""

    model_name: ModelName = models.EMBEDDED_MODEL
    """The student: a Hugging Face id, a local folder, or smollm2-135m-instruct (embedded)."""
    renderer: str | None = None
    """Chat-template renderer of the student and teachers (chatml, qwen2.5, qwen3, llama3,
    template); None: detected from each tokenizer."""
    dtype: Dtype = "auto"
    """auto (bf16 where the hardware computes it natively, else fp32) | bf16 | fp32 | fp16."""
    lora_rank: int = Field(16, ge=0)
    """LoRA rank; 0: full fine-tuning."""
    lora_alpha: float | None = Field(None, gt=0)
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
    """Tasks for evaluation, held out from training (default: the split of tasks, if any)."""
    backend: SandboxBackend = "local"
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

    @field_validator("tasks")
    @classmethod
    def _some_tasks(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one task source")
        return value

    def harbor_env_config(self, seed: int, **overrides: Any) -> HarborEnvConfig:
        """These keys as the envs package's config (``overrides`` for recipe-specific ones)."""
        keys = {name: getattr(self, name) for name in HarborTaskKeys.model_fields}
        return HarborEnvConfig(**keys, seed=seed, **overrides)


HARBOR_SLACK_S = 600.0
"""What one Harbor env call may take beyond the task's own limit (sandbox start and the
grader's setup commands, up to 120 s each, around a build or the verifier)."""


def check_env_timeout(
    env_timeout_s: float | None, tasks: Sequence[HarborTask], command_timeout_s: float
) -> None:
    """The trainer's ``env_timeout_s`` must not cut off what Harbor bounds itself, plus
    ``HARBOR_SLACK_S``: a task's image build (``[environment].build_timeout_sec``, inside
    ``make_envs``) and its last step, whose bash calls are bounded by ``[agent].timeout_sec``
    (without one, by ``command_timeout_s`` per call) and which then runs the verifier
    (``[verifier].timeout_sec``). Otherwise a ``ConfigError`` names the task and the value to
    set. Without an agent timeout a turn of many slow calls can still exceed the check's bound:
    each call is bounded, their number only by the turn's tokens."""
    if env_timeout_s is None:
        return
    limits = []
    for task in tasks:
        build = task.config.environment.build_timeout_sec
        limits.append(("[environment].build_timeout_sec", task.name, build))
        if task.agent_timeout_s is not None:
            agent, seconds = "[agent].timeout_sec", task.agent_timeout_s
        else:
            agent, seconds = "command_timeout_s", command_timeout_s
        step = seconds + task.verifier_timeout_s
        limits.append((f"{agent} + [verifier].timeout_sec", task.name, step))
    if not limits:
        return
    what, name, seconds = max(limits, key=lambda limit: limit[2])
    needed = seconds + HARBOR_SLACK_S
    if needed > env_timeout_s:
        raise ConfigError(
            f"env_timeout_s={env_timeout_s:g} would cut off Harbor's own limits: task {name!r}: "
            f"{what} is {seconds:g} s, plus up to {HARBOR_SLACK_S:g} s to start a sandbox or "
            f"grade; set env_timeout_s={needed:g} or more (or null: no limit)"
        )


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

    teacher_model: ModelName = models.EMBEDDED_MODEL
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

    model: ModelName = models.EMBEDDED_MODEL
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


def run_config(config: BaseModel, log_path: Path) -> dict[str, Any]:
    """What a run writes to its ``config.json``: the config as ``config=`` reads it back, with
    the folder it ran in and ``resume`` false, so the file repeats the run (with a new
    ``log_path``) instead of continuing one."""
    return {**dump_config(config), "log_path": str(log_path), "resume": False}


def user_datasets(builder: Any, key: str) -> tuple[Dataset, Dataset | None]:
    """``builder()`` (an ``envs.types.DatasetBuilder`` given as ``key``), checked: a train
    ``Dataset`` with batches and an eval ``Dataset`` or None; anything else is a ``ConfigError``
    naming the key and the builder."""
    name = f"{key}={_reference(builder)}"
    if not callable(builder):
        raise ConfigError(f"{name} is not callable; expected a DatasetBuilder (envs.types)")
    result = builder()
    expected = "expected (train Dataset, eval Dataset or None), Datasets as in envs.types"
    if not isinstance(result, tuple) or len(result) != 2:
        shown = f"a {type(result).__name__}" if result is not None else "None"
        raise ConfigError(f"{name} returned {shown}; {expected}")
    train, evaluation = result
    for role, value in (("train", train), ("eval", evaluation)):
        if value is not None and not isinstance(value, Dataset):
            raise ConfigError(
                f"{name} returned a {type(value).__name__} as the {role} dataset; {expected} "
                "(get_batch(index) and __len__)"
            )
    if train is None or len(train) == 0:
        raise ConfigError(f"{name}: the train dataset has no batches; {expected}")
    return train, evaluation


def _reference(obj: Any) -> str:
    try:
        return object_reference(obj)
    except TypeError:
        return repr(obj)


def check_resume(config: Any) -> None:
    """What ``log_path`` and ``resume`` ask for, checked before models load or anything is
    written; each problem is a ``ConfigError``:

    - ``resume=true`` needs ``log_path``, and a checkpoint in it;
    - ``resume=PATH`` must be a checkpoint folder, or a run folder with one, and the newest
      checkpoint of the run in ``log_path`` (an older one would mix two futures there);
    - the run folder must be a folder this process can write into or create;
    - a new run (no ``resume``) must not go into a folder that holds a run already: its
      metrics, rollouts and checkpoints would mix with the new ones (and a later
      ``resume=true`` would pick the old run's newest checkpoint)."""
    resume = getattr(config, "resume", False)
    if resume is True and not config.log_path:
        raise ConfigError("resume=true continues the run in log_path: set log_path=RUN_FOLDER")
    if not config.log_path and not isinstance(resume, Path):
        return  # a new folder, runs/<recipe>-<timestamp>
    log_path = default_log_path("", config)
    if isinstance(resume, Path):
        try:
            checkpoints.refuse_later_checkpoints(log_path, checkpoints.resolve_checkpoint(resume))
        except CheckpointError as error:
            raise ConfigError(f"resume={resume}: {error}") from None
    check_folder("log_path", log_path)
    if resume is True and checkpoints.latest_checkpoint(log_path) is None:
        raise ConfigError(
            f"resume=true: no checkpoint in {checkpoints.checkpoints_dir(log_path)} to continue "
            "from (a run saves one every save_every steps and at the end); start a new run in a "
            "new or empty log_path"
        )
    if resume is False and (found := run_files(log_path)):
        raise ConfigError(
            f"log_path={log_path} already holds a run ({', '.join(found)}); continue it with "
            "resume=true, or start a new run in a new or empty log_path"
        )


def run_files(folder: Path) -> list[str]:
    """What in ``folder`` shows a run was there: its metrics, rollouts, checkpoints."""
    found = []
    if (folder / METRICS_FILE).exists():
        found.append(METRICS_FILE)
    rollouts = folder / ROLLOUTS_DIR
    if rollouts.is_dir() and any(rollouts.iterdir()):
        found.append(f"{ROLLOUTS_DIR}/")
    if checkpoints.list_checkpoints(folder):
        found.append(f"{checkpoints.CHECKPOINTS}/")
    return found


def check_folder(key: str, path: Path) -> None:
    """``path`` is a folder this process can write into, or one it can create (nothing is left
    created); else a ``ConfigError`` naming ``key``."""
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{key}={path}: is a file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}={path}: cannot write into it (permission denied)")
        return
    missing = [path, *(parent for parent in path.parents if not parent.exists())]
    try:
        for folder in reversed(missing):
            folder.mkdir()
    except OSError as error:
        why = f"{error.strerror}: {error.filename}" if error.filename else str(error)
        raise ConfigError(f"{key}={path}: cannot be created ({why})") from None
    finally:
        for folder in missing:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()


NO_EVAL_TASKS = "no eval tasks; set eval_tasks=PATH,... to evaluate"
"""Why a Harbor run does not evaluate (``eval_split``, ``summary``)."""


def eval_split(train: Sequence[HarborTask], test: Sequence[HarborTask]) -> str:
    """The start-up line about a Harbor run's evaluation: none, held-out tasks, or tasks that
    are also trained on, the same folder or a task of the same name (with a warning naming
    them: their success is not held-out)."""
    if not test:
        return f"eval: none ({NO_EVAL_TASKS})"
    trained = {task.path.resolve() for task in train} | {task.name for task in train}
    overlap = [task.name for task in test if {task.path.resolve(), task.name} & trained]
    if not overlap:
        return f"eval: {len(test)} held-out tasks"
    log.warning(
        "eval_tasks overlap tasks: %d of the %d eval tasks are also trained on (%s); their eval "
        "success is not held-out",
        len(overlap),
        len(test),
        ", ".join(overlap[:5]) + (", ..." if len(overlap) > 5 else ""),
    )
    return f"eval: {len(test)} tasks, {len(overlap)} of them also trained on (not held-out)"


def interruption(trainer: Trainer) -> str:
    """Where an interrupted run stopped, its last checkpoint, and how to go on."""
    done, total = trainer.step_index, trainer.max_steps
    where = f"during step {done + 1} of {total}" if done < total else f"after step {done}"
    latest = trainer.checkpointer.latest()
    if latest is not None:
        return (
            f"{where}; last checkpoint: {latest}; resume with resume=true "
            f"log_path={trainer.log_path}"
        )
    every = trainer.config.save_every
    saves = f"save_every={every}" if every else "save_every=0: only at the end"
    return (
        f"{where}; last checkpoint: none ({saves}), so there is nothing to resume: start again "
        f"in a new or empty log_path (not {trainer.log_path})"
    )


async def run_training(trainer: Trainer, *, no_eval: str = "no eval dataset") -> TrainResult:
    """Train (the trainer writes the reports at the end), close the teacher (also one made
    during the run, ``teacher_from_warmup``) and the sampler (a vLLM engine's processes, a
    server's adapter), print the summary (``no_eval``: why there is no evaluation, if none).
    Cancelled (Ctrl-C), or stopped by a teacher or sampler server that stayed unreachable, the
    exception carries a note saying where the run stopped and how to resume, which the command
    line prints."""
    try:
        result = await trainer.train()
    except (KeyboardInterrupt, anyio.get_cancelled_exc_class()) as stop:
        stop.add_note(interruption(trainer))
        raise
    except InferenceServerError as error:
        error.add_note(f"the run stopped {interruption(trainer)}")
        raise
    finally:
        try:
            if trainer.teacher is not None:
                await trainer.teacher.close()
        finally:
            await close_sampler(trainer.sampler)
    print(summary(result, no_eval=no_eval))
    return result


async def close_sampler(sampler: Any) -> None:
    """``close`` the sampler where it has one (the vLLM samplers; ``HFSampler`` holds nothing)."""
    close = getattr(sampler, "close", None)
    if close is not None:
        await close()


def steps(count: int) -> str:
    """``1 step``, ``2 steps``."""
    return f"{count} step" if count == 1 else f"{count} steps"


def summary(result: TrainResult, *, no_eval: str = "no eval dataset") -> str:
    """The closing lines: teacher KL first -> last step, eval success before -> after (and in
    between) with the episodes that could not be graded, where the checkpoint, export, logs
    and reports are. ``no_eval``: why there was no evaluation, when there was none."""
    h = result.history

    def num(value: float | None) -> str:
        return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"

    lines = [
        "",
        f"Done: {steps(result.steps)}.",
        f"  teacher KL   step {h.get('teacher_kl_first_step', '-')}: "
        f"{num(h.get('teacher_kl_first'))}  ->  step {h.get('teacher_kl_last_step', '-')}: "
        f"{num(h.get('teacher_kl_last'))}",
    ]
    evals = h.get("evals", [])
    lines.append("  eval success:" if evals else f"  eval:        none ({no_eval})")
    for e in evals:
        counts = ""
        if "episodes/valid" in e:
            counts = f"   ({e['episodes/valid']:.0f} graded"
            if e.get("episodes/invalid"):
                counts += f", {e['episodes/invalid']:.0f} could not be graded"
            counts += ")"
        calls = f"   ({e['tool_calls']:.2f} tool calls/episode)" if "tool_calls" in e else ""
        after = f"after {e['step']:>3} {'step' if e['step'] == 1 else 'steps'}"
        lines.append(f"    {after}: {num(e['success_rate'])}{counts}{calls}")
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
    """Terminal output for people: no per-file loading bars from transformers. (peft's use of
    transformers' deprecated ``is_gradient_checkpointing`` is silenced where we call peft:
    ``models.peft_quietly``.)"""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
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
        print("\n".join([f"error: {error}", *getattr(error, "__notes__", ())]), file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # clean-up has run; say where the run stopped
        print(interrupted_message(stop), file=sys.stderr)
        return INTERRUPTED_EXIT
    return 0
