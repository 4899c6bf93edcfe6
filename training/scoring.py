"""Teacher scoring: every student sequence of a batch, scored under the teacher's own view.

For each valid trajectory, ``training.teacher_view`` builds the teacher's token sequence (its
own renderer, the privileged prompt when the env gave ``teacher_messages``, the student's
sampled tokens copied verbatim). The teacher scores it once (a prefill); the answers are mapped
back onto the student's positions. The result, a ``ScoredSequence`` per student sequence, holds
everything a loss needs: tokens, mask, sampling logprobs, teacher logprobs and, when the loss
asks, the teacher's top-K or full distribution at the student's tokens. A teacher that scores
whole trajectories itself (``TrajectoryTeacher``: several teachers, ``training.teachers.multi``)
is handed the batch as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from tqdm.auto import tqdm

from tool_use.renderers.base import Renderer
from tool_use.trajectory import TokenSequence, Trajectory
from training.teacher_view import TeacherView, teacher_views
from training.types import Teacher


@dataclass(frozen=True)
class TeacherRequest:
    """What a loss needs from the teacher besides the logprob of each student token."""

    top_k: int = 0
    """The teacher's top-K alternatives at each student token (0: none)."""
    full_logits: bool = False
    """The teacher's whole distribution at each student token (local teachers only)."""
    needed: bool = True
    """False for losses that use no teacher at all (SFT)."""


@dataclass
class ScoredSequence:
    """One student sequence and what the teacher said about it.

    ``T`` positions; ``N`` = the number of student tokens (mask 1). Teacher values follow the
    ``TeacherScores`` convention: position t scores token t given the tokens before it."""

    tokens: list[int]
    mask: list[int]
    sampling_logprobs: list[float]
    teacher_logprobs: torch.Tensor | None = None
    """[T]; 0.0 where mask is 0."""
    topk_ids: torch.Tensor | None = None
    """[N, K] long, at the student tokens in order."""
    topk_logprobs: torch.Tensor | None = None
    """[N, K]."""
    full_logits: torch.Tensor | None = None
    """[N, V]."""
    advantage: float = 0.0
    """The episode's advantage (RL: ``metadata["advantage"]``, set by the objective's
    ``prepare``); 0.0 for distillation."""
    metadata: dict = field(default_factory=dict)

    @property
    def num_student_tokens(self) -> int:
        return sum(self.mask)


@runtime_checkable
class TrajectoryTeacher(Protocol):
    """Scores whole trajectories itself, each under the view it chooses (several teachers with
    their own renderers: ``training.teachers.multi``). ``score_trajectories`` hands such a
    teacher the batch as it is."""

    name: str

    async def score_trajectories(
        self,
        trajectories: Sequence[Trajectory],
        *,
        student_renderer: Renderer,
        request: TeacherRequest = ...,
        progress: bool = False,
    ) -> list[ScoredSequence]: ...

    async def close(self) -> None: ...


def unscored(trajectories: Sequence[Trajectory]) -> list[ScoredSequence]:
    """The sequences of valid trajectories without teacher scores (SFT)."""
    return [_from_sequence(seq, t.metadata) for t in trajectories if t.valid for seq in t.sequences]


async def score_trajectories(
    teacher: Teacher | TrajectoryTeacher,
    trajectories: Sequence[Trajectory],
    *,
    teacher_renderer: Renderer | None,
    student_renderer: Renderer,
    request: TeacherRequest = TeacherRequest(),
    chunk_size: int = 8,
    progress: bool = False,
) -> list[ScoredSequence]:
    """Score every sequence of the valid ``trajectories`` (invalid ones are skipped), in chunks
    of ``chunk_size`` sequences (one at a time with ``full_logits``: each is ``T x V``). A
    ``TrajectoryTeacher`` scores them itself (``teacher_renderer`` is then unused)."""
    if isinstance(teacher, TrajectoryTeacher):
        return await teacher.score_trajectories(
            trajectories, student_renderer=student_renderer, request=request, progress=progress
        )
    pending: list[tuple[ScoredSequence, TeacherView]] = []
    for trajectory in trajectories:
        if not trajectory.valid:
            continue
        views = teacher_views(trajectory, teacher_renderer, student_renderer=student_renderer)
        for sequence, view in zip(trajectory.sequences, views, strict=True):
            pending.append((_from_sequence(sequence, trajectory.metadata), view))
    size = 1 if request.full_logits else max(chunk_size, 1)
    bar = tqdm(total=len(pending), desc="score", unit="seq", leave=False, disable=not progress)
    try:
        for start in range(0, len(pending), size):
            chunk = pending[start : start + size]
            asks = []
            for _, view in chunk:
                ask = view.score_request(top_k=request.top_k)
                ask.full_logits = request.full_logits
                asks.append(ask)
            answers = await teacher.score(asks)
            for (scored, view), scores in zip(chunk, answers, strict=True):
                _attach(scored, view, scores)
            bar.update(len(chunk))
    finally:
        bar.close()
    return [scored for scored, _ in pending]


def attach_teacher_logprobs(
    trajectories: Sequence[Trajectory], scored: Sequence[ScoredSequence]
) -> None:
    """Copy the teacher's logprobs onto the trajectories' sequences
    (``TokenSequence.teacher_logprobs``) for the rollout logs and viewer. ``scored`` is what
    ``score_trajectories`` (or ``unscored``) returned for ``trajectories``: their valid
    sequences, in order."""
    sequences = [seq for t in trajectories if t.valid for seq in t.sequences]
    if len(sequences) != len(scored):
        raise ValueError(
            f"attach_teacher_logprobs: {len(scored)} scored sequences for {len(sequences)} "
            "valid sequences; pass the trajectories that were scored"
        )
    for sequence, answer in zip(sequences, scored, strict=True):
        if answer.teacher_logprobs is not None:
            sequence.teacher_logprobs = [float(v) for v in answer.teacher_logprobs.tolist()]


def _from_sequence(sequence: TokenSequence, metadata: dict) -> ScoredSequence:
    return ScoredSequence(
        tokens=list(sequence.tokens),
        mask=list(sequence.mask),
        sampling_logprobs=list(sequence.sampling_logprobs),
        advantage=float(metadata.get("advantage", 0.0)),
        metadata=dict(metadata),
    )


def _attach(scored: ScoredSequence, view: TeacherView, scores) -> None:
    scored.teacher_logprobs = view.to_student(scores.logprobs.float())
    student = torch.tensor([p for p in view.positions if p >= 0], dtype=torch.long)
    if scores.topk_ids is not None and scores.topk_logprobs is not None:
        scored.topk_ids = scores.topk_ids[student]
        scored.topk_logprobs = scores.topk_logprobs[student].float()
    if scores.full_logits is not None:
        scored.full_logits = scores.full_logits[student].float()
