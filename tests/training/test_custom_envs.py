"""Your own environment through the trainer: what the protocols of ``envs.types`` promise and what
breaking them gets. Metrics split by logging tags (and mixture parts), ``env/<key>`` means over the
builders that report the key, hangs bounded by ``env_timeout_s`` (invalid episodes, envs still
closed), token envs under the trainer's budgets, rewards checked (sync functions allowed; a bad
reward is a named error raised after the step's rollouts are written), ``make_envs``,
``get_batch`` and ``logging_tags`` checked with errors that name the class, and no schedule step
without an optimizer step."""

from __future__ import annotations

import contextlib
import logging
import math
import re
import warnings

import anyio
import pytest
import torch

from envs.mixture import DatasetPart, MixedDataset
from tool_use.agent_env import AgentToolMessageEnv
from tool_use.errors import EnvironmentFailure, RewardError
from tool_use.renderers import get_renderer
from tool_use.trajectory import Trajectory, read_jsonl
from tool_use.types import Message, Observation, StepResult, StopReason
from training import models
from training.errors import EnvProtocolError, ModelLoadError
from training.metrics import read_metrics, rollout_metrics, tagged_success_metrics
from training.rollouts import RolloutSettings, ScriptedPolicy, do_rollouts, get_batch
from training.samplers import HFSampler
from training.teachers import LocalTeacher
from training.trainer import Trainer, TrainerConfig
from training.types import SampledTokens

FAST = dict(max_tokens=8, eval_every=0, save_every=0, progress=False, eval_before=False)


@pytest.fixture(scope="module")
def renderer(smollm2_tokenizer):
    return get_renderer(None, smollm2_tokenizer)


# ---- envs and builders of the tests -------------------------------------------------------------


class Closes:
    """Counts the envs closed."""

    def __init__(self) -> None:
        self.count = 0

    async def close(self) -> None:
        self.count += 1


def qa_env(closes: Closes | None = None, reward_fn=None, **kwargs) -> AgentToolMessageEnv:
    options = {"reward_fn": reward_fn} if reward_fn is not None else {}
    return AgentToolMessageEnv(
        initial_messages=[Message(role="user", content="Say hi.")],
        max_turns=1,
        on_close=closes.close if closes else None,
        **options,
        **kwargs,
    )


class QAGroup:
    """``size`` one-turn message envs."""

    def __init__(self, size: int = 2, *, tags=("qa",), make=None, group_rewards=None) -> None:
        self.size, self.tags, self.group_rewards = size, tags, group_rewards
        self.make = make or (lambda: qa_env())

    async def make_envs(self):
        return [self.make() for _ in range(self.size)]

    async def compute_group_rewards(self, trajectories):
        if self.group_rewards is not None:
            return await self.group_rewards(trajectories)
        return [0.0] * len(trajectories)

    def logging_tags(self):
        return list(self.tags) if isinstance(self.tags, tuple) else self.tags


class EchoEnv:
    """A token env that leaves ``max_tokens`` to the trainer: ``turns`` turns of 2 fixed env
    tokens, reward 1 (or ``reward``)."""

    def __init__(self, prompt: list[int], turns: int = 2, reward=1.0, closes=None) -> None:
        self.prompt, self.left, self.reward, self.closes = prompt, turns, reward, closes

    async def initial_observation(self) -> Observation:
        return Observation(tokens=list(self.prompt))

    async def step(self, sampled) -> StepResult:
        self.left -= 1
        if self.left == 0:
            return StepResult(
                done=True, next_observation=None, reward=self.reward, stop_reason="max_turns"
            )
        return StepResult(done=False, next_observation=Observation(tokens=[5, 6]))

    async def close(self) -> None:
        if self.closes is not None:
            await self.closes.close()


class EchoGroup(QAGroup):
    def __init__(self, prompt: list[int], size: int = 2, **kwargs) -> None:
        super().__init__(size, tags=("echo",), make=lambda: EchoEnv(prompt, **kwargs))


class ListDataset:
    def __init__(self, *batches) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def get_batch(self, index: int):
        return self.batches[index]()


def make_trainer(make_tiny_model, tokenizer, renderer, log_path, dataset, **overrides):
    config = TrainerConfig(**{**FAST, **overrides})
    torch.manual_seed(0)
    model = models.add_lora(make_tiny_model(seed=1).requires_grad_(True), models.LoraSettings(4))
    return Trainer(
        config,
        model=model,
        tokenizer=tokenizer,
        renderer=renderer,
        sampler=HFSampler(model, tokenizer, seed=0, batch_window_s=60.0),
        teacher=LocalTeacher(make_tiny_model(seed=2), tokenizer),
        teacher_renderer=renderer,
        dataset=dataset,
        log_path=log_path,
    )


def say_done(env) -> list[Message]:
    return [Message(role="assistant", content="Done.")]


# ---- 1, 2: metrics per tag, and env/<key> over the builders that report it ---------------------


def test_metrics_are_split_by_logging_tag_and_mixture_part(
    make_tiny_model, smollm2_tokenizer, renderer, tmp_path
):
    prompt = smollm2_tokenizer.encode("Say cat:")
    parts = [
        DatasetPart(ListDataset(lambda: [QAGroup()]), name="qa-part"),  # no route: name is a tag
        DatasetPart(ListDataset(lambda: [EchoGroup(prompt)])),
    ]
    trainer = make_trainer(
        make_tiny_model, smollm2_tokenizer, renderer, tmp_path, MixedDataset(parts), max_steps=1
    )
    anyio.run(trainer.train)
    (record,) = read_metrics(tmp_path)

    # the totals stay
    assert record["episodes"] == 4 and record["reward/mean"] == 0.5
    assert math.isfinite(record["teacher_kl"])
    # each tag: the episodes, rewards, env metrics and teacher KL of the groups carrying it
    assert record["qa/episodes"] == record["qa-part/episodes"] == record["echo/episodes"] == 2
    assert record["qa/reward/mean"] == 0.0 and record["echo/reward/mean"] == 1.0
    assert record["qa/env/turns"] == 1.0 and "echo/env/turns" not in record
    assert math.isfinite(record["qa/teacher_kl"]) and math.isfinite(record["echo/teacher_kl"])
    assert record["qa/teacher_kl"] == record["qa-part/teacher_kl"]
    assert record["qa/tokens/student"] + record["echo/tokens/student"] == record["tokens/student"]
    # the token env reports no turns: it does not halve the message envs' mean
    assert record["env/turns"] == 1.0
    step = list(read_jsonl(tmp_path / "rollouts" / "step_0001.jsonl"))
    assert {tuple(t.metadata["tags"]) for t in step} == {("qa", "qa-part"), ("echo",)}
    assert {t.metadata["builder"] for t in step} == {"QAGroup", "EchoGroup"}


def test_env_means_count_the_episodes_of_the_builders_that_report_the_key():
    def episode(builder: str, **metrics: float) -> Trajectory:
        return Trajectory(metrics=metrics, metadata={"builder": builder})

    metrics = rollout_metrics(
        [
            episode("Agent", turns=2.0, **{"tool_error/timeout": 1.0}),
            episode("Agent", turns=4.0),
            episode("Tokens"),
            episode("Tokens"),
        ]
    )
    assert metrics["env/turns"] == 3.0  # not 1.5: the token envs report no turns
    assert metrics["env/tool_error/timeout"] == 0.5  # a rate over the agent's episodes


def test_eval_metrics_are_split_by_tag():
    def episode(tag: str, reward: float) -> Trajectory:
        return Trajectory(reward=reward, metadata={"tags": [tag]})

    metrics = tagged_success_metrics([episode("math", 1.0), episode("math", 0.0), episode("qa", 1)])
    assert metrics["eval/success_rate"] == pytest.approx(2 / 3)
    assert metrics["eval/math/success_rate"] == 0.5 and metrics["eval/qa/success_rate"] == 1.0
    assert metrics["eval/qa/episodes"] == 1


# ---- 3: hangs -----------------------------------------------------------------------------------


async def forever(*args) -> float:
    await anyio.sleep_forever()
    return 0.0


class Hangs(QAGroup):
    """Hangs in ``where``: make_envs, compute_group_rewards or (its envs') close."""

    def __init__(self, where: str, closes: Closes) -> None:
        super().__init__(1, tags=("hangs",))
        self.where, self.closes = where, closes

    async def make_envs(self):
        if self.where == "make_envs":
            await anyio.sleep_forever()
        if self.where == "close":

            class Stuck(AgentToolMessageEnv):
                async def close(self) -> None:
                    await anyio.sleep_forever()

            return [Stuck(initial_messages=[Message(role="user", content="hi")], max_turns=1)]
        reward = forever if self.where == "reward" else None
        return [qa_env(self.closes, reward)]

    async def compute_group_rewards(self, trajectories):
        if self.where == "group_rewards":
            await anyio.sleep_forever()
        return [0.0] * len(trajectories)


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["reward", "make_envs", "group_rewards", "close"])
async def test_a_hung_env_call_becomes_an_invalid_episode_and_envs_are_closed(
    renderer, where, caplog
):
    closes = Closes()
    settings = RolloutSettings(max_tokens=16, env_timeout_s=0.3)
    healthy = QAGroup(make=lambda: qa_env(closes))
    with caplog.at_level(logging.WARNING), anyio.fail_after(30):
        hung, ok = await do_rollouts(
            [Hangs(where, closes), healthy], ScriptedPolicy(say_done, renderer), renderer, settings
        )
    assert all(t.valid for t in ok.trajectories)
    if where == "close":  # abandoned with a warning; the episode itself is fine
        assert hung.trajectories[0].valid
        assert "Hangs (group 0): Stuck.close() did not return within 0.3 s" in caplog.text
        return
    (episode,) = hung.trajectories
    assert not episode.valid and episode.failure.startswith("timeout:")
    assert rollout_metrics(hung.trajectories)["failure/timeout"] == 1.0
    assert closes.count == (3 if where != "make_envs" else 2)  # every env made was closed
    method = {"reward": "step", "make_envs": "make_envs", "group_rewards": "compute_group_rewards"}
    assert re.search(rf"{method[where]}\(\).* did not return within 0.3 s", caplog.text)
    assert "Hangs" in caplog.text  # the warning names the builder


def test_a_hung_reward_is_counted_in_the_trainer_metrics(
    make_tiny_model, smollm2_tokenizer, renderer, tmp_path
):
    dataset = ListDataset(lambda: [QAGroup(make=lambda: qa_env(reward_fn=forever)), QAGroup()])
    trainer = make_trainer(
        make_tiny_model,
        smollm2_tokenizer,
        renderer,
        tmp_path,
        dataset,
        max_steps=1,
        env_timeout_s=0.5,
    )
    assert trainer.settings.env_timeout_s == 0.5
    anyio.run(trainer.train)
    (record,) = read_metrics(tmp_path)
    assert record["episodes/invalid"] == 2 and record["failure/timeout"] == 2
    assert record["episodes/valid"] == 2 and record["tokens/student"] > 0


def test_env_timeout_is_a_trainer_key_with_a_default_in_every_recipe():
    from recipes.cli import format_help
    from recipes.distillation import harbor_multi_turn, on_policy

    assert TrainerConfig().env_timeout_s == 3600.0
    assert TrainerConfig(env_timeout_s=None).env_timeout_s is None
    for recipe in (on_policy, harbor_multi_turn):
        assert "env_timeout_s: float | null = 3600.0" in format_help(recipe.Config)


# ---- 4: token envs under the trainer's budgets ---------------------------------------------------


class FillPolicy:
    """Samples exactly the observation's budget (token 7), recording each budget."""

    def __init__(self) -> None:
        self.budgets: list[int | None] = []

    def sample_fn(self, env):
        async def sample(context, observation) -> SampledTokens:
            self.budgets.append(observation.max_tokens)
            n = observation.max_tokens or 0
            return SampledTokens([7] * n, [-1.0] * n, [-1.0] * n, finish_reason="length")

        return sample

    def track_episode(self):
        return contextlib.nullcontext()


@pytest.mark.anyio
async def test_token_envs_get_the_trainers_max_tokens_and_trajectory_budget(renderer):
    # prompt 3, then turns of 5 with 2 env tokens between: 3+5, +2+5, +2+3 = 20 = the cap
    settings = RolloutSettings(max_tokens=5, max_trajectory_tokens=20)
    policy = FillPolicy()
    (group,) = await do_rollouts(
        [EchoGroup([1, 2, 3], size=1, turns=10)], policy, renderer, settings
    )
    (episode,) = group.trajectories
    assert policy.budgets == [5, 5, 3]
    assert episode.valid and episode.stop_reason == StopReason.CONTEXT_OVERFLOW
    assert [len(s) for s in episode.sequences] == [20] and episode.reward == 0.0

    (long,) = await do_rollouts([EchoGroup(list(range(20)), size=1)], policy, renderer, settings)
    assert long.trajectories[0].failure.startswith("prompt_too_long:")


# ---- 5: rewards --------------------------------------------------------------------------------


def sync_reward(messages) -> float:
    return 0.5


async def none_reward(messages):
    return None


async def str_reward(messages):
    return "correct"


async def nan_reward(messages):
    return float("nan")


def inf_reward(messages):
    return math.inf


def huge_reward(messages):
    return 10**400  # an int float() cannot hold


async def raising_reward(messages):
    raise KeyError("expected_answer")


@pytest.mark.anyio
async def test_sync_reward_functions_are_called(renderer):
    (group,) = await do_rollouts(
        [QAGroup(make=lambda: qa_env(reward_fn=sync_reward))],
        ScriptedPolicy(say_done, renderer),
        renderer,
    )
    assert [t.reward for t in group.trajectories] == [0.5, 0.5]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "reward_fn, shown",
    [
        (none_reward, "returned None"),
        (str_reward, "returned a str ('correct')"),
        (nan_reward, "returned nan"),
        (inf_reward, "returned inf"),
        (huge_reward, "returned a number beyond a float's range"),
        (raising_reward, "raised KeyError: 'expected_answer'"),
    ],
)
async def test_a_bad_reward_is_a_named_error_after_every_episode_finished(
    renderer, reward_fn, shown
):
    closes = Closes()
    groups = [QAGroup(make=lambda: qa_env(closes)), QAGroup(make=lambda: qa_env(closes, reward_fn))]
    with pytest.raises(RewardError) as caught:
        await do_rollouts(groups, ScriptedPolicy(say_done, renderer), renderer)
    error = caught.value
    message = str(error)
    assert message.startswith(
        f"QAGroup (group 1): AgentToolMessageEnv reward_fn {reward_fn.__name__} {shown}"
    )
    assert "expected a finite real number" in message and "\n" not in message
    if reward_fn is raising_reward:
        assert isinstance(error.__cause__, KeyError)
    # the other group's episodes finished; the failing ones are kept, marked invalid
    assert [t.valid for t in error.trajectories] == [True, True, False, False]
    assert all(t.failure.startswith("reward_fn:") for t in error.trajectories[2:])
    assert closes.count == 4


@pytest.mark.anyio
@pytest.mark.parametrize(
    "rewards, shown",
    [
        (None, "returned None"),
        ([0.0, math.nan], "returned nan as reward 1"),
        ([10**400, 0.0], "returned a number beyond a float's range as reward 0"),
        ([1.0], "returned 1 rewards for 2 trajectories"),
        (RuntimeError("judge down"), "raised RuntimeError: judge down"),
    ],
)
async def test_bad_group_rewards_are_named_errors(renderer, rewards, shown):
    async def group_rewards(trajectories):
        if isinstance(rewards, Exception):
            raise rewards
        return rewards

    with pytest.raises(RewardError) as caught:
        await do_rollouts(
            [QAGroup(group_rewards=group_rewards)], ScriptedPolicy(say_done, renderer), renderer
        )
    assert str(caught.value).startswith(f"QAGroup.compute_group_rewards() (group 0) {shown}")
    assert len(caught.value.trajectories) == 2
    if isinstance(rewards, Exception):
        assert caught.value.__cause__ is rewards


@pytest.mark.anyio
async def test_a_token_env_reward_must_be_a_finite_number(renderer):
    with pytest.raises(RewardError, match=r"EchoEnv.step\(\) .* returned nan"):
        await do_rollouts([EchoGroup([1, 2], size=1, reward=math.nan)], FillPolicy(), renderer)


def test_the_trainer_writes_the_steps_rollouts_before_a_reward_bug_stops_it(
    make_tiny_model, smollm2_tokenizer, renderer, tmp_path
):
    dataset = ListDataset(lambda: [QAGroup(), QAGroup(make=lambda: qa_env(reward_fn=none_reward))])
    trainer = make_trainer(
        make_tiny_model, smollm2_tokenizer, renderer, tmp_path, dataset, max_steps=1
    )
    with pytest.raises(RewardError, match="none_reward returned None"):
        anyio.run(trainer.train)
    step = list(read_jsonl(tmp_path / "rollouts" / "step_0001.jsonl"))
    assert [t.valid for t in step] == [True, True, False, False]
    assert all(t.metadata["step"] == 1 for t in step)


# ---- 6: make_envs -----------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    "made, shown",
    [
        (None, "returned None"),
        ([], "returned an empty list"),
        ("dict", "returned a dict at position 1"),
    ],
)
async def test_make_envs_must_return_envs(renderer, made, shown):
    closes = Closes()

    class CalculatorGroup(QAGroup):
        async def make_envs(self):
            if made == "dict":
                return [qa_env(closes), {"prompt": "What is 1 + 1?"}]
            return made

    healthy = QAGroup(make=lambda: qa_env(closes))
    with pytest.raises(EnvProtocolError) as caught:
        await do_rollouts(
            [healthy, CalculatorGroup()], ScriptedPolicy(say_done, renderer), renderer
        )
    assert str(caught.value).startswith(f"CalculatorGroup.make_envs() (group 1) {shown}; ")
    assert "expected a non-empty list of MessageEnv or TokenEnv objects" in str(caught.value)
    assert closes.count == (3 if made == "dict" else 2)  # nothing made is left open


@pytest.mark.anyio
async def test_an_exception_from_make_envs_names_the_builder(renderer):
    class CalculatorGroup(QAGroup):
        async def make_envs(self):
            raise FileNotFoundError("questions.jsonl")

    with pytest.raises(FileNotFoundError) as caught:
        await do_rollouts(
            [QAGroup(), CalculatorGroup()], ScriptedPolicy(say_done, renderer), renderer
        )
    assert "raised by CalculatorGroup.make_envs() (group 1)" in caught.value.__notes__


# ---- 9: datasets and tags ---------------------------------------------------------------------


def test_get_batch_may_return_any_iterable_and_its_mistakes_are_named(
    make_tiny_model, smollm2_tokenizer, renderer, tmp_path
):
    class Generator:
        def __len__(self):
            return 1

        def get_batch(self, index):
            return (QAGroup(size=1) for _ in range(2))

    trainer = make_trainer(
        make_tiny_model, smollm2_tokenizer, renderer, tmp_path / "g", Generator(), max_steps=1
    )
    anyio.run(trainer.train)
    (record,) = read_metrics(tmp_path / "g")
    assert record["episodes"] == 2 and record["qa/episodes"] == 2

    class RunsOut:
        def __init__(self):
            self.rows = ["a", "b"]

        def __len__(self):
            return 5

        def get_batch(self, index):
            return [QAGroup(size=1, tags=(self.rows[index],))]

    trainer = make_trainer(
        make_tiny_model, smollm2_tokenizer, renderer, tmp_path / "r", RunsOut(), max_steps=3
    )
    with pytest.raises(EnvProtocolError) as caught:
        anyio.run(trainer.train)
    assert str(caught.value).startswith(
        "RunsOut.get_batch(2) (step 3) raised IndexError (list index out of range), but "
        "len(RunsOut) is 5"
    )
    assert isinstance(caught.value.__cause__, IndexError)

    class Odd:
        def __len__(self):
            return 1

        def get_batch(self, index):
            return {"builders": []} if index == 0 else []

    with pytest.raises(EnvProtocolError, match=r"Odd.get_batch\(0\) returned a dict"):
        get_batch(Odd(), 0)


@pytest.mark.anyio
async def test_logging_tags_must_be_a_list_of_names(renderer):
    with pytest.raises(EnvProtocolError) as caught:
        await do_rollouts(
            [QAGroup(tags="calculator")], ScriptedPolicy(say_done, renderer), renderer
        )
    assert str(caught.value) == (
        "QAGroup.logging_tags() (group 0) returned a str ('calculator'); expected a list of "
        "non-empty str, such as ['calculator']"
    )


# ---- 11: no schedule step without an optimizer step ---------------------------------------------


def test_a_step_without_an_update_does_not_step_the_schedule(
    make_tiny_model, smollm2_tokenizer, renderer, tmp_path
):
    class Dead(QAGroup):
        async def make_envs(self):
            raise EnvironmentFailure("no sandbox", kind="sandbox")

    trainer = make_trainer(
        make_tiny_model,
        smollm2_tokenizer,
        renderer,
        tmp_path,
        ListDataset(lambda: [Dead()]),
        max_steps=1,
        warmup_steps=2,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        anyio.run(trainer.train)
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    assert trainer.scheduler.last_epoch == 0
    (record,) = read_metrics(tmp_path)
    assert record["train/skipped"] == 1.0 and record["failure/sandbox"] == 1.0


# ---- 8: the tiny random model ----------------------------------------------------------------


def test_tiny_random_is_a_model_name_for_smoke_tests(smollm2_tokenizer):
    torch.manual_seed(123)
    expected_draw = torch.rand(1)
    torch.manual_seed(123)
    student = models.load_model(models.TINY_RANDOM_MODEL, dtype="fp32")
    assert torch.rand(1) == expected_draw  # the caller's random stream is untouched
    teacher, tokenizer = models.load_frozen("tiny-random:1", dtype="fp32")
    assert len(tokenizer) == len(smollm2_tokenizer) == student.config.vocab_size
    assert student.config.num_hidden_layers == 2 and all(
        p.requires_grad for p in student.parameters()
    )
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    reference = models.tiny_random_llama(len(tokenizer), seed=0)
    assert torch.equal(student.lm_head.weight, reference.lm_head.weight)
    with pytest.raises(ModelLoadError, match="tiny-random:SEED"):
        models.load_model("tiny-random:x")
