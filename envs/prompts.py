"""Single-turn prompt datasets from JSONL files.

One JSON object per line::

    {"messages": [{"role": "user", "content": "What is 2 + 3?"}],
     "teacher": "math",                                   # optional: the row's teacher route
     "teacher_messages": [{"role": "user", "content": "What is 2 + 3? (It is 5.)"}],
     "expected_answer": "5"}                              # optional: exact-match eval

``messages`` is the conversation up to the student's turn. Trailing assistant messages, when a
row has them, are a *reference response* (teacher-written; off-policy SFT and ``lmbda`` mixing
train on them); the prompt is everything before them. ``teacher_messages`` is the privileged
prompt the teacher scores under instead of the prompt. Rows are validated with pydantic when the
file is loaded; every problem is reported with ``file:line`` and the field.

Each row becomes one message env with no tools and one turn (``AgentToolMessageEnv``,
``max_turns=1``), so the same trainer, rollouts and teacher view run them as Harbor episodes.
The reward is exact match against ``expected_answer`` (``exact_match``) where the row has one,
else 0; ``metadata`` carries the route (``teacher``), the row's source and whether it
is graded (``graded``).
"""

from __future__ import annotations

import json
import math
import random
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from envs.errors import EnvsError
from tool_use.agent_env import AgentToolMessageEnv, zero_reward
from tool_use.trajectory import Trajectory
from tool_use.types import Message, RewardFn

MAX_REPORTED = 20
"""Problems listed in one ``PromptDatasetError`` (the rest are counted)."""


class PromptDatasetError(EnvsError):
    """A prompt dataset file cannot be used. ``problems`` are ``file:line: field: what``
    lines, all of them found in one pass."""

    def __init__(self, path: Path, problems: Sequence[str]) -> None:
        self.path = path
        self.problems = list(problems)
        shown = self.problems[:MAX_REPORTED]
        more = len(self.problems) - len(shown)
        lines = "\n  ".join(shown + ([f"... and {more} more"] if more > 0 else []))
        noun = "problem" if len(self.problems) == 1 else "problems"
        super().__init__(f"prompt dataset {path}: {len(self.problems)} {noun}:\n  {lines}")


class PromptRow(BaseModel):
    """One row of a prompt dataset."""

    model_config = ConfigDict(extra="forbid")

    messages: list[Message] = Field(min_length=1)
    """The conversation up to the student's turn, optionally followed by a reference response
    (trailing assistant messages)."""
    teacher: str | None = None
    """The teacher route of this row (multi-teacher routing); None: the default teacher."""
    teacher_messages: list[Message] | None = None
    """The privileged prompt the teacher scores under instead of the prompt."""
    expected_answer: str | None = None
    """The answer exact-match evaluation compares against (see ``normalize_answer``)."""

    @model_validator(mode="after")
    def _check(self) -> PromptRow:
        if not any(m.role == "user" for m in self.prompt):
            raise ValueError(
                "messages: the prompt (before any trailing assistant reply) has no user message"
            )
        if self.teacher_messages is not None:
            if not self.teacher_messages:
                raise ValueError("teacher_messages: give at least one message, or leave it out")
            if self.teacher_messages[-1].role == "assistant":
                raise ValueError(
                    "teacher_messages: the privileged prompt must end before the assistant's "
                    "turn (its last message is an assistant message)"
                )
        return self

    @property
    def prompt(self) -> list[Message]:
        """``messages`` without the trailing assistant messages."""
        return self.messages[: self._split]

    @property
    def response(self) -> list[Message]:
        """The trailing assistant messages (the reference response); may be empty."""
        return self.messages[self._split :]

    @property
    def _split(self) -> int:
        end = len(self.messages)
        while end > 0 and self.messages[end - 1].role == "assistant":
            end -= 1
        return end


# ---- loading ---------------------------------------------------------------------------------


def load_prompt_rows(path: str | Path) -> list[PromptRow]:
    """Every row of a JSONL file, validated. Blank lines are skipped; any bad line raises
    ``PromptDatasetError`` listing every problem of the file with its line number."""
    path = Path(path)
    if not path.is_file():
        raise PromptDatasetError(path, [f"{path}: no such file"])
    rows: list[PromptRow] = []
    problems: list[str] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as error:
                problems.append(f"{where}: not valid JSON ({error.msg} at column {error.colno})")
                continue
            if not isinstance(data, dict):
                problems.append(f"{where}: expected a JSON object, got {type(data).__name__}")
                continue
            try:
                rows.append(PromptRow.model_validate(data))
            except ValidationError as error:
                problems.extend(f"{where}: {_describe(detail)}" for detail in error.errors())
    if problems:
        raise PromptDatasetError(path, problems)
    if not rows:
        raise PromptDatasetError(path, [f"{path}: the file has no rows"])
    return rows


def _describe(detail: Any) -> str:
    """A pydantic error as ``field 'messages.0.role': <what was wrong>``."""
    loc = ".".join(str(part) for part in detail["loc"])
    message = detail["msg"].removeprefix("Value error, ")
    if detail["type"] == "extra_forbidden":
        return (
            f"unknown field {loc!r} (expected messages, teacher, teacher_messages, expected_answer)"
        )
    if detail["type"] == "missing":
        return f"missing required field {loc!r}"
    return f"field {loc!r}: {message}" if loc else message


# ---- exact match -----------------------------------------------------------------------------

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_EDGES = " \t\n.,;:!?\"'`$*"


def extract_answer(response: str) -> str:
    """The part of a response that is compared: the content of the last ``\\boxed{...}`` when
    there is one, else the whole response."""
    boxed = _BOXED.findall(response)
    return boxed[-1] if boxed else response


def normalize_answer(text: str) -> str:
    """Unicode NFKC, case-folded, runs of whitespace collapsed to one space, and leading and
    trailing whitespace and punctuation (``. , ; : ! ? " ' ` $ *``) removed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(text.split()).strip(_EDGES)


def exact_match(response: str, expected: str) -> bool:
    """Whether the response's answer is ``expected``, both normalised (``normalize_answer``).

    The answer is the content of the last ``\boxed{...}`` when there is one; otherwise the whole
    response matches, or its final words do (as many words as ``expected`` has): so
    ``"18 + 40 = 58."`` matches ``58`` and ``"It is New York"`` matches ``new york``, but
    ``"58 apples"`` does not match ``58``."""
    want = normalize_answer(expected)
    candidate = normalize_answer(extract_answer(response))
    if candidate == want:
        return True
    if not want or _BOXED.search(response):
        return False
    words, count = candidate.split(" "), len(want.split(" "))
    return len(words) > count and normalize_answer(" ".join(words[-count:])) == want


def exact_match_reward(expected: str) -> RewardFn:
    """1.0 when the last assistant message matches ``expected`` exactly, else 0.0."""

    async def reward(messages: Sequence[Message]) -> float:
        answers = [m for m in messages if m.role == "assistant"]
        return float(bool(answers) and exact_match(answers[-1].content, expected))

    return reward


# ---- envs and datasets -----------------------------------------------------------------------


def prompt_env(row: PromptRow, *, source: str = "", index: int = 0) -> AgentToolMessageEnv:
    """The row as a one-turn message env with no tools."""
    graded = row.expected_answer is not None
    reward = exact_match_reward(row.expected_answer) if graded else zero_reward  # type: ignore[arg-type]
    metadata: dict[str, Any] = {"source": source, "row": index, "graded": graded}
    if row.teacher is not None:
        metadata["teacher"] = row.teacher
    if graded:
        metadata["expected_answer"] = row.expected_answer
    return AgentToolMessageEnv(
        initial_messages=row.prompt,
        tools=(),
        reward_fn=reward,
        max_turns=1,
        teacher_messages=row.teacher_messages,
        metadata=metadata,
    )


@dataclass
class PromptGroupBuilder:
    """``group_size`` episodes of one row (implements ``envs.types.EnvGroupBuilder``)."""

    row: PromptRow
    group_size: int
    source: str = ""
    index: int = 0

    async def make_envs(self) -> list[AgentToolMessageEnv]:
        return [
            prompt_env(self.row, source=self.source, index=self.index)
            for _ in range(self.group_size)
        ]

    async def compute_group_rewards(self, trajectories: Sequence[Trajectory]) -> list[float]:
        return [0.0] * len(trajectories)

    def logging_tags(self) -> list[str]:
        return ["prompts", *([self.row.teacher] if self.row.teacher else [])]


@dataclass
class PromptDataset:
    """Batches of ``groups_per_batch`` rows over ``epochs`` passes (implements
    ``envs.types.Dataset``). Each epoch is a fresh permutation seeded by ``(seed, epoch)`` when
    ``shuffle``; batches run across epoch boundaries, so only the last one can be short."""

    rows: list[PromptRow]
    group_size: int
    groups_per_batch: int
    epochs: int = 1
    shuffle: bool = True
    seed: int = 0
    source: str = ""
    order: list[int] = field(init=False)

    def __post_init__(self) -> None:
        if not self.rows:
            raise ValueError("PromptDataset needs at least one row")
        if self.group_size < 1 or self.groups_per_batch < 1 or self.epochs < 1:
            raise ValueError("group_size, groups_per_batch and epochs must be >= 1")
        self.order = []
        for epoch in range(self.epochs):
            indices = list(range(len(self.rows)))
            if self.shuffle:
                random.Random(f"{self.seed}:{epoch}").shuffle(indices)
            self.order.extend(indices)

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.groups_per_batch)

    def get_batch(self, index: int) -> list[PromptGroupBuilder]:
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range: the dataset has {len(self)} batches")
        start = index * self.groups_per_batch
        return [
            PromptGroupBuilder(self.rows[i], self.group_size, self.source, i)
            for i in self.order[start : start + self.groups_per_batch]
        ]


class PromptDatasetConfig(BaseModel):
    """Every knob of a prompt dataset; flat, so ``key=value`` CLIs can set each one."""

    model_config = ConfigDict(extra="forbid")

    dataset: Path
    """The training rows (JSONL)."""
    validation_dataset: Path | None = None
    """A JSONL file evaluated every eval_every steps (None: no evaluation)."""
    group_size: int = Field(4, ge=1)
    groups_per_batch: int = Field(8, ge=1)
    epochs: int = Field(1, ge=1)
    shuffle: bool = True
    seed: int = 0
    eval_group_size: int = Field(1, ge=1)


class PromptDatasetBuilder:
    """``(train PromptDataset, validation PromptDataset | None)`` from JSONL files (implements
    ``envs.types.DatasetBuilder``). Rows are loaded and validated when it is called."""

    def __init__(self, config: PromptDatasetConfig) -> None:
        self.config = config

    def __call__(self) -> tuple[PromptDataset, PromptDataset | None]:
        config = self.config
        path = config.dataset
        train = PromptDataset(
            load_prompt_rows(path),
            group_size=config.group_size,
            groups_per_batch=config.groups_per_batch,
            epochs=config.epochs,
            shuffle=config.shuffle,
            seed=config.seed,
            source=str(path),
        )
        if config.validation_dataset is None:
            return train, None
        eval_path = config.validation_dataset
        validation = PromptDataset(
            load_prompt_rows(eval_path),
            group_size=config.eval_group_size,
            groups_per_batch=config.groups_per_batch,
            shuffle=False,
            source=str(eval_path),
        )
        return train, validation
