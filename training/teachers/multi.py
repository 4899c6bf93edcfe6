"""Several teachers at once: routed (each episode to the teacher it names) or blended.

Multi-teacher scoring works on whole trajectories, not on token requests: each member teacher
has its own renderer (and so its own view of the episode, ``training.teacher_view``), and the
answers are combined at the *student's* positions, where every member lines up.

- ``RoutedTeacher``: the episode's ``metadata[route_key]`` (default key ``teacher``; set from a
  prompt row's ``teacher`` field or by a dataset-level route, ``envs.mixture``) names the
  member that scores it: a member's ``route`` value, or its model name. An episode without the
  key goes to ``default`` (when set); an unknown value is a ``TeacherRoutingError``. Used with
  the sampled reverse KL, each student token gets exactly its teacher's logprob.
- ``BlendedTeacher``: every member scores every episode. The teacher logprob of a sampled token
  is the mixture's, ``log sum_i w_i p_i(token)``; the top-K alternatives are the members' top-K
  mixed by weight on the union of their supports (``losses.blend_topk``), ready for
  ``topk_forward_kl``; full distributions (local members, ``jsd``) are mixed as
  ``log sum_i w_i softmax(l_i)`` (at temperature 1; the loss tempers the mixture).

Per-teacher numbers ride on each ``ScoredSequence.metadata``: ``teacher`` (the member's name,
or ``blend``), ``teacher_gaps`` (member name -> sum over the sequence's student tokens of
``sampling logprob - member logprob``) and ``teacher_shares`` (member name -> its share of
each token: 1.0 for the routed member, the normalised weight when blended).
``per_teacher_metrics`` turns them into ``teacher_kl/<name>`` and ``teacher_share/<name>``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tool_use.renderers.base import Renderer
from tool_use.trajectory import Trajectory
from training import losses
from training.errors import TrainingError
from training.scoring import ScoredSequence, TeacherRequest, score_trajectories
from training.types import Teacher

DEFAULT_ROUTE_KEY = "teacher"
BLEND = "blend"
ANY_LOGPROBS = TeacherRequest()
"""The default request: only the logprob of each student token."""


class TeacherRoutingError(TrainingError, ValueError):
    """An episode names a teacher no member answers to, or the members are ambiguous."""


@dataclass
class TeacherMember:
    """One teacher of a multi-teacher setup."""

    teacher: Teacher
    renderer: Renderer | None = None
    """The teacher's renderer (None: it reads the student's tokens as they are)."""
    route: str | None = None
    """The route value episodes use to pick it (routing); its model name works too."""
    weight: float = 1.0
    """Its weight in a blend (weights are normalised to sum to 1)."""

    @property
    def name(self) -> str:
        return self.route or self.teacher.name


def _check_names(members: Sequence[TeacherMember]) -> None:
    if not members:
        raise TeacherRoutingError("a multi-teacher setup needs at least one teacher")
    names = [m.name for m in members]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TeacherRoutingError(
            f"two teachers are called {duplicates[0]!r}: give each a distinct route"
        )


async def _close_all(members: Sequence[TeacherMember]) -> None:
    seen: set[int] = set()
    for member in members:
        if id(member.teacher) not in seen:
            seen.add(id(member.teacher))
            await member.teacher.close()


def _gap(scored: ScoredSequence, teacher_logprobs: torch.Tensor) -> float:
    mask = torch.tensor(scored.mask, dtype=torch.bool)
    sampling = torch.tensor(scored.sampling_logprobs, dtype=torch.float64)
    return float((sampling - teacher_logprobs.double())[mask].sum())


class RoutedTeacher:
    """Each episode is scored by the member its ``metadata[route_key]`` names."""

    def __init__(
        self,
        members: Sequence[TeacherMember],
        *,
        route_key: str = DEFAULT_ROUTE_KEY,
        default: str | None = None,
    ) -> None:
        _check_names(members)
        self.members = list(members)
        self.route_key = route_key
        self.name = "routed(" + ", ".join(m.name for m in self.members) + ")"
        self.default = self.resolve(default) if default is not None else None

    def resolve(self, value: Any) -> TeacherMember:
        """The member a route value names: its ``route``, else its model name."""
        for member in self.members:
            if value == member.route:
                return member
        by_model = [m for m in self.members if value == m.teacher.name]
        if len(by_model) == 1:
            return by_model[0]
        known = ", ".join(repr(m.route or m.teacher.name) for m in self.members)
        if len(by_model) > 1:
            raise TeacherRoutingError(
                f"{self.route_key}={value!r} names the model of several teachers; route by "
                f"their route values instead ({known})"
            )
        raise TeacherRoutingError(
            f"{self.route_key}={value!r} matches no teacher; expected one of {known} "
            "(a teacher's route value or model name)"
        )

    def member_for(self, metadata: Mapping[str, Any]) -> TeacherMember:
        """The member that scores an episode with this metadata."""
        if self.route_key in metadata and metadata[self.route_key] is not None:
            return self.resolve(metadata[self.route_key])
        if self.default is not None:
            return self.default
        where = ", ".join(
            f"{k}={metadata[k]!r}" for k in ("source", "row", "task") if k in metadata
        )
        raise TeacherRoutingError(
            f"an episode ({where or 'no source'}) has no {self.route_key!r} to route it by; give "
            f"every row a {self.route_key!r} or set a default teacher"
        )

    def check_routes(self, values: Sequence[Any]) -> None:
        """Fail before training when any of ``values`` (a dataset's routes) cannot be routed."""
        for value in dict.fromkeys(values):
            self.member_for({self.route_key: value})

    async def score_trajectories(
        self,
        trajectories: Sequence[Trajectory],
        *,
        student_renderer: Renderer,
        request: TeacherRequest = ANY_LOGPROBS,
        progress: bool = False,
    ) -> list[ScoredSequence]:
        """Every valid episode's sequences, scored by its member (in the order given)."""
        valid = [t for t in trajectories if t.valid]
        chosen = [self.member_for(t.metadata) for t in valid]
        out: list[list[ScoredSequence]] = [[] for _ in valid]
        for member in self.members:
            mine = [i for i, m in enumerate(chosen) if m is member]
            if not mine:
                continue
            scored = await score_trajectories(
                member.teacher,
                [valid[i] for i in mine],
                teacher_renderer=member.renderer,
                student_renderer=student_renderer,
                request=request,
                progress=progress,
            )
            sequences = iter(scored)
            for i in mine:
                for _ in valid[i].sequences:
                    sequence = next(sequences)
                    assert sequence.teacher_logprobs is not None
                    sequence.metadata["teacher"] = member.name
                    sequence.metadata["teacher_gaps"] = {
                        member.name: _gap(sequence, sequence.teacher_logprobs)
                    }
                    sequence.metadata["teacher_shares"] = {member.name: 1.0}
                    out[i].append(sequence)
        return [s for sequences in out for s in sequences]

    async def close(self) -> None:
        await _close_all(self.members)


class BlendedTeacher:
    """Every member scores every episode; their distributions are mixed by weight."""

    def __init__(self, members: Sequence[TeacherMember]) -> None:
        _check_names(members)
        weights = [float(m.weight) for m in members]
        if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
            raise TeacherRoutingError(
                f"blend weights must be finite, >= 0 and not all 0; got {weights}"
            )
        total = sum(weights)
        self.members = list(members)
        self.weights = [w / total for w in weights]
        self.name = (
            "blend("
            + ", ".join(f"{m.name}:{w:g}" for m, w in zip(self.members, self.weights, strict=True))
            + ")"
        )

    async def score_trajectories(
        self,
        trajectories: Sequence[Trajectory],
        *,
        student_renderer: Renderer,
        request: TeacherRequest = ANY_LOGPROBS,
        progress: bool = False,
    ) -> list[ScoredSequence]:
        per_member = [
            await score_trajectories(
                member.teacher,
                trajectories,
                teacher_renderer=member.renderer,
                student_renderer=student_renderer,
                request=request,
                progress=progress,
            )
            for member in self.members
        ]
        return [self._blend(list(answers)) for answers in zip(*per_member, strict=True)]

    def _blend(self, answers: list[ScoredSequence]) -> ScoredSequence:
        """One sequence as every member scored it -> the mixture."""
        first = answers[0]
        log_w = torch.tensor(self.weights, dtype=torch.float64).log()
        stacked = torch.stack([a.teacher_logprobs.double() for a in answers])  # [M, T]
        mask = torch.tensor(first.mask, dtype=torch.bool)
        mixed = torch.logsumexp(stacked + log_w[:, None], dim=0)
        blended = ScoredSequence(
            tokens=first.tokens,
            mask=first.mask,
            sampling_logprobs=first.sampling_logprobs,
            teacher_logprobs=torch.where(mask, mixed, 0.0).float(),
            metadata=dict(first.metadata),
        )
        if all(a.topk_ids is not None and a.topk_logprobs is not None for a in answers):
            ids, logprobs = losses.blend_topk(
                [
                    (a.topk_ids, a.topk_logprobs, w)  # type: ignore[misc]
                    for a, w in zip(answers, self.weights, strict=True)
                ]
            )
            blended.topk_ids, blended.topk_logprobs = ids, logprobs.float()
        full = [a.full_logits for a in answers if a.full_logits is not None]
        if len(full) == len(answers):
            width = min(f.shape[-1] for f in full)  # past it: embedding padding, as in JSD
            logp = torch.stack([torch.log_softmax(f[:, :width].double(), dim=-1) for f in full])
            blended.full_logits = torch.logsumexp(logp + log_w[:, None, None], dim=0).float()
        blended.metadata["teacher"] = BLEND
        blended.metadata["teacher_gaps"] = {
            m.name: _gap(a, a.teacher_logprobs)  # type: ignore[arg-type]
            for m, a in zip(self.members, answers, strict=True)
        }
        blended.metadata["teacher_shares"] = {
            m.name: w for m, w in zip(self.members, self.weights, strict=True)
        }
        return blended

    async def close(self) -> None:
        await _close_all(self.members)


def per_teacher_metrics(scored: Sequence[ScoredSequence]) -> dict[str, float]:
    """``teacher_kl/<name>``: the mean of ``sampling - member logprob`` over the student tokens
    the member scored; ``teacher_share/<name>``: its share of all student tokens. Empty for
    single-teacher batches (no ``teacher_gaps`` in the metadata)."""
    gaps: dict[str, float] = {}
    tokens: dict[str, float] = {}
    shares: dict[str, float] = {}
    total = 0
    for sequence in scored:
        count = sequence.num_student_tokens
        total += count
        for name, gap in sequence.metadata.get("teacher_gaps", {}).items():
            gaps[name] = gaps.get(name, 0.0) + gap
            tokens[name] = tokens.get(name, 0.0) + count
        for name, share in sequence.metadata.get("teacher_shares", {}).items():
            shares[name] = shares.get(name, 0.0) + share * count
    out: dict[str, float] = {}
    for name in gaps:
        if tokens[name]:
            out[f"teacher_kl/{name}"] = gaps[name] / tokens[name]
    for name, share in shares.items():
        out[f"teacher_share/{name}"] = share / total if total else 0.0
    return out
