"""The teacher's view of an episode: its own context around the student's exact tokens.

For each student sequence the teacher gets one token sequence to prefill:

- the env parts (prompt, tool results, assistant headers) rendered with the *teacher's*
  renderer, and the first prompt replaced by ``Trajectory.teacher_messages`` when the env gave
  privileged context (a reference solution, hints);
- every token the student produced (forced prefix included) copied verbatim, so the teacher
  scores exactly what the student sampled;
- ``positions``: for each student position with mask 1, the teacher position that holds the
  same token. Under the ``TeacherScores`` convention (position t scores token t given tokens
  before it), ``scores[positions[p]]`` is the teacher's logprob of student token p.

Within a student sequence the teacher's env parts are appended incrementally, like the
student's; the teacher's own template is not allowed to rewrite history there (that would
re-render turns the student already produced). When the teacher renders like the student and
there is no privileged prompt, the view is the student sequence itself (nothing re-rendered).
Teachers must share the student's vocabulary (checked at start-up by ``training.vocab``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tool_use.renderers.base import Renderer
from tool_use.trajectory import TokenSequence, Trajectory, Turn
from tool_use.types import Message
from training.types import ScoreRequest


@dataclass
class TeacherView:
    """One teacher sequence and how it lines up with its student sequence."""

    tokens: list[int]
    positions: list[int]
    """Same length as the student sequence: the teacher position of each student token with
    mask 1, -1 elsewhere."""

    def score_request(self, top_k: int = 0) -> ScoreRequest:
        """Ask the teacher for exactly the positions that score student tokens."""
        wanted = [False] * len(self.tokens)
        for position in self.positions:
            if position >= 0:
                wanted[position] = True
        return ScoreRequest(tokens=list(self.tokens), positions=wanted, top_k=top_k)

    def to_student(self, values: torch.Tensor) -> torch.Tensor:
        """Teacher-aligned ``[T_teacher, ...]`` values -> student-aligned ``[T_student, ...]``;
        zeros where the student's mask is 0."""
        index = torch.tensor(self.positions, dtype=torch.long, device=values.device)
        picked = values[index.clamp(min=0)]
        keep = (index >= 0).reshape(-1, *([1] * (values.dim() - 1)))
        return torch.where(keep, picked, torch.zeros((), dtype=values.dtype, device=values.device))


def teacher_views(
    trajectory: Trajectory,
    renderer: Renderer | None = None,
    *,
    student_renderer: Renderer | None = None,
) -> list[TeacherView]:
    """One ``TeacherView`` per student sequence of ``trajectory``.

    ``renderer`` is the teacher's; ``None`` (or one that renders like ``student_renderer``)
    means the teacher reads the student's own tokens, which needs no re-rendering unless the
    trajectory carries ``teacher_messages``. A token-level env (no messages) owns its tokens:
    the teacher reads them as they are, whatever its renderer.
    """
    if not trajectory.valid:
        raise ValueError(f"teacher_views: the episode is invalid ({trajectory.failure}); skip it")
    token_level = not trajectory.messages
    same = renderer is None or renderer.same_rendering_as(student_renderer)
    if trajectory.teacher_messages is None and (same or token_level):
        return [_identity(seq) for seq in trajectory.sequences]
    if renderer is None:
        raise ValueError(
            "teacher_views: the trajectory has teacher_messages (a privileged prompt); pass the "
            "teacher's renderer (or the student's) to render it"
        )
    if token_level:
        return [_with_teacher_prompt(trajectory, trajectory.teacher_messages, renderer)]
    views = [
        _rendered(trajectory, index, seq, renderer)
        for index, seq in enumerate(trajectory.sequences)
    ]
    return views


def _identity(sequence: TokenSequence) -> TeacherView:
    positions = [i if m else -1 for i, m in enumerate(sequence.mask)]
    return TeacherView(tokens=list(sequence.tokens), positions=positions)


def _with_teacher_prompt(
    trajectory: Trajectory, teacher_messages: Sequence[Message], renderer: Renderer
) -> TeacherView:
    """A token-level env's tokens after its prompt, verbatim, behind the teacher's rendering
    of ``teacher_messages``: there are no messages to re-render the rest from."""
    if len(trajectory.sequences) != 1:
        raise ValueError(
            "teacher_views: a token-level env with teacher_messages must keep its episode in one "
            f"sequence (this one has {len(trajectory.sequences)}): only the prompt can be "
            "swapped for the teacher's"
        )
    (sequence,) = trajectory.sequences
    prompt = renderer.render_prompt(list(teacher_messages), trajectory.tools)
    start = trajectory.turns[0].sample_start if trajectory.turns else len(sequence)
    shift = len(prompt) - start
    positions = [p + shift if m else -1 for p, m in enumerate(sequence.mask)]
    view = TeacherView(tokens=prompt + list(sequence.tokens[start:]), positions=positions)
    _check_covered(sequence, view.positions, 0)
    return view


def _rendered(
    trajectory: Trajectory, index: int, sequence: TokenSequence, renderer: Renderer
) -> TeacherView:
    messages, tools = trajectory.messages, trajectory.tools
    first_context = trajectory.turns[0].context_messages if trajectory.turns else len(messages)
    initial: list[Message] = (
        list(trajectory.teacher_messages)
        if trajectory.teacher_messages is not None
        else list(messages[:first_context])
    )

    def teacher_history(context_messages: int) -> list[Message]:
        """The teacher's version of ``messages[:context_messages]``."""
        return [*initial, *messages[first_context:context_messages]]

    tokens: list[int] = []
    positions = [-1] * len(sequence)
    previous: Turn | None = None
    for turn in (t for t in trajectory.turns if t.sequence == index):
        if previous is None:
            tokens += renderer.render_prompt(teacher_history(turn.context_messages), tools)
        else:
            if previous.message is None:
                raise ValueError("teacher_views: a turn before the last one has no message")
            answered = [*teacher_history(previous.context_messages), previous.message]
            tokens += renderer.render_continuation(answered, previous.env_messages, tools)
        offset = len(tokens) - turn.sample_start
        tokens += sequence.tokens[turn.sample_start : turn.sample_end]
        for position in range(turn.sample_start, turn.sample_end):
            if sequence.mask[position]:
                positions[position] = offset + position
        previous = turn
    _check_covered(sequence, positions, index)
    return TeacherView(tokens=tokens, positions=positions)


def _check_covered(sequence: TokenSequence, positions: Sequence[int], index: int) -> None:
    missing = [p for p, m in enumerate(sequence.mask) if m and positions[p] < 0]
    if missing:
        raise ValueError(
            f"teacher_views: sequence {index} has student tokens outside every turn "
            f"(positions {missing[:5]}...); the trajectory's turns do not match its sequences"
        )
