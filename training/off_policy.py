"""Off-policy batches: teacher-written responses, for SFT and GKD's ``lmbda`` mixing.

An off-policy batch is rolled out like any other (same envs, same trajectory format), but the
assistant turns come from elsewhere:

- ``reference_script``: the dataset's own reference responses (a prompt row's trailing
  assistant messages), replayed token for token by ``training.rollouts.ScriptedPolicy``;
- ``TeacherPolicy``: the teacher generates each turn from *its* view of the episode (its
  renderer, and the privileged ``teacher_messages`` when the env has them); the tokens are
  recorded as the turn, so they must parse with the student's renderer (teacher and student
  share a chat format, as they share a vocabulary).

``LmbdaMix`` decides, per step, whether a step is on-policy (probability ``lmbda``, drawn from
``(seed, step)`` alone, so a resumed run makes the same choices) and which objective an
off-policy step trains with: the chosen loss itself for the distribution losses (``jsd``,
``topk_forward_kl``: the teacher scores the teacher-written tokens, as in GKD), SFT for
``sampled_reverse_kl`` and ``sft`` (the sampled estimator is only defined on the student's own
samples).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tool_use.renderers.base import Renderer
from tool_use.token_env import SampleFn
from tool_use.types import Message, Observation, TokenEnv
from training.objectives import SFT, LossName, Objective
from training.rollouts import Policy, Script
from training.types import SampledTokens, Sampler, SamplingParams

ResponseKey = tuple[str, int]
"""``(source, row)``: where a prompt row came from (``envs.prompts`` env metadata)."""


def reference_script(responses: Mapping[ResponseKey, Sequence[Message]]) -> Script:
    """A ``ScriptedPolicy`` script replaying each row's reference response, found by the env's
    ``metadata["source"]`` and ``metadata["row"]``."""

    def script(env: TokenEnv) -> Sequence[Message]:
        metadata = getattr(env, "metadata", None) or {}
        key = (str(metadata.get("source", "")), int(metadata.get("row", -1)))
        if key not in responses:
            raise KeyError(
                f"no reference response for row {key[1]} of {key[0] or 'an unnamed dataset'}"
            )
        return list(responses[key])

    return script


class TeacherPolicy:
    """The teacher writes every turn (implements ``training.rollouts.Policy``)."""

    def __init__(self, sampler: Sampler, renderer: Renderer, *, temperature: float = 1.0) -> None:
        self.sampler = sampler
        self.renderer = renderer
        self.temperature = temperature

    def sample_fn(self, env: TokenEnv) -> SampleFn:
        initial: list[Message] | None = None

        async def sample(context: list[int], observation: Observation) -> SampledTokens:
            nonlocal initial
            history = list(getattr(env, "messages", ()))
            if initial is None:
                initial = history
            privileged = getattr(env, "teacher_messages", None)
            teacher_history = [*(privileged or initial), *history[len(initial) :]]
            prompt = self.renderer.render_prompt(teacher_history, list(getattr(env, "tools", ())))
            params = SamplingParams(
                max_tokens=observation.max_tokens or 256,
                temperature=self.temperature,
                stop_sequences=tuple(tuple(s) for s in self.renderer.stop_sequences),
            )
            return await self.sampler.sample(prompt, params)

        return sample

    def track_episode(self) -> contextlib.AbstractAsyncContextManager[None]:
        track = getattr(self.sampler, "track_episode", None)
        return track() if track is not None else contextlib.nullcontext()


def off_policy_objective(loss: LossName | str, on_policy: Objective) -> Objective:
    """What off-policy steps train with: the same distribution loss, else SFT."""
    if LossName(loss) in (LossName.JSD, LossName.TOPK_FORWARD_KL):
        return on_policy
    return SFT()


@dataclass
class LmbdaMix:
    """GKD's ``lmbda``: each step is on-policy with probability ``lmbda`` (seeded per step)."""

    lmbda: float
    policy: Policy
    """Writes the off-policy batches (a ``ScriptedPolicy`` or a ``TeacherPolicy``)."""
    objective: Objective
    """Trains on them (``off_policy_objective``)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"lmbda must be in [0, 1], got {self.lmbda}")

    def on_policy(self, step: int) -> bool:
        """Whether step ``step`` (0-based) samples the student."""
        if self.lmbda >= 1.0:
            return True
        if self.lmbda <= 0.0:
            return False
        return random.Random(f"{self.seed}:lmbda:{step}").random() < self.lmbda
