"""The RL objective: group-centred advantages computed by hand, and a tiny random model that
learns from a verifier-style reward through the real trainer (rollouts, grading, policy
gradient) on a token-level env."""

from __future__ import annotations

import anyio
import pytest
import torch

from tool_use.renderers import get_renderer
from tool_use.trajectory import Trajectory, read_jsonl
from tool_use.types import Observation, StepResult, StopReason
from training import models
from training.metrics import read_metrics
from training.objectives import PolicyGradient
from training.samplers import HFSampler
from training.trainer import Trainer, TrainerConfig


def test_advantages_are_centred_within_each_group():
    trajectories = [
        Trajectory(reward=1.0, metadata={"group": 0}),
        Trajectory(reward=0.0, metadata={"group": 0}),
        Trajectory(reward=0.0, metadata={"group": 0}),
        Trajectory(reward=0.0, metadata={"group": 0}, failure="sandbox: dead"),
        Trajectory(reward=0.5, metadata={"group": 1}),
        Trajectory(reward=0.5, metadata={"group": 1}),
        Trajectory(reward=1.0, metadata={"group": 2}),
    ]
    PolicyGradient().prepare(trajectories)
    got = [t.metadata.get("advantage") for t in trajectories]
    assert got == pytest.approx([2 / 3, -1 / 3, -1 / 3, None, 0.0, 0.0, 0.0], abs=1e-6)
    PolicyGradient(normalize_std=True).prepare(trajectories)
    std = (((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 3) ** 0.5
    assert trajectories[0].metadata["advantage"] == pytest.approx((2 / 3) / std, abs=1e-5)
    assert trajectories[4].metadata["advantage"] == 0.0  # no spread, no signal


class FirstToken:
    """A token-level env over a 16-token vocabulary: one turn from a fixed prompt; the reward
    is 1 when the first sampled token is one of ``targets`` (a verifier that reads tokens)."""

    def __init__(self, targets: set[int]) -> None:
        self.targets = targets

    async def initial_observation(self) -> Observation:
        return Observation(tokens=list(PROMPT), max_tokens=3)

    async def step(self, sampled) -> StepResult:
        reward = float(bool(sampled) and sampled[0] in self.targets)
        return StepResult(
            done=True, next_observation=None, reward=reward, stop_reason=StopReason.NO_TOOL_CALL
        )

    async def close(self) -> None:
        pass


class FirstTokenGroup:
    def __init__(self, targets: set[int], size: int) -> None:
        self.targets, self.size = targets, size

    async def make_envs(self):
        return [FirstToken(self.targets) for _ in range(self.size)]

    async def compute_group_rewards(self, trajectories):
        return [0.0] * len(trajectories)

    def logging_tags(self):
        return ["first-token"]


class Repeat:
    def __init__(self, make, steps: int) -> None:
        self.make, self.steps = make, steps

    def __len__(self) -> int:
        return self.steps

    def get_batch(self, index: int):
        return self.make()


PROMPT = [1, 5, 9, 4]


def test_a_tiny_model_learns_from_the_reward(smollm2_tokenizer, tmp_path):
    torch.manual_seed(0)
    base = models.tiny_random_llama(16, seed=4).requires_grad_(True)
    with torch.no_grad():
        first = torch.softmax(base(torch.tensor([PROMPT])).logits[0, -1], dim=-1)
    # Rewarded: the likeliest tokens that are not already most of the mass, ~30% of it.
    targets: set[int] = set()
    for token in first.argsort(descending=True).tolist()[1:]:
        if float(first[list(targets)].sum()) >= 0.3:
            break
        targets.add(token)
    base_rate = float(first[list(targets)].sum())
    assert 0.3 <= base_rate <= 0.6, base_rate
    model = models.add_lora(base, models.LoraSettings(rank=8))
    config = TrainerConfig(
        max_steps=10,
        max_tokens=3,
        learning_rate=2e-2,
        eval_every=0,
        save_every=0,
        progress=False,
        seed=0,
    )
    trainer = Trainer(
        config,
        model=model,
        tokenizer=None,
        renderer=get_renderer(None, smollm2_tokenizer),
        sampler=HFSampler(model, eos_token_ids=[2], seed=0),
        teacher=None,
        dataset=Repeat(lambda: [FirstTokenGroup(targets, 8)] * 4, 10),
        objective=PolicyGradient(),
        log_path=tmp_path,
    )
    anyio.run(trainer.train)
    rewards = [r["reward/mean"] for r in read_metrics(tmp_path)]
    assert sum(rewards[-3:]) / 3 > base_rate + 0.25, (base_rate, rewards)
    step = list(read_jsonl(tmp_path / "rollouts" / "step_0001.jsonl"))
    by_group: dict[int, list[Trajectory]] = {}
    for trajectory in step:
        by_group.setdefault(trajectory.metadata["group"], []).append(trajectory)
    for group in by_group.values():
        mean = sum(t.reward for t in group) / len(group)
        for trajectory in group:
            assert trajectory.metadata["advantage"] == pytest.approx(trajectory.reward - mean)
