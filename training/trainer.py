"""The training loop: sample, score, loss, backward, step, log, eval, checkpoint.

One step, as it reads in ``Trainer.step``::

    builders = dataset.get_batch(step)                         env groups (one per task/prompt)
    groups   = do_rollouts(builders, policy, renderer, ...)    all episodes concurrently
    scored   = score_trajectories(teacher, trajectories, ...)  the teacher's view of each one
    for micro_batch in pack(scored):                           loss -> backward (accumulated)
        objective(StudentForward(model, micro_batch), micro_batch, token_count).loss.backward()
    clip, optimizer.step(), scheduler.step(); sampler.update_weights(model)

Every part is swappable through a small protocol: the dataset and its envs (``envs.types``),
the ``Sampler`` and ``Teacher`` (``training.types``), the rollout ``Policy``
(``training.rollouts``) and the ``Objective`` (``training.objectives``). The first
``sft_warmup_steps`` steps can use a different policy (e.g. scripted demonstrations) with the
SFT objective, and an ``off_policy`` mix (GKD's ``lmbda``) makes some steps off-policy:
teacher-written turns with its own objective (``Trainer.phase``). Sampling and training
alternate synchronously (the samples of a step always come from the weights the step updates);
the seams to overlap them later are the policy (sample from a stale copy) and ``step``'s
phases.

Distillation has no reward: the teacher's per-token scores are the only signal. Parse errors,
overflows and tool errors are metrics, never penalties. Invalid episodes (infrastructure
failures) are counted and never trained on.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm.auto import tqdm

from envs.types import Dataset
from tool_use.errors import RewardError
from tool_use.renderers.base import Renderer
from tool_use.trajectory import Trajectory
from tool_use.types import ToolChoice
from training import checkpoints, models
from training.errors import CheckpointError
from training.eval import evaluate
from training.metrics import (
    RunLogger,
    Timer,
    by_tag,
    progress,
    rollout_metrics,
    tagged,
    weighted_mean,
)
from training.objectives import (
    SFT,
    LossName,
    Objective,
    StudentForward,
    make_objective,
    pack,
)
from training.off_policy import LmbdaMix
from training.reports import write_reports
from training.rollouts import (
    DEFAULT_ENV_TIMEOUT_S,
    Policy,
    RolloutSettings,
    SamplerPolicy,
    do_rollouts,
    get_batch,
)
from training.scoring import (
    ScoredSequence,
    TrajectoryTeacher,
    attach_teacher_logprobs,
    score_trajectories,
    unscored,
)
from training.teachers import LocalTeacher
from training.teachers.multi import per_teacher_metrics
from training.types import Sampler, Teacher

log = logging.getLogger(__name__)

WARMUP_DIR = "warmup"
"""Where a run with ``teacher_from_warmup`` keeps the warm-started student's weights."""


class TrainerConfig(BaseModel):
    """Every knob of the training loop (recipes extend it with their models and envs)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    # ---- run ----
    log_path: str | None = None
    """The run's folder (config.json, metrics.jsonl, rollouts/, checkpoints/, export/).
    Default: runs/<recipe>-<timestamp>."""
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps; None: one pass over the training dataset. More steps than the dataset has
    batches start over from its first batch."""
    seed: int = 0
    """Seeds sampling, data order and adapter initialisation."""
    resume: bool | Path = False
    """true: continue from the newest checkpoint in log_path; PATH: from that checkpoint folder
    or run folder (log_path defaults to that run). Restores weights, optimizer, scheduler, RNG
    and data position."""

    # ---- loss ----
    loss: LossName = LossName.SAMPLED_REVERSE_KL
    """sampled_reverse_kl (on-policy distillation) | jsd | topk_forward_kl | sft."""
    kl_penalty_coef: float = 1.0
    """Scale of the per-token reverse-KL advantage (sampled_reverse_kl)."""
    kl_discount_factor: float = Field(0.0, ge=0.0, le=1.0)
    """Credit each student token with the discounted KL of later student tokens (0: none)."""
    clip_ratio: float | None = Field(None, gt=0.0, lt=1.0)
    """PPO-style clipping of the importance ratio (sampled_reverse_kl); None: no clipping."""
    beta: float = Field(0.5, ge=0.0, le=1.0)
    """jsd: 0 forward KL(teacher||student), 1 reverse KL, in between the generalized JSD."""
    top_k: int = Field(20, ge=0)
    """Teacher alternatives per token for topk_forward_kl, and for jsd with a server teacher."""

    # ---- sampling ----
    temperature: float = Field(1.0, gt=0.0)
    """Student sampling temperature (the losses use the same one)."""
    max_tokens: int = Field(256, ge=1)
    """Sampling budget of one assistant turn."""
    max_trajectory_tokens: int | None = Field(2048, ge=2)
    """Budget of one training sequence: prompt, env answers and samples."""
    tool_choice: ToolChoice = "auto"
    """auto | required (every turn opens a tool call: the sampler forces the renderer's
    envelope prefix) | none."""
    env_timeout_s: float | None = Field(DEFAULT_ENV_TIMEOUT_S, gt=0)
    """The longest one call into an env's code may take (make_envs, one step with its tools and
    reward, compute_group_rewards, close); past it the episode (for make_envs and
    compute_group_rewards: the group) is invalid, failure/timeout, with a warning naming the
    builder. Sampling is not counted. null: no limit (a hung env then stalls the run)."""

    # ---- optimisation ----
    learning_rate: float = Field(1e-4, gt=0.0)
    """AdamW learning rate (after warmup)."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """After warmup: constant, or linear / cosine decay to 0 at max_steps."""
    warmup_steps: int = Field(0, ge=0)
    """Linear learning-rate warmup from 0."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay."""
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    """Clip the gradient norm (None: no clipping)."""
    microbatch_tokens: int = Field(4096, ge=1)
    """Padded tokens per forward/backward; gradients are accumulated over the batch."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them: less memory for
    about a third more training compute."""
    sft_warmup_steps: int = Field(0, ge=0)
    """First steps trained with SFT on demonstrations (the recipe's scripted policy) before the
    chosen loss takes over."""
    teacher_from_warmup: bool = False
    """After the SFT warm start, the teacher is a frozen copy of the warm-started student, still
    scoring under the privileged prompts (self-distillation with privileged information): for
    teachers that cannot act in the env's format on their own. Saved to warmup/ for resumes."""

    # ---- eval, checkpoints, logs ----
    eval_every: int = Field(10, ge=0)
    """Evaluate every this many steps (0: never mid-run); also before training and at the end."""
    eval_before: bool = True
    """Evaluate before the first step (skipped when resuming)."""
    eval_temperature: float = Field(0.0, ge=0.0)
    """Sampling temperature of eval episodes (0: greedy)."""
    save_every: int = Field(10, ge=0)
    """Checkpoint every this many steps (0: only at the end)."""
    keep_last: int = Field(3, ge=1)
    """Checkpoints kept (older ones are deleted)."""
    export_merged: bool = False
    """At the end, also export a merged model that transformers loads as is (LoRA runs always
    export their adapter)."""
    save_rollouts: bool = True
    """Write each step's trajectories to rollouts/step_XXXX.jsonl."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project (needs the wandb package)."""
    wandb_run_name: str | None = None
    """The wandb run's name (default: the log folder's name)."""
    progress: bool = True
    """Progress bars and one line per step on the terminal."""

    @field_validator("resume", mode="before")
    @classmethod
    def _resume(cls, value: Any) -> Any:
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in ("true", "yes", "1"):
                return True
            if lowered in ("false", "no", "0", ""):
                return False
            return Path(value)
        return value


class Phase(StrEnum):
    """What a step trains on (``Trainer.phase``); logged as ``phase/<name>``."""

    ON_POLICY = "on_policy"
    """The student samples; the objective trains on its own samples."""
    OFF_POLICY = "off_policy"
    """An off-policy step of the ``lmbda`` mix: teacher-written turns (``training.off_policy``)."""
    SFT_WARMUP = "sft_warmup"
    """One of the first ``sft_warmup_steps``: demonstrations trained with SFT."""


@dataclass
class TrainResult:
    """What a finished run produced."""

    log_path: Path
    steps: int
    checkpoint: Path | None
    exported: dict[str, Path] = field(default_factory=dict)
    history: dict[str, Any] = field(default_factory=dict)
    """first/last teacher KL, eval before/after, ... (``Trainer.history``)."""


StepCallback = Callable[[int, Mapping[str, float]], None]
"""Called after each step with (steps done, the step's metrics)."""


def config_objective(config: TrainerConfig, full_vocabulary: bool = True) -> Objective:
    """The objective that ``config``'s loss keys describe."""
    return make_objective(
        config.loss,
        temperature=config.temperature,
        kl_penalty_coef=config.kl_penalty_coef,
        kl_discount_factor=config.kl_discount_factor,
        clip_ratio=config.clip_ratio,
        beta=config.beta,
        top_k=config.top_k,
        full_vocabulary=full_vocabulary,
    )


class Trainer:
    """Owns the trainable model, its optimizer and schedule, and runs the loop.

    ``model`` is trained in place (a peft model for LoRA, or a plain one); ``sampler`` samples
    the student (usually from the same module), ``teacher`` scores under ``teacher_renderer``
    (None: the student's rendering; several teachers: a ``TrajectoryTeacher``).
    ``demonstrations`` is the policy of the SFT warmup steps; ``off_policy`` mixes in
    off-policy steps (GKD's ``lmbda``, ``training.off_policy``).
    """

    def __init__(
        self,
        config: TrainerConfig,
        *,
        model: torch.nn.Module,
        renderer: Renderer,
        sampler: Sampler,
        teacher: Teacher | TrajectoryTeacher | None,
        dataset: Dataset,
        log_path: str | Path,
        teacher_renderer: Renderer | None = None,
        eval_dataset: Dataset | None = None,
        objective: Objective | None = None,
        demonstrations: Policy | None = None,
        off_policy: LmbdaMix | None = None,
        tokenizer: Any = None,
        full_vocabulary_teacher: bool = True,
        run_config: Mapping[str, Any] | None = None,
        callbacks: Sequence[StepCallback] = (),
    ) -> None:
        self.config = config
        self.model = model
        self.renderer = renderer
        self.sampler = sampler
        self.teacher = teacher
        self.teacher_renderer = teacher_renderer
        self.dataset = dataset
        self.eval_dataset = eval_dataset
        self.tokenizer = tokenizer
        self.callbacks = list(callbacks)
        self.objective = objective or config_objective(config, full_vocabulary_teacher)
        if config.teacher_from_warmup and not config.sft_warmup_steps:
            raise ValueError("teacher_from_warmup=true needs sft_warmup_steps > 0")
        if (
            self.objective.teacher_request.needed
            and teacher is None
            and not config.teacher_from_warmup
        ):
            raise ValueError(f"loss={config.loss} needs a teacher")
        if config.sft_warmup_steps and demonstrations is None:
            raise ValueError("sft_warmup_steps > 0 needs a demonstrations policy")
        if len(dataset) == 0:
            raise ValueError("the training dataset has no batches")
        forced = len(renderer.tool_call_prefix)
        if config.tool_choice == "required" and config.max_tokens <= forced:
            raise ValueError(
                f"max_tokens={config.max_tokens} leaves no room to sample with "
                f"tool_choice=required: the forced tool-call prefix alone is {forced} tokens"
            )
        self.policy = SamplerPolicy(sampler, temperature=config.temperature)
        self.eval_policy = SamplerPolicy(sampler, temperature=config.eval_temperature)
        self.demonstrations = demonstrations
        self.off_policy = off_policy
        self.settings = RolloutSettings(
            max_tokens=config.max_tokens,
            max_trajectory_tokens=config.max_trajectory_tokens,
            tool_choice=config.tool_choice,
            env_timeout_s=config.env_timeout_s,
        )
        self.max_steps = config.max_steps or len(dataset)
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        if not self.parameters:
            raise ValueError("the model has no trainable parameters")
        if config.gradient_checkpointing:
            models.enable_gradient_checkpointing(model)
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.log_path = Path(log_path)
        self.run_config = dict(run_config or config.model_dump(mode="json"))
        self.logger = RunLogger(
            self.log_path,
            wandb_project=config.wandb_project,
            wandb_run_name=config.wandb_run_name,
            config=self.run_config,
        )
        self.checkpointer = checkpoints.Checkpointer(
            self.log_path, config.save_every, keep_last=config.keep_last
        )
        self.history: dict[str, Any] = {}
        """Numbers the closing summary needs, kept across resumes (checkpoint metrics_state)."""
        self.step_index = 0
        """Steps completed."""

    # ---- the loop ---------------------------------------------------------------------------

    async def train(self) -> TrainResult:
        """Run (or resume) to ``max_steps``; evaluate, checkpoint and export as configured."""
        self.logger.write_config(self.run_config)
        await self._resume()
        bar = tqdm(
            total=self.max_steps,
            initial=self.step_index,
            desc="steps",
            unit="step",
            disable=not self.config.progress,
        )
        try:
            # The sampler samples the student's own weights from the first rollout on: a
            # resumed run's, or a student loaded with a checkpoint (a vLLM sampler starts from
            # the base model; HFSampler holds the model itself and only refreshes its merged
            # LoRA copy before the next turn).
            await self.sampler.update_weights(self.model)
            if self.step_index == 0 and self.config.eval_before and self.eval_dataset:
                eval_metrics = await self.evaluate(0)
                self.logger.log(0, eval_metrics)
            while self.step_index < self.max_steps:
                metrics = await self.step(self.step_index)
                self.step_index += 1
                done = self.step_index
                if self.config.teacher_from_warmup and done == self.config.sft_warmup_steps:
                    await self._teacher_from_warmup(save=True)
                if self._eval_due(done):
                    metrics.update(await self.evaluate(done))
                self.logger.log(done, metrics)
                self._remember(done, metrics)
                self._print(done, metrics)
                bar.update(1)
                self.checkpointer.maybe_save(
                    self._state(), self.model, self.optimizer, self.scheduler
                )
                for callback in self.callbacks:
                    callback(done, metrics)
            checkpoint = self.checkpointer.maybe_save(
                self._state(), self.model, self.optimizer, self.scheduler, final=True
            )
            exported = self.export()
        finally:
            bar.close()
            self.logger.close()
        latest = checkpoint or self.checkpointer.latest()
        result = TrainResult(self.log_path, self.step_index, latest, exported, dict(self.history))
        paths = {"checkpoint": str(latest), **{k: str(v) for k, v in exported.items()}}
        summary = json.dumps({**self.history, **paths}, indent=2)
        (self.log_path / "summary.json").write_text(summary + "\n")
        self.write_reports()
        return result

    def write_reports(self) -> None:
        """``report.png`` and ``rollouts.html`` (``training.reports``); a failure is logged,
        never allowed to spoil a finished run."""
        try:
            write_reports(self.log_path, tokenizer=self.tokenizer)
        except Exception:
            log.exception("could not write the run reports into %s", self.log_path)

    def phase(self, step: int) -> tuple[Phase, Policy, Objective]:
        """Who writes step ``step``'s assistant turns and what trains on them: the SFT warmup
        (demonstrations, SFT), an off-policy step of the ``lmbda`` mix, or the student."""
        if step < self.config.sft_warmup_steps:
            assert self.demonstrations is not None
            return Phase.SFT_WARMUP, self.demonstrations, SFT()
        if self.off_policy is not None and not self.off_policy.on_policy(step):
            return Phase.OFF_POLICY, self.off_policy.policy, self.off_policy.objective
        return Phase.ON_POLICY, self.policy, self.objective

    async def step(self, step: int) -> dict[str, float]:
        """One optimizer step on batch ``step``; returns its metrics."""
        timer = Timer()
        phase, policy, objective = self.phase(step)
        self._reseed(step)
        builders = get_batch(self.dataset, step % len(self.dataset), step=step + 1)
        with timer("rollout"):
            try:
                groups = await do_rollouts(
                    builders, policy, self.renderer, self.settings, progress=self._bar("rollout")
                )
            except RewardError as bug:  # a bug in the env: keep the step's episodes, then stop
                self._write_rollouts(f"step_{step + 1:04d}", bug.trajectories, step + 1)
                raise
        trajectories = [t for group in groups for t in group.trajectories]
        for trajectory in trajectories:
            trajectory.metadata["step"] = step + 1
        sleep = getattr(self.sampler, "sleep", None)  # optional: free decoding-only memory
        if sleep is not None:
            await sleep()
        prepare = getattr(objective, "prepare", None)
        if prepare is not None:
            prepare(trajectories)
        with timer("score"):
            scored = await self.score(trajectories, objective)
        with timer("train"):
            train_metrics = self.update(scored, objective)
        await self.sampler.update_weights(self.model)
        if self.config.save_rollouts:
            attach_teacher_logprobs(trajectories, scored)
            self.logger.write_rollouts(f"step_{step + 1:04d}", trajectories)
        # The teacher KL measures the student's own samples: not teacher-written ones.
        on_policy = phase is Phase.ON_POLICY
        metrics = {
            **rollout_metrics(trajectories),
            **(teacher_metrics(scored) if on_policy else {}),
            **(per_teacher_metrics(scored) if on_policy else {}),
            **train_metrics,
            **timer.times,
            "phase/sft_warmup": float(phase is Phase.SFT_WARMUP),
        }
        metrics.update(tag_metrics(trajectories, scored if on_policy else None))
        if self.off_policy is not None:
            metrics["phase/off_policy"] = float(phase is Phase.OFF_POLICY)
        metrics["time/step"] = sum(timer.times.values())
        return metrics

    async def score(
        self, trajectories: Sequence[Trajectory], objective: Objective
    ) -> list[ScoredSequence]:
        """The teacher's scores of every valid sequence (none when the objective needs none)."""
        request = objective.teacher_request
        if not request.needed or self.teacher is None:
            return unscored(trajectories)
        return await score_trajectories(
            self.teacher,
            trajectories,
            teacher_renderer=self.teacher_renderer,
            student_renderer=self.renderer,
            request=request,
            progress=self.config.progress,
        )

    def update(self, scored: Sequence[ScoredSequence], objective: Objective) -> dict[str, float]:
        """Accumulate the objective's gradients over micro-batches, clip, step."""
        token_count = sum(s.num_student_tokens for s in scored)
        lr = self.optimizer.param_groups[0]["lr"]
        if token_count == 0:  # no optimizer step, so the schedule does not move either
            log.warning("no student tokens in this batch (every episode invalid?): no update")
            return {"lr": lr, "train/skipped": 1.0}
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        batches = pack(scored, self.config.microbatch_tokens)
        parts: list[tuple[dict[str, float], float]] = []
        total_loss = 0.0
        bar = progress(len(batches), "train", enabled=self.config.progress, unit="mb")
        try:
            for batch in batches:
                out = objective(StudentForward(self.model, batch), batch, token_count)
                out.loss.backward()
                total_loss += float(out.loss.detach())
                # teacher_kl is logged once, from the scores (teacher_metrics)
                named = {
                    f"loss/{k}": v
                    for k, v in out.metrics.items()
                    if k not in ("tokens", "teacher_kl")
                }
                parts.append(({**named, "entropy": out.entropy}, batch.num_student_tokens))
                bar.update(1)
        finally:
            bar.close()
        max_norm = self.config.max_grad_norm or math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.parameters, max_norm))
        self.optimizer.step()
        self.scheduler.step()
        return {
            **weighted_mean(parts),
            "loss": total_loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "train/microbatches": float(len(batches)),
        }

    async def evaluate(self, step: int) -> dict[str, float]:
        """Eval metrics (``eval/...``) after ``step`` steps; writes rollouts/eval_XXXX.jsonl."""
        if self.eval_dataset is None:
            return {}
        self._reseed(step, stream=1)
        timer = Timer()
        with timer("eval"):
            try:
                metrics, trajectories = await evaluate(
                    self.eval_dataset,
                    self.eval_policy,
                    self.renderer,
                    self.settings,
                    progress=self.config.progress,
                )
            except RewardError as bug:  # a bug in the env: keep the episodes, then stop
                self._write_rollouts(f"eval_{step:04d}", bug.trajectories)
                raise
        if self.teacher is not None:
            with timer("eval_score"):
                scored = await score_trajectories(
                    self.teacher,
                    trajectories,
                    teacher_renderer=self.teacher_renderer,
                    student_renderer=self.renderer,
                    progress=self.config.progress,
                )
            attach_teacher_logprobs(trajectories, scored)
            metrics.update(eval_teacher_metrics(trajectories))
            for tag, members in by_tag(trajectories, lambda t: t.metadata).items():
                metrics.update(eval_teacher_metrics(members, prefix=f"eval/{tag}/"))
        if self.config.save_rollouts:
            self.logger.write_rollouts(f"eval_{step:04d}", trajectories)
        rate = metrics.get("eval/success_rate")
        if step == 0:
            self.history["eval_before"] = rate
        self.history["eval_after"] = rate
        self.history["eval_after_step"] = step
        record = {"step": step, "success_rate": rate}
        for key in ("episodes/valid", "episodes/invalid"):  # the summary's graded / ungradeable
            if f"eval/{key}" in metrics:
                record[key] = metrics[f"eval/{key}"]
        if "eval/env/tool_calls" in metrics:
            record["tool_calls"] = metrics["eval/env/tool_calls"]
        self.history["evals"] = [*self.history.get("evals", []), record]
        if step == 0:
            self._print(0, metrics)
        return {**metrics, **timer.times}

    def export(self) -> dict[str, Path]:
        """The final weights: ``export/adapter`` (LoRA) and, when asked or for full
        fine-tuning, ``export/merged``."""
        out: dict[str, Path] = {}
        is_lora = hasattr(self.model, "peft_config")
        if is_lora:
            out["adapter"] = checkpoints.export_adapter(
                self.model, self.log_path / "export" / "adapter", self.tokenizer
            )
        if self.config.export_merged or not is_lora:
            out["merged"] = checkpoints.export_merged(
                self.model, self.log_path / "export" / "merged", self.tokenizer
            )
        return out

    # ---- internals --------------------------------------------------------------------------

    def _lr_factor(self, step: int) -> float:
        warmup = self.config.warmup_steps
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if self.config.lr_schedule == "constant":
            return 1.0
        span = max(self.max_steps - warmup, 1)
        progress_ = min(max(step - warmup, 0) / span, 1.0)
        if self.config.lr_schedule == "linear":
            return 1.0 - progress_
        return 0.5 * (1.0 + math.cos(math.pi * progress_))

    def _eval_due(self, done: int) -> bool:
        if self.eval_dataset is None:
            return False
        every = self.config.eval_every
        return done == self.max_steps or (every > 0 and done % every == 0)

    def _reseed(self, step: int, stream: int = 0) -> None:
        """Sampling draws depend only on (seed, step), so a resumed run samples what an
        uninterrupted one would have."""
        reseed = getattr(self.sampler, "reseed", None)
        if reseed is not None:
            reseed(self.config.seed * 1_000_003 + step * 2 + stream)

    def _state(self) -> checkpoints.TrainingState:
        return checkpoints.TrainingState(
            step=self.step_index,
            data_state={"next_batch": self.step_index},
            metrics_state=dict(self.history),
            config=self.run_config,
        )

    async def _resume(self) -> None:
        resume = self.config.resume
        if resume is False:
            return
        source = self.log_path if resume is True else Path(resume)
        try:
            folder = checkpoints.resolve_checkpoint(source)
        except CheckpointError:
            if resume is True and checkpoints.latest_checkpoint(self.log_path) is None:
                raise CheckpointError(
                    f"resume=true: no checkpoint in {self.log_path / checkpoints.CHECKPOINTS}; "
                    "set log_path to the folder of the run to continue, or resume=PATH"
                ) from None
            raise
        checkpoints.refuse_later_checkpoints(self.log_path, folder)
        state = checkpoints.load_checkpoint(folder, self.model, self.optimizer, self.scheduler)
        self.step_index = state.step
        self.history = dict(state.metrics_state)
        changed = sorted(
            key
            for key in set(state.config) | set(self.run_config)
            if key not in ("resume", "log_path", "max_steps", "progress")
            and state.config.get(key) != self.run_config.get(key)
        )
        if changed:
            log.warning("resuming %s with a changed config: %s", folder, ", ".join(changed))
        self.logger.truncate_after(state.step)
        warmup = self.config.sft_warmup_steps
        if self.config.teacher_from_warmup and state.step >= warmup:
            await self._teacher_from_warmup(save=False)
        log.info("resumed from %s after %d steps", folder, state.step)

    async def _teacher_from_warmup(self, *, save: bool) -> None:
        """Make a frozen copy of the warm-started student the teacher. ``save``: write the
        warm-start weights to ``warmup/`` first; else (resuming) read them back from there."""
        folder = self.log_path / WARMUP_DIR
        is_lora = hasattr(self.model, "peft_config")
        if save:
            export = checkpoints.export_adapter if is_lora else checkpoints.export_merged
            export(self.model, folder, self.tokenizer)
        frozen = copy.deepcopy(self.model)
        if not save:
            _load_weights_into(frozen, folder, is_lora)
        if is_lora:
            frozen = frozen.merge_and_unload()
        frozen.eval().requires_grad_(False)
        if self.teacher is not None:
            await self.teacher.close()
        self.teacher = LocalTeacher(frozen, self.tokenizer, name="warm-started student")
        self.teacher_renderer = self.renderer
        log.info("the teacher is now the warm-started student (weights in %s)", folder)

    def _remember(self, done: int, metrics: Mapping[str, float]) -> None:
        kl = metrics.get("teacher_kl")
        if kl is not None and math.isfinite(kl):
            self.history.setdefault("teacher_kl_first", kl)
            self.history.setdefault("teacher_kl_first_step", done)
            self.history["teacher_kl_last"] = kl
            self.history["teacher_kl_last_step"] = done
        self.history["steps"] = done

    def _write_rollouts(
        self, name: str, trajectories: Sequence[Trajectory], step: int | None = None
    ) -> None:
        """The rollout file of a step or evaluation that stops on a bug (nothing is lost)."""
        if not self.config.save_rollouts:
            return
        if step is not None:
            for trajectory in trajectories:
                trajectory.metadata["step"] = step
        path = self.logger.write_rollouts(name, trajectories)
        log.error("a bug in an env stopped the run; its episodes are in %s", path)

    def _bar(self, label: str) -> str | None:
        return label if self.config.progress else None

    def _print(self, done: int, metrics: Mapping[str, float]) -> None:
        if not self.config.progress:
            return
        shown = [f"step {done}/{self.max_steps}"]
        for key, label, fmt in (
            ("teacher_kl", "kl", "{:.3f}"),
            ("entropy", "entropy", "{:.2f}"),
            ("loss/nll", "nll", "{:.3f}"),
            ("episodes/valid", "valid", "{:.0f}"),
            ("episodes/invalid", "invalid", "{:.0f}"),
            ("env/tool_calls", "calls/ep", "{:.2f}"),
            ("eval/success_rate", "eval success", "{:.2f}"),
            ("time/rollout", "rollout", "{:.0f}s"),
            ("time/score", "score", "{:.0f}s"),
            ("time/train", "train", "{:.0f}s"),
            ("time/eval", "eval", "{:.0f}s"),
        ):
            value = metrics.get(key)
            if value is not None and math.isfinite(value):
                shown.append(f"{label} {fmt.format(value)}")
        tqdm.write("  ".join(shown))


def _load_weights_into(model: torch.nn.Module, folder: Path, is_lora: bool) -> None:
    """Weights exported by ``export_adapter`` / ``export_merged`` into a model of the same
    shape."""
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder} is missing: a run with teacher_from_warmup saves the warm-started "
            "student there when the warm start ends; it cannot resume without it"
        )
    if is_lora:
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        set_peft_model_state_dict(model, load_peft_weights(str(folder), device="cpu"))
    else:
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(folder, dtype=model.dtype)
        model.load_state_dict(saved.state_dict())


def teacher_metrics(scored: Sequence[ScoredSequence]) -> dict[str, float]:
    """``teacher_kl``: the mean of (sampling logprob - teacher logprob) over student tokens, a
    one-sample estimate of the per-token KL(student || teacher); absent without teacher scores."""
    gaps, count = 0.0, 0
    for sequence in scored:
        if sequence.teacher_logprobs is None:
            continue
        mask = torch.tensor(sequence.mask, dtype=torch.bool)
        sampling = torch.tensor(sequence.sampling_logprobs, dtype=torch.float64)
        teacher = sequence.teacher_logprobs.double()
        gaps += float((sampling - teacher)[mask].sum())
        count += int(mask.sum())
    return {"teacher_kl": gaps / count} if count else {}


def tag_metrics(
    trajectories: Sequence[Trajectory], scored: Sequence[ScoredSequence] | None = None
) -> dict[str, float]:
    """Per logging tag, the numbers of the groups that carry it, as ``<tag>/<key>``: their
    ``rollout_metrics`` and, with ``scored``, their ``teacher_kl``."""
    out: dict[str, float] = {}
    sequences = by_tag(scored or (), lambda s: s.metadata)
    for tag, members in by_tag(trajectories, lambda t: t.metadata).items():
        part = rollout_metrics(members)
        if scored is not None:
            part.update(teacher_metrics(sequences.get(tag, [])))
        out.update(tagged(part, tag))
    return out


def eval_teacher_metrics(
    trajectories: Sequence[Trajectory], prefix: str = "eval/"
) -> dict[str, float]:
    """``eval/teacher_kl``: the mean over the student tokens of evaluation episodes of the
    student's own logprob (temperature 1) minus the teacher's. Evaluation decodes greedily by
    default, and greedy tokens have no sampling logprob, so this is the student/teacher
    log-ratio on the student's greedy answers; with ``eval_temperature=1`` it is the usual
    one-sample estimate of the per-token KL(student || teacher). Absent without scores."""
    gaps, count = 0.0, 0
    for trajectory in trajectories:
        if not trajectory.valid:
            continue
        for sequence in trajectory.sequences:
            if len(sequence.teacher_logprobs) != len(sequence.tokens):
                continue
            for own, teacher, on in zip(
                sequence.model_logprobs, sequence.teacher_logprobs, sequence.mask, strict=True
            ):
                if on:
                    gaps += own - teacher
                    count += 1
    return {f"{prefix}teacher_kl": gaps / count} if count else {}
