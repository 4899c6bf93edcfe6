"""One episode as training data: token sequences with exact masks and logprobs.

An episode is usually one sequence. When a chat template rewrites history between turns (for
example Qwen3 dropping earlier thinking), the episode is split into several sequences, each a
faithful prefix-consistent context; ``Trajectory.sequences`` says so explicitly.

Trajectories are written one JSON object per line (``write_jsonl`` / ``read_jsonl``); the
rollout viewer reads the same files.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tool_use.types import Message, StopReason, ToolSpec


@dataclass
class TokenSequence:
    """One training sequence. All lists have the same length (``teacher_logprobs`` is empty
    until the sequence is scored)."""

    tokens: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    """1 exactly on student-sampled tokens, 0 on prompt/env/forced tokens."""
    sampling_logprobs: list[float] = field(default_factory=list)
    """Logprob under the distribution that actually sampled the token (after temperature,
    top-k/top-p and constraints); 0.0 where mask is 0."""
    model_logprobs: list[float] = field(default_factory=list)
    """The student model's own logprob (temperature 1, no filters); 0.0 where mask is 0."""
    teacher_logprobs: list[float] = field(default_factory=list)
    """The teacher's logprob of each student token (0.0 where mask is 0), once a teacher scored
    the sequence; empty until then (and for runs without a teacher). For logs and the rollout
    viewer: the trainer fills it in before writing rollouts."""

    def __len__(self) -> int:
        return len(self.tokens)

    def append(
        self,
        tokens: list[int],
        *,
        sampled: bool,
        sampling_logprobs: list[float] | None = None,
        model_logprobs: list[float] | None = None,
    ) -> None:
        n = len(tokens)
        for name, values in (
            ("sampling_logprobs", sampling_logprobs),
            ("model_logprobs", model_logprobs),
        ):
            if values is not None and len(values) != n:
                raise ValueError(f"TokenSequence.append: {n} tokens but {len(values)} {name}")
        self.tokens.extend(tokens)
        self.mask.extend([1 if sampled else 0] * n)
        self.sampling_logprobs.extend(
            sampling_logprobs if sampling_logprobs is not None else [0.0] * n
        )
        self.model_logprobs.extend(model_logprobs if model_logprobs is not None else [0.0] * n)


@dataclass
class Turn:
    """Where one assistant turn sits in the sequences."""

    sequence: int
    """Index into ``Trajectory.sequences``."""
    observation_start: int
    """First env token of this turn (prompt or tool results + assistant header)."""
    sample_start: int
    """First token the student produced (forced prefix tokens included, with mask 0)."""
    sample_end: int
    """One past the last sampled token."""
    message: Message | None = None
    """The parsed assistant message (None when the env failed before the turn was parsed)."""
    env_messages: list[Message] = field(default_factory=list)
    """What the env answered (tool results, corrections)."""
    context_messages: int = 0
    """How many of ``Trajectory.messages`` the observation of this turn had rendered: the history
    the turn was sampled from is ``messages[:context_messages]``."""


@dataclass
class Trajectory:
    """A finished episode."""

    sequences: list[TokenSequence] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    """The full student-side message history."""
    tools: list[ToolSpec] = field(default_factory=list)
    """The tool specs the prompt showed (a teacher renders them in its own format)."""
    teacher_messages: list[Message] | None = None
    """Privileged initial messages for the teacher; None means the teacher sees ``messages``."""
    reward: float = 0.0
    stop_reason: StopReason | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    failure: str | None = None
    """Why the episode is invalid; invalid episodes are counted, never trained on."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Task name, group id, teacher route key, ..."""

    @property
    def valid(self) -> bool:
        return self.failure is None

    @property
    def num_sampled_tokens(self) -> int:
        return sum(sum(seq.mask) for seq in self.sequences)

    def to_json(self) -> str:
        data = asdict(self)
        data["messages"] = [_dump(m) for m in self.messages]
        if self.teacher_messages is not None:
            data["teacher_messages"] = [_dump(m) for m in self.teacher_messages]
        for turn, raw in zip(self.turns, data["turns"], strict=True):
            raw["message"] = _dump(turn.message) if turn.message else None
            raw["env_messages"] = [_dump(m) for m in turn.env_messages]
        if not self.valid:  # never graded: no reward, not a 0
            data["reward"] = None
        return json.dumps(data, ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> Trajectory:
        data = json.loads(line)
        turns = [
            Turn(
                **{k: v for k, v in t.items() if k not in ("message", "env_messages")},
                message=Message(**t["message"]) if t.get("message") else None,
                env_messages=[Message(**m) for m in t.get("env_messages", [])],
            )
            for t in data.pop("turns")
        ]
        teacher = data.pop("teacher_messages", None)
        if data.get("reward") is None:  # an invalid episode's (to_json)
            data["reward"] = 0.0
        stop = data.pop("stop_reason", None)
        return cls(
            sequences=[TokenSequence(**s) for s in data.pop("sequences")],
            turns=turns,
            messages=[Message(**m) for m in data.pop("messages")],
            teacher_messages=[Message(**m) for m in teacher] if teacher is not None else None,
            stop_reason=StopReason(stop) if stop else None,
            **data,
        )


def _dump(message: Message) -> dict[str, Any]:
    return message.model_dump(exclude_defaults=True)


def write_jsonl(
    path: str | Path, trajectories: Iterable[Trajectory], *, append: bool = False
) -> None:
    """One trajectory per line."""
    with Path(path).open("a" if append else "w", encoding="utf-8") as out:
        for trajectory in trajectories:
            out.write(trajectory.to_json() + "\n")


def read_jsonl(path: str | Path) -> Iterator[Trajectory]:
    """The trajectories of a file written by ``write_jsonl``; a bad line names its number."""
    with Path(path).open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield Trajectory.from_json(line)
            except (ValueError, TypeError, KeyError) as exc:
                raise ValueError(f"{path}:{number}: not a trajectory record ({exc})") from exc
