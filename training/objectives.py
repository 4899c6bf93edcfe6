"""Objectives: scored sequences + the trainable student -> a loss to call ``backward()`` on.

The trainer packs ``ScoredSequence``s into micro-batches (``pack``), runs the student's decoder
once per micro-batch (``StudentForward``), and hands both to an ``Objective``, which calls one
of the pure functions of ``training.losses``. The student's logits are computed only at student
tokens, never as ``[B, T, V]``: per-token logprobs go through the chunked ``token_logprobs``
(recomputed in backward); the distribution losses build ``[N, V]`` logits for the N student
tokens of the micro-batch.

    ``sampled_reverse_kl``  on-policy distillation (default): per-token advantage
                            ``-kl_penalty_coef * (s_t - q_t)``, optionally discounted, importance-
                            sampled (optionally clipped)
    ``jsd``                 generalized JSD (``beta``, ``temperature``) over the full vocabulary
                            (local teacher) or the teacher's top-K plus a tail bucket (server)
    ``topk_forward_kl``     SDFT: forward KL to the teacher's renormalised top-K
    ``sft``                 cross-entropy on the sequence's own tokens (demonstrations)
    ``PolicyGradient``      RL (``recipes.harbor_rl``): group-centred rewards as advantages,
                            importance-sampled (optionally clipped)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar, Protocol

import torch

from tool_use.trajectory import Trajectory
from training import losses
from training.errors import ObjectiveError
from training.scoring import ScoredSequence, TeacherRequest


class LossName(StrEnum):
    """The objectives a recipe can pick with ``loss=``."""

    SAMPLED_REVERSE_KL = "sampled_reverse_kl"
    """On-policy distillation: the teacher's logprob of each sampled token is the reward."""
    JSD = "jsd"
    """Generalized Jensen-Shannon divergence (GKD) with ``beta``: 0 forward KL, 1 reverse KL."""
    TOPK_FORWARD_KL = "topk_forward_kl"
    """SDFT: match the teacher's top-K distribution at each student token."""
    SFT = "sft"
    """Cross-entropy on the tokens of the sequences (demonstrations); no teacher."""


@dataclass
class MicroBatch:
    """Right-padded ``[B, T]`` tensors of a few sequences; teacher distributions packed as
    ``[N, ...]`` over the student tokens (mask 1) in row-major order."""

    tokens: torch.Tensor
    attention: torch.Tensor
    mask: torch.Tensor
    """bool: student tokens (never position 0)."""
    sampling_logprobs: torch.Tensor
    teacher_logprobs: torch.Tensor | None
    topk_ids: torch.Tensor | None
    topk_logprobs: torch.Tensor | None
    full_logits: torch.Tensor | None
    advantages: torch.Tensor | None = None
    """[B]: each sequence's episode advantage (RL)."""

    @property
    def num_student_tokens(self) -> int:
        return int(self.mask.sum())


def pack(sequences: Sequence[ScoredSequence], max_tokens: int) -> list[MicroBatch]:
    """Micro-batches of similar-length sequences, each at most ``max_tokens`` padded tokens
    (a longer sequence gets a micro-batch of its own)."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i].tokens))
    groups: list[list[ScoredSequence]] = []
    for index in order:
        sequence = sequences[index]
        group = groups[-1] if groups else None
        if group is not None and len(sequence.tokens) * (len(group) + 1) <= max_tokens:
            group.append(sequence)
        else:
            groups.append([sequence])
    return [_collate(group) for group in groups]


def _collate(group: Sequence[ScoredSequence]) -> MicroBatch:
    width = max(len(s.tokens) for s in group)
    shape = (len(group), width)
    tokens = torch.zeros(shape, dtype=torch.long)
    attention = torch.zeros(shape, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.bool)
    sampling = torch.zeros(shape)
    teacher = torch.zeros(shape) if group[0].teacher_logprobs is not None else None
    for row, s in enumerate(group):
        n = len(s.tokens)
        tokens[row, :n] = torch.tensor(s.tokens)
        attention[row, :n] = 1
        mask[row, :n] = torch.tensor(s.mask, dtype=torch.bool)
        sampling[row, :n] = torch.tensor(s.sampling_logprobs)
        if teacher is not None and s.teacher_logprobs is not None:
            teacher[row, :n] = s.teacher_logprobs
    mask[:, 0] = False  # nothing predicts the first token

    def cat(name: str) -> torch.Tensor | None:
        parts = [getattr(s, name) for s in group]
        return torch.cat(parts) if all(p is not None for p in parts) else None

    return MicroBatch(
        tokens,
        attention,
        mask,
        sampling,
        teacher,
        cat("topk_ids"),
        cat("topk_logprobs"),
        cat("full_logits"),
        torch.tensor([s.advantage for s in group], dtype=torch.float32),
    )


class StudentForward:
    """The trainable model's decoder run once over a micro-batch; per-token quantities at the
    student tokens are derived from its hidden states on demand (with gradients)."""

    def __init__(self, model: torch.nn.Module, batch: MicroBatch) -> None:
        self.batch = batch
        device = next(model.parameters()).device
        decoder = model.get_decoder()
        hidden = decoder(
            input_ids=batch.tokens.to(device), attention_mask=batch.attention.to(device)
        ).last_hidden_state
        # The state at t - 1 predicts token t: keep the states that predict student tokens.
        predicts = torch.zeros_like(batch.mask)
        predicts[:, :-1] = batch.mask[:, 1:]
        self.hidden = hidden[predicts.to(device)]  # [N, H]
        self.targets = batch.tokens[batch.mask].to(device)  # [N]
        self.head = model.get_output_embeddings().weight
        self.softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)

    def logprobs(self, temperature: float = 1.0) -> losses.TokenLogprobs:
        """``[B, T]`` logprob and entropy of each student token (0 elsewhere)."""
        if self.softcap:
            packed = self.logits(temperature)
            logp = torch.log_softmax(packed, dim=-1)
            chosen = logp.gather(-1, self.targets[:, None])[:, 0]
            entropy = -(logp.exp() * logp).sum(-1)
        else:
            chosen, entropy = losses.token_logprobs(
                self.hidden, self.head, self.targets, temperature=temperature
            )
        return losses.TokenLogprobs(self.unpack(chosen), self.unpack(entropy.detach()))

    def logits(self, temperature: float = 1.0) -> torch.Tensor:
        """``[N, V]`` float32 logits at the student tokens (divided by ``temperature``)."""
        logits = (self.hidden @ self.head.T).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits / temperature if temperature != 1.0 else logits

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """``[N]`` at the student tokens -> ``[B, T]`` with zeros elsewhere (differentiable)."""
        mask = self.batch.mask.to(packed.device)
        return torch.zeros(mask.shape, dtype=packed.dtype, device=packed.device).masked_scatter(
            mask, packed
        )


@dataclass
class ObjectiveOutput:
    """A micro-batch's loss (already divided by the whole batch's token count), its metrics,
    and the mean student entropy over its student tokens."""

    loss: torch.Tensor
    metrics: dict[str, float]
    entropy: float


class Objective(Protocol):
    """Turns a micro-batch into a loss. ``teacher_request`` says what scoring must provide.

    Optional: ``prepare(trajectories)``, called by the trainer on each batch's trajectories
    before scoring, for quantities that need the whole batch (``PolicyGradient``: advantages
    centred within each task's group)."""

    teacher_request: TeacherRequest

    def __call__(
        self, student: StudentForward, batch: MicroBatch, token_count: float
    ) -> ObjectiveOutput: ...


def _mean_entropy(entropy: torch.Tensor, mask: torch.Tensor) -> float:
    count = int(mask.sum())
    return float(entropy.detach()[mask.to(entropy.device)].sum() / count) if count else 0.0


@dataclass
class SampledReverseKL:
    """On-policy distillation (``losses.sampled_reverse_kl_loss``)."""

    kl_penalty_coef: float = 1.0
    kl_discount_factor: float = 0.0
    clip_ratio: float | None = None
    temperature: float = 1.0
    """The sampling temperature: the current logprobs are taken under the same distribution."""
    teacher_request: ClassVar[TeacherRequest] = TeacherRequest()

    def __call__(
        self, student: StudentForward, batch: MicroBatch, token_count: float
    ) -> ObjectiveOutput:
        if batch.teacher_logprobs is None:
            raise ValueError("sampled_reverse_kl needs teacher logprobs: score the batch first")
        current = student.logprobs(self.temperature)
        device = current.logprobs.device
        result = losses.sampled_reverse_kl_loss(
            current.logprobs,
            batch.sampling_logprobs.to(device),
            batch.teacher_logprobs.to(device),
            batch.mask.to(device),
            kl_penalty_coef=self.kl_penalty_coef,
            kl_discount_factor=self.kl_discount_factor,
            clip_ratio=self.clip_ratio,
            token_count=token_count,
        )
        return ObjectiveOutput(
            result.loss, result.metrics, _mean_entropy(current.entropy, batch.mask)
        )


@dataclass
class JSD:
    """Generalized JSD: over the full vocabulary when the teacher returns full logits (a local
    teacher), else over its top-K plus a tail bucket (a server teacher, ``top_k`` > 0)."""

    beta: float = 0.5
    temperature: float = 1.0
    top_k: int = 0
    """0: full vocabulary (needs a local teacher)."""

    @property
    def teacher_request(self) -> TeacherRequest:
        if self.top_k > 0:
            return TeacherRequest(top_k=self.top_k)
        return TeacherRequest(full_logits=True)

    def __call__(
        self, student: StudentForward, batch: MicroBatch, token_count: float
    ) -> ObjectiveOutput:
        logits = student.logits()[None]  # [1, N, V]; the loss applies the temperature
        ones = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
        if self.top_k > 0:
            if batch.topk_ids is None or batch.topk_logprobs is None:
                raise ValueError("jsd with top_k needs the teacher's top-K: score the batch first")
            result = losses.topk_generalized_jsd_loss(
                logits,
                batch.topk_ids[None].to(logits.device),
                batch.topk_logprobs[None].to(logits.device),
                ones,
                beta=self.beta,
                temperature=self.temperature,
                chunk_size=256,
                token_count=token_count,
            )
        else:
            if batch.full_logits is None:
                raise ValueError("jsd needs the teacher's full logits: score with a local teacher")
            # Embeddings padded to different sizes (Qwen2.5 0.5B vs 7B): the rows past the
            # narrower one are padding, never a token (the start-up check proved the ids fit).
            width = min(logits.shape[-1], batch.full_logits.shape[-1])
            result = losses.generalized_jsd_loss(
                logits[..., :width],
                batch.full_logits[None, :, :width].to(logits.device),
                ones,
                beta=self.beta,
                temperature=self.temperature,
                chunk_size=256,
                token_count=token_count,
            )
        entropy = _entropy_of(logits[0], self.temperature)
        return ObjectiveOutput(result.loss, result.metrics, entropy)


@dataclass
class TopKForwardKL:
    """SDFT (``losses.topk_forward_kl_loss``) on the teacher's top-K."""

    top_k: int = 20
    temperature: float = 1.0

    @property
    def teacher_request(self) -> TeacherRequest:
        return TeacherRequest(top_k=self.top_k)

    def __call__(
        self, student: StudentForward, batch: MicroBatch, token_count: float
    ) -> ObjectiveOutput:
        if batch.topk_ids is None or batch.topk_logprobs is None:
            raise ValueError("topk_forward_kl needs the teacher's top-K: score the batch first")
        logits = student.logits()[None]
        ones = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
        result = losses.topk_forward_kl_loss(
            logits,
            batch.topk_ids[None].to(logits.device),
            batch.topk_logprobs[None].to(logits.device),
            ones,
            temperature=self.temperature,
            chunk_size=256,
            token_count=token_count,
        )
        entropy = _entropy_of(logits[0], self.temperature)
        return ObjectiveOutput(result.loss, result.metrics, entropy)


@dataclass
class SFT:
    """Cross-entropy on the sequences' own student-masked tokens (``losses.sft_loss``)."""

    teacher_request: ClassVar[TeacherRequest] = TeacherRequest(needed=False)

    def __call__(
        self, student: StudentForward, batch: MicroBatch, token_count: float
    ) -> ObjectiveOutput:
        current = student.logprobs()
        result = losses.sft_loss(
            current.logprobs, batch.mask.to(current.logprobs.device), token_count=token_count
        )
        return ObjectiveOutput(
            result.loss, result.metrics, _mean_entropy(current.entropy, batch.mask)
        )


@dataclass
class PolicyGradient:
    """RL with verifier rewards (``losses.policy_gradient_loss``): every student token of an
    episode gets the episode's advantage, its reward minus the mean reward of its group (the
    episodes of one task in the batch, ``metadata["group"]``), divided by the group's standard
    deviation with ``normalize_std``; the ratio to the sampling distribution is importance-
    sampled (PPO-clipped with ``clip_ratio``)."""

    clip_ratio: float | None = None
    temperature: float = 1.0
    """The sampling temperature: the current logprobs are taken under the same distribution."""
    normalize_std: bool = False
    teacher_request: ClassVar[TeacherRequest] = TeacherRequest(needed=False)

    def prepare(self, trajectories: Sequence[Trajectory]) -> None:
        """Write each valid episode's advantage into ``metadata["advantage"]``."""
        valid = [t for t in trajectories if t.valid]
        if not valid:
            return
        rewards = torch.tensor([t.reward for t in valid], dtype=torch.float64)
        groups = torch.tensor([int(t.metadata.get("group", i)) for i, t in enumerate(valid)])
        advantages = losses.group_centered_advantages(
            rewards, groups, normalize_std=self.normalize_std
        )
        for trajectory, advantage in zip(valid, advantages.tolist(), strict=True):
            trajectory.metadata["advantage"] = advantage

    def __call__(
        self, student: StudentForward, batch: MicroBatch, token_count: float
    ) -> ObjectiveOutput:
        if batch.advantages is None:
            raise ValueError("policy_gradient needs advantages: call prepare on the batch first")
        current = student.logprobs(self.temperature)
        device = current.logprobs.device
        result = losses.policy_gradient_loss(
            current.logprobs,
            batch.sampling_logprobs.to(device),
            batch.advantages.to(device),
            batch.mask.to(device),
            clip_ratio=self.clip_ratio,
            token_count=token_count,
        )
        return ObjectiveOutput(
            result.loss, result.metrics, _mean_entropy(current.entropy, batch.mask)
        )


def _entropy_of(logits: torch.Tensor, temperature: float) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        return float(-(logp.exp() * logp).sum(-1).mean()) if len(logits) else 0.0


def make_objective(
    loss: LossName | str,
    *,
    temperature: float = 1.0,
    kl_penalty_coef: float = 1.0,
    kl_discount_factor: float = 0.0,
    clip_ratio: float | None = None,
    beta: float = 0.5,
    top_k: int = 0,
    full_vocabulary: bool = True,
) -> Objective:
    """The objective ``loss`` names, with the knobs it uses. ``full_vocabulary``: the teacher can
    return full logits (a local teacher); otherwise ``jsd`` works on the top-K (``top_k`` > 0)."""
    name = LossName(loss)
    if name is LossName.SAMPLED_REVERSE_KL:
        return SampledReverseKL(kl_penalty_coef, kl_discount_factor, clip_ratio, temperature)
    if name is LossName.JSD:
        if not full_vocabulary and top_k <= 0:
            raise ObjectiveError(
                "loss=jsd with a server teacher works on the teacher's top-K: set top_k > 0"
            )
        if not full_vocabulary and temperature != 1.0:
            raise ObjectiveError(
                f"loss=jsd with a server teacher needs temperature=1 (got {temperature:g}): the "
                "teacher's top-K logprobs come at temperature 1 and the mass outside them "
                "cannot be re-tempered; use a local teacher or loss=topk_forward_kl"
            )
        return JSD(beta=beta, temperature=temperature, top_k=0 if full_vocabulary else top_k)
    if name is LossName.TOPK_FORWARD_KL:
        if top_k <= 0:
            raise ObjectiveError("loss=topk_forward_kl needs top_k > 0")
        return TopKForwardKL(top_k=top_k, temperature=temperature)
    return SFT()
