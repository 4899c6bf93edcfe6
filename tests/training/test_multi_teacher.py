"""Multi-teacher scoring where the right answer is known: two teachers that are fixed
distributions (the same next-token distribution at every position), so routed rows must get
exactly their teacher's logprobs and the blend must equal the weighted mixture computed by hand.
Then real (tiny) LocalTeachers: a routed episode is scored exactly as its teacher alone scores
it."""

from __future__ import annotations

import math

import pytest
import torch

from tool_use.trajectory import TokenSequence, Trajectory
from training.scoring import TeacherRequest, score_trajectories
from training.teachers import LocalTeacher
from training.teachers.multi import (
    BlendedTeacher,
    RoutedTeacher,
    TeacherMember,
    TeacherRoutingError,
    per_teacher_metrics,
)
from training.types import ScoreRequest, TeacherScores

pytestmark = pytest.mark.anyio

VOCAB = 6


class FixedTeacher:
    """A teacher whose next-token distribution is ``softmax(logits)`` whatever the context."""

    def __init__(self, name: str, logits: list[float]) -> None:
        self.name = name
        self.logits = torch.tensor(logits, dtype=torch.float64)
        self.logp = torch.log_softmax(self.logits, dim=-1)
        self.calls = 0

    async def score(self, requests):
        self.calls += 1
        out = []
        for request in requests:
            assert isinstance(request, ScoreRequest)
            tokens = torch.tensor(request.tokens)
            logprobs = self.logp[tokens].float()
            logprobs[0] = 0.0
            length = len(request.tokens)
            scores = TeacherScores(logprobs=logprobs)
            if request.top_k:
                values, ids = self.logp.topk(request.top_k)
                scores.topk_ids = ids.expand(length, -1).clone()
                scores.topk_logprobs = values.float().expand(length, -1).clone()
            if request.full_logits:
                scores.full_logits = self.logits.float().expand(length, -1).clone()
            out.append(scores)
        return out

    async def close(self) -> None:
        pass


A = [2.0, 1.0, 0.0, -1.0, -3.0, 0.5]
B = [-1.0, 0.0, 3.0, 1.0, 0.0, -2.0]


def episode(tokens: list[int], mask: list[int], **metadata) -> Trajectory:
    sampling = [-1.0 if m else 0.0 for m in mask]
    sequence = TokenSequence(tokens, mask, sampling, list(sampling))
    return Trajectory(sequences=[sequence], metadata=dict(metadata))


def episodes() -> list[Trajectory]:
    return [
        episode([0, 1, 2, 3, 4], [0, 0, 1, 1, 1], teacher="a", row=0),
        episode([5, 4, 3, 2], [0, 1, 1, 0], teacher="B-model", row=1),  # by model name
        episode([1, 1, 2], [0, 1, 1], row=2),  # no route: the default
        episode([2, 0, 5, 5, 1], [0, 0, 0, 1, 1], teacher="b", row=3),
    ]


@pytest.fixture
def members():
    return [
        TeacherMember(FixedTeacher("A-model", A), route="a", weight=3.0),
        TeacherMember(FixedTeacher("B-model", B), route="b", weight=1.0),
    ]


async def test_routed_rows_get_exactly_their_teachers_logprobs(members, renderer):
    routed = RoutedTeacher(members, default="a")
    trajectories = episodes()
    trajectories.insert(2, Trajectory(failure="sandbox: dead", metadata={"teacher": "zzz"}))
    scored = await routed.score_trajectories(trajectories, student_renderer=renderer)
    expected_teacher = ["a", "b", "a", "b"]
    assert [s.metadata["teacher"] for s in scored] == expected_teacher
    for sequence, name in zip(scored, expected_teacher, strict=True):
        table = torch.log_softmax(torch.tensor(A if name == "a" else B, dtype=torch.float64), -1)
        for t, (token, on) in enumerate(zip(sequence.tokens, sequence.mask, strict=True)):
            want = float(table[token]) if on else 0.0
            assert float(sequence.teacher_logprobs[t]) == pytest.approx(want, abs=1e-6)
    metrics = per_teacher_metrics(scored)
    assert metrics["teacher_share/a"] == pytest.approx(5 / 9)  # 3 + 2 of 9 student tokens
    assert metrics["teacher_share/b"] == pytest.approx(4 / 9)
    gaps_a = [
        -1.0 - float(s.teacher_logprobs[t])
        for s in scored
        if s.metadata["teacher"] == "a"
        for t, m in enumerate(s.mask)
        if m
    ]
    assert metrics["teacher_kl/a"] == pytest.approx(sum(gaps_a) / len(gaps_a))
    assert members[0].teacher.calls == 1 and members[1].teacher.calls == 1  # one batch each


async def test_unknown_or_missing_routes_are_clear_errors(members, renderer):
    routed = RoutedTeacher(members)
    with pytest.raises(TeacherRoutingError, match=r"teacher='c' matches no teacher; expected one"):
        routed.check_routes(["a", "c"])
    with pytest.raises(TeacherRoutingError, match=r"row=2.*has no 'teacher'"):
        await routed.score_trajectories(episodes(), student_renderer=renderer)
    with pytest.raises(TeacherRoutingError, match="two teachers are called 'a'"):
        RoutedTeacher([members[0], TeacherMember(FixedTeacher("x", A), route="a")])
    by_model = RoutedTeacher(members, route_key="expert")
    assert by_model.resolve("A-model") is members[0]
    with pytest.raises(TeacherRoutingError, match="expert='a-model'"):
        by_model.resolve("a-model")


async def test_blended_logprobs_topk_and_full_distributions_are_the_weighted_mixture(
    members, renderer
):
    blended = BlendedTeacher(members)
    k = 3
    trajectories = episodes()
    scored = await blended.score_trajectories(
        trajectories,
        student_renderer=renderer,
        request=TeacherRequest(top_k=k, full_logits=True),
    )
    pa = torch.softmax(torch.tensor(A, dtype=torch.float64), -1)
    pb = torch.softmax(torch.tensor(B, dtype=torch.float64), -1)
    wa, wb = 0.75, 0.25
    # By hand: each teacher's top-3, renormalised, mixed by weight on the union of supports.
    top_a, top_b = pa.topk(k).indices.tolist(), pb.topk(k).indices.tolist()
    za, zb = float(pa[top_a].sum()), float(pb[top_b].sum())
    by_hand: dict[int, float] = {}
    for ids, p, z, w in ((top_a, pa, za, wa), (top_b, pb, zb, wb)):
        for i in ids:
            by_hand[i] = by_hand.get(i, 0.0) + w * float(p[i]) / z
    for sequence in scored:
        assert sequence.metadata["teacher"] == "blend"
        n = sequence.num_student_tokens
        assert sequence.topk_ids.shape == (n, 2 * k)
        for row in range(n):
            got = {
                int(i): math.exp(float(v))
                for i, v in zip(sequence.topk_ids[row], sequence.topk_logprobs[row], strict=True)
                if math.isfinite(float(v))
            }
            assert got.keys() == by_hand.keys()
            for i, p in by_hand.items():
                assert got[i] == pytest.approx(p, abs=1e-6)
        mixture = (wa * pa + wb * pb).log()
        for t, (token, on) in enumerate(zip(sequence.tokens, sequence.mask, strict=True)):
            want = float(mixture[token]) if on else 0.0
            assert float(sequence.teacher_logprobs[t]) == pytest.approx(want, abs=1e-6)
        assert torch.allclose(sequence.full_logits.double(), mixture.expand(n, -1), atol=1e-6)
    metrics = per_teacher_metrics(scored)
    assert metrics["teacher_share/a"] == pytest.approx(0.75)
    assert metrics["teacher_share/b"] == pytest.approx(0.25)
    all_a = [
        float(torch.log(pa[tok]))
        for s in scored
        for tok, m in zip(s.tokens, s.mask, strict=True)
        if m
    ]
    assert metrics["teacher_kl/a"] == pytest.approx(sum(-1.0 - q for q in all_a) / len(all_a))


def test_blend_weights_are_checked(members):
    with pytest.raises(TeacherRoutingError, match="blend weights"):
        BlendedTeacher([TeacherMember(FixedTeacher("x", A), weight=0.0)])
    with pytest.raises(TeacherRoutingError, match="blend weights"):
        BlendedTeacher([TeacherMember(FixedTeacher("x", A), weight=-1.0), members[1]])


async def test_routing_real_local_teachers_matches_scoring_with_each_alone(
    make_tiny_model, renderer
):
    one, two = LocalTeacher(make_tiny_model(seed=5)), LocalTeacher(make_tiny_model(seed=6))
    routed = RoutedTeacher(
        [TeacherMember(one, renderer, route="x"), TeacherMember(two, renderer, route="y")]
    )
    trajectories = [
        episode([10, 11, 12, 13, 14, 15], [0, 0, 1, 1, 1, 1], teacher="y"),
        episode([20, 21, 22, 23], [0, 1, 1, 1], teacher="x"),
    ]
    request = TeacherRequest(top_k=4)
    scored = await routed.score_trajectories(
        trajectories, student_renderer=renderer, request=request
    )
    for trajectory, sequence, alone in zip(trajectories, scored, (two, one), strict=True):
        [reference] = await score_trajectories(
            alone,
            [trajectory],
            teacher_renderer=renderer,
            student_renderer=renderer,
            request=request,
        )
        assert torch.equal(sequence.teacher_logprobs, reference.teacher_logprobs)
        assert torch.equal(sequence.topk_ids, reference.topk_ids)
        assert torch.equal(sequence.topk_logprobs, reference.topk_logprobs)
    # The route matters: the other teacher scores the first episode differently.
    [other] = await score_trajectories(
        one, trajectories[:1], teacher_renderer=renderer, student_renderer=renderer
    )
    assert (other.teacher_logprobs - scored[0].teacher_logprobs).abs().max() > 0.1


@pytest.fixture(scope="module")
def renderer(smollm2_tokenizer):
    from tool_use.renderers import get_renderer

    return get_renderer(None, smollm2_tokenizer)
