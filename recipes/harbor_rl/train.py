"""RL on Harbor tasks with the verifier reward.

    python -m recipes.harbor_rl.train [key=value ...]                             (--help)

The student works on Harbor tasks in sandboxes (a bash tool, several turns), ``group_size``
episodes per task; each episode is graded by the task's own ``tests/test.sh`` (also when a token
budget cut it off). Advantages are group-centred (each reward minus its task group's mean,
optionally divided by the group's standard deviation, ``normalize_advantages``) and the loss is
the importance-sampled policy gradient (``losses.policy_gradient_loss``, PPO-clipped with
``clip_ratio``). A group whose episodes all score the same teaches nothing (advantage 0).
Held-out tasks are evaluated every ``eval_every`` steps (``eval/success_rate``).

With no arguments it runs offline: the embedded SmolLM2-135M-Instruct on the bundled suite
(train split; eval on the test split), local (bubblewrap) sandboxes. ``sft_warmup_steps``
first trains on the tasks' reference solutions. The trainer's distillation keys (teacher KL
scaling, ``beta``, ``top_k``, ``teacher_from_warmup``) are not keys here: there is no teacher.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from envs.harbor.builders import HarborDatasetBuilder
from recipes.common import (
    NO_EVAL_TASKS,
    HarborTaskKeys,
    StudentKeys,
    check_env_timeout,
    check_resume,
    cli,
    default_log_path,
    eval_split,
    load_student,
    make_sampler,
    run_config,
    run_training,
)
from recipes.distillation.harbor_multi_turn import check_backend, reference_script
from training.objectives import PolicyGradient
from training.rollouts import ScriptedPolicy
from training.trainer import Trainer, TrainerConfig, TrainResult

RECIPE = "harbor_rl"
NO_TEACHER = "RL learns from the task's verifier reward; there is no teacher"
"""Why the trainer's distillation keys do not apply here (``Config.excluded_keys``)."""


class Config(TrainerConfig, HarborTaskKeys, StudentKeys):
    """RL on Harbor tasks with the verifier reward."""

    excluded_keys: ClassVar[dict[str, str]] = {
        "kl_penalty_coef": f"it scales the teacher-KL advantage of distillation; {NO_TEACHER}",
        "kl_discount_factor": f"it discounts the teacher KL of later tokens; {NO_TEACHER}",
        "beta": f"it weighs the jsd distillation loss; {NO_TEACHER}",
        "top_k": f"it sets how many teacher alternatives per token are scored; {NO_TEACHER}",
        "teacher_from_warmup": f"it makes the warm-started student a teacher; {NO_TEACHER}",
    }

    loss: Literal["policy_gradient"] = "policy_gradient"
    """Always policy_gradient here (group-centred verifier rewards)."""
    clip_ratio: float | None = Field(None, gt=0.0, lt=1.0)
    """PPO-style clipping of the policy gradient's importance ratio; None: no clipping."""
    normalize_advantages: bool = False
    """Divide each group's centred rewards by their standard deviation (GRPO)."""
    group_size: int = Field(4, ge=2)
    """Episodes per task in a batch (advantages compare them, so at least 2)."""

    @field_validator("loss", mode="before")
    @classmethod
    def _only_policy_gradient(cls, value: Any) -> Any:
        if str(value) != "policy_gradient":
            raise ValueError(
                "harbor_rl trains on the verifier reward with the policy gradient, its only loss "
                "(policy_gradient); the distillation losses are in "
                "recipes.distillation.harbor_multi_turn"
            )
        return value


def build_trainer(config: Config) -> Trainer:
    check_resume(config)
    factory = check_backend(config.backend)
    builder = HarborDatasetBuilder(
        config.harbor_env_config(config.seed),
        factory,
    )
    train_tasks, eval_tasks = builder.load_split()
    dataset, eval_dataset = builder()
    check_env_timeout(config.env_timeout_s, [*train_tasks, *eval_tasks], config.command_timeout_s)
    print(eval_split(train_tasks, eval_tasks))
    student = load_student(config, config.seed)
    demonstrations = (
        ScriptedPolicy(reference_script(train_tasks), student.renderer)
        if config.sft_warmup_steps
        else None
    )
    log_path = default_log_path(RECIPE, config)
    return Trainer(
        config,
        model=student.model,
        tokenizer=student.tokenizer,
        renderer=student.renderer,
        sampler=make_sampler(config, student, config.seed),
        teacher=None,
        dataset=dataset,
        eval_dataset=eval_dataset,
        objective=PolicyGradient(
            clip_ratio=config.clip_ratio,
            temperature=config.temperature,
            normalize_std=config.normalize_advantages,
        ),
        demonstrations=demonstrations,
        log_path=log_path,
        run_config=run_config(config, log_path),
    )


async def main(config: Config) -> TrainResult:
    return await run_training(build_trainer(config), no_eval=NO_EVAL_TASKS)


if __name__ == "__main__":
    raise SystemExit(cli(main, Config))
