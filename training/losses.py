"""Losses: pure functions of tensors, masked to the tokens the student sampled.

Notation, per position t of a training sequence (one row of the batch):

- ``m_t`` mask: 1 on tokens the student sampled, 0 on prompt, environment and padding tokens;
- ``s_t`` sampling logprob: the logprob under the distribution that actually drew the token
  (temperature and filters applied), recorded by the sampler;
- ``p_t`` current student logprob (requires grad), under the same temperature;
- ``q_t`` teacher logprob of the same token.

Shapes: ``B`` sequences, ``T`` positions, ``K`` top-K entries, ``V`` vocabulary, ``H`` hidden.
Every loss returns a :class:`LossResult` (scalar loss, float metrics) and keeps no state.
Positions with ``m_t = 0`` contribute nothing to the loss nor to any gradient, whatever the
values there (they must only be finite where a full distribution is involved).

The losses:

- :func:`sampled_reverse_kl_loss` on-policy distillation (the default): per-token advantage
  ``-(s_t - q_t)``, optionally discounted over later student tokens, importance-sampled;
- :func:`generalized_jsd_loss` GKD over the full vocabulary (a local teacher's logits);
- :func:`topk_generalized_jsd_loss` GKD over a teacher's top-K plus a tail bucket;
- :func:`topk_forward_kl_loss` SDFT: cross-entropy against the teacher's renormalised top-K,
  with :func:`blend_topk` for several teachers;
- :func:`sft_loss` cross-entropy on teacher-written tokens;
- :func:`policy_gradient_loss` importance-sampled policy gradient with given advantages (RL),
  with :func:`group_centered_advantages`.

:func:`token_logprobs` computes ``p_t`` (and the entropy) from hidden states in chunks, so
neither forward nor backward ever holds ``[T, V]`` logits for a whole sequence.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

_MIN_LOGPROB = -1e4
"""Logprobs are clamped here so that zero-probability entries give 0 * finite, never NaN."""


class Normalization(StrEnum):
    """How a sum of per-token losses becomes the batch loss."""

    TOKENS = "tokens"
    """Divide by the number of student tokens in the batch (or by ``token_count`` when the
    batch is one micro-batch of a larger one): every token weighs the same."""
    SEQUENCES = "sequences"
    """Average over the student tokens of each sequence, then over the sequences that have any:
    every sequence weighs the same, however long. For a whole batch only (no ``token_count``)."""


class LossResult(NamedTuple):
    """A scalar loss to call ``backward()`` on, and float metrics about it."""

    loss: torch.Tensor
    metrics: dict[str, float]


class TokenLogprobs(NamedTuple):
    """Per-token logprobs and entropies, both ``[B, T]`` (or ``[N]``)."""

    logprobs: torch.Tensor
    entropy: torch.Tensor


# ----------------------------------------------------------------------------- reductions


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precision -> float32 for the softmax arithmetic; float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _as_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if mask.shape != like.shape[: mask.dim()]:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(like.shape[:2])}")
    return mask.to(torch.bool)


def _reduce(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    normalization: Normalization,
    token_count: float | None,
) -> torch.Tensor:
    """Masked ``[B, T]`` -> scalar. Masked positions are selected away, not multiplied by 0,
    so a NaN there cannot leak into the loss."""
    values = torch.where(mask, per_token, torch.zeros((), dtype=per_token.dtype))
    normalization = Normalization(normalization)
    if normalization is Normalization.TOKENS:
        count = float(mask.sum()) if token_count is None else float(token_count)
        return values.sum() / max(count, 1.0)
    if token_count is not None:
        raise ValueError(
            "normalization='sequences' averages over the batch's own sequences, so micro-batch "
            "losses would not add up to the batch's: give the whole batch, without token_count"
        )
    per_sequence_tokens = mask.sum(dim=1)
    has_tokens = per_sequence_tokens > 0
    per_sequence = values.sum(dim=1) / per_sequence_tokens.clamp(min=1)
    return per_sequence.sum() / max(int(has_tokens.sum()), 1)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    count = int(mask.sum())
    return float(values.detach()[mask].double().sum() / count) if count else 0.0


def _by_chunks(
    fn: Callable[..., torch.Tensor], chunk_size: int | None, *tensors: torch.Tensor
) -> torch.Tensor:
    """Apply a per-position ``fn`` ([B, C, ...] -> [B, C]) over chunks of T. With gradients on,
    each chunk is checkpointed, so its [B, C, V] temporaries are rebuilt in backward instead of
    being kept for the whole sequence."""
    length = tensors[0].shape[1]
    if chunk_size is None or chunk_size >= length:
        return fn(*tensors)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    outputs = []
    for parts in zip(*(t.split(chunk_size, dim=1) for t in tensors), strict=True):
        if torch.is_grad_enabled() and any(p.requires_grad for p in parts):
            outputs.append(checkpoint(fn, *parts, use_reentrant=False))
        else:
            outputs.append(fn(*parts))
    return torch.cat(outputs, dim=1)


# ----------------------------------------------------------------------------- logprobs


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """Logprob and entropy of each token from hidden states, one chunk of rows at a time, in
    forward and in backward (the logits of a chunk are recomputed there)."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, chunk_size, temperature):  # type: ignore[override]
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        logprobs = hidden.new_empty(hidden.shape[0], dtype=dtype)
        entropy = hidden.new_empty(hidden.shape[0], dtype=dtype)
        lse_all = hidden.new_empty(hidden.shape[0], dtype=dtype)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = _ChunkedTokenLogprobs._logits(hidden[rows], weight, temperature)
            lse = torch.logsumexp(logits, dim=-1)
            logprobs[rows] = logits.gather(-1, tokens[rows, None]).squeeze(-1) - lse
            probs = torch.exp(logits - lse[:, None])
            entropy[rows] = lse - probs.mul_(logits).sum(-1)
            lse_all[rows] = lse
        ctx.save_for_backward(hidden, weight, tokens, lse_all, entropy)
        ctx.chunk_size = chunk_size
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    def _logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
        logits = _upcast(hidden @ weight.T)
        return logits.div_(temperature) if temperature != 1.0 else logits

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):  # type: ignore[override]
        hidden, weight, tokens, lse_all, entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=lse_all.dtype) if need_weight else None
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(lse_all)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            # In place, to keep two [C, V] temporaries: logits -> log p, and p.
            logp = _ChunkedTokenLogprobs._logits(hidden[rows], weight, ctx.temperature)
            logp.sub_(lse_all[rows, None])
            probs = torch.exp(logp)
            # d logprob_i / d z = onehot(token_i) - p ;  d entropy_i / d z = -p * (log p + H_i)
            if grad_entropy is None:
                grad_logits = probs.mul_(-grad_logprobs[rows, None])
            else:
                grad_logits = logp.add_(entropy[rows, None]).mul_(-grad_entropy[rows, None])
                grad_logits.sub_(grad_logprobs[rows, None]).mul_(probs)
                del probs
            grad_logits.scatter_add_(-1, tokens[rows, None], grad_logprobs[rows, None])
            if ctx.temperature != 1.0:
                grad_logits.div_(ctx.temperature)
            grad_logits = grad_logits.to(hidden.dtype)
            if need_hidden:
                grad_hidden[rows] = grad_logits @ weight
            if need_weight:
                grad_weight += grad_logits.T @ hidden[rows]
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def token_logprobs(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    tokens: torch.Tensor,
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
) -> TokenLogprobs:
    """Logprob of each token and the entropy of each position's distribution, computed from the
    final hidden states without materialising the ``[T, V]`` logits of the whole sequence.

    ``hidden_states`` ``[B, T, H]`` (or ``[N, H]``): the state at position t predicts
    ``tokens[:, t]`` (shift before calling); ``lm_head_weight`` ``[V, H]`` (no bias);
    ``tokens`` ``[B, T]`` long. Returns ``logprobs`` and ``entropy`` shaped like ``tokens``
    (float32, or float64 for float64 inputs) of ``softmax(hidden @ W.T / temperature)``.
    Forward and backward each hold about two ``[chunk_size, V]`` float32 temporaries instead
    of several ``[B*T, V]`` tensors; the price is one more matmul (the logits of each chunk are
    recomputed in backward). Gradients flow to the hidden states and, when it requires grad
    (full fine-tuning, tied embeddings), to the weight.
    """
    if hidden_states.shape[:-1] != tokens.shape:
        raise ValueError(
            f"hidden_states {tuple(hidden_states.shape)} and tokens {tuple(tokens.shape)} "
            "must agree on every dimension but the last"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    flat_hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    flat_tokens = tokens.reshape(-1).long()
    logprobs, entropy = _ChunkedTokenLogprobs.apply(
        flat_hidden, lm_head_weight, flat_tokens, chunk_size, float(temperature)
    )
    return TokenLogprobs(logprobs.view(tokens.shape), entropy.view(tokens.shape))


def gather_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``[B, T, V]`` logits, ``[B, T]`` tokens -> ``[B, T]`` float32 logprob of each token under
    ``softmax(logits / temperature)``; chunked over T so the log-softmax temporary stays small.
    Prefer :func:`token_logprobs` when the hidden states are at hand."""

    def one_chunk(chunk_logits: torch.Tensor, chunk_tokens: torch.Tensor) -> torch.Tensor:
        scaled = _upcast(chunk_logits) / temperature
        picked = scaled.gather(-1, chunk_tokens.long().unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(scaled, dim=-1)

    return _by_chunks(one_chunk, chunk_size, logits, tokens)


# ----------------------------------------------------------------------------- policy gradient


def policy_gradient_loss(
    student_logprobs: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_ratio: float | None = None,
    normalization: Normalization = Normalization.TOKENS,
    token_count: float | None = None,
) -> LossResult:
    """Importance-sampled policy gradient: ``-sum_t m_t * r_t * A_t / normaliser`` with
    ``r_t = exp(p_t - s_t)``, whose gradient is ``r_t * A_t * grad p_t``.

    ``student_logprobs`` ``[B, T]`` (grad), ``sampling_logprobs`` ``[B, T]``, ``advantages``
    ``[B, T]`` or ``[B]`` (one per sequence; detached), ``mask`` ``[B, T]``. With ``clip_ratio``
    eps, each token takes the pessimistic ``min(r_t A_t, clip(r_t, 1-eps, 1+eps) A_t)`` (PPO);
    ``clip_fraction`` counts the tokens where clipping is active (zero gradient there).
    """
    m = _as_mask(mask, student_logprobs)
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(student_logprobs)
    advantages = torch.where(m, advantages.detach().to(student_logprobs.dtype), 0.0)
    sampling = torch.where(m, sampling_logprobs.detach().to(student_logprobs.dtype), 0.0)
    # Masked positions get p = s (ratio exactly 1, finite), so no NaN can flow back from them.
    log_ratio = torch.where(m, student_logprobs, sampling) - sampling
    ratio = torch.exp(log_ratio)
    objective = ratio * advantages
    clipped_active = torch.zeros_like(m)
    if clip_ratio is not None:
        if not 0.0 < clip_ratio < 1.0:
            raise ValueError(f"clip_ratio must be in (0, 1), got {clip_ratio}")
        clipped = torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio) * advantages
        clipped_active = (clipped < objective) & m
        objective = torch.minimum(objective, clipped)
    loss = _reduce(-objective, m, normalization, token_count)
    ratios = ratio.detach()[m]
    count = int(m.sum())
    metrics = {
        "tokens": float(count),
        "ratio_mean": float(ratios.mean()) if count else 1.0,
        "ratio_min": float(ratios.min()) if count else 1.0,
        "ratio_max": float(ratios.max()) if count else 1.0,
        "clip_fraction": float(clipped_active.sum()) / count if count else 0.0,
        "advantage_mean": _masked_mean(advantages, m),
    }
    return LossResult(loss, metrics)


def discounted_student_sum(
    values: torch.Tensor, mask: torch.Tensor, discount: float, *, block: int = 256
) -> torch.Tensor:
    """``[B, T]`` -> ``[B, T]``: at each student token, the discounted sum of ``values`` at it
    and at every later student token of the same row; 0 at non-student tokens.

    Discounting counts student tokens, not positions: with student tokens u_0 < u_1 < ... of a
    row, ``out[u_i] = sum_{j >= i} discount**(j - i) * values[u_j]``. Environment tokens in
    between neither receive credit nor add distance. Credit never crosses rows, so an episode
    split into several sequences is discounted within each sequence. Detached; float64 inside.
    """
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount must be in [0, 1], got {discount}")
    m = _as_mask(mask, values)
    rows, length = values.shape
    x = torch.where(m, values.detach().double(), 0.0)
    # Pack each row's student tokens to the left, in order (the rest become trailing zeros).
    order = torch.argsort((~m).to(torch.int8), dim=1, stable=True)
    packed = x.gather(1, order)
    blocks = -(-length // block)
    packed = F.pad(packed, (0, blocks * block - length)).view(rows, blocks, block)
    i = torch.arange(block, dtype=torch.float64)
    distance = i[None, :] - i[:, None]  # [i, j] = j - i
    weights = torch.where(distance >= 0, discount ** distance.clamp(min=0), 0.0)  # 0**0 = 1
    local = packed @ weights.T  # within-block sums: local[i] = sum_{j >= i} g^(j-i) x_j
    carry_decay = discount ** (block - i)  # g^(L-i) times the next block's first value
    out = torch.empty_like(local)
    carry = torch.zeros(rows, dtype=torch.float64)
    for b in range(blocks - 1, -1, -1):
        out[:, b] = local[:, b] + carry_decay[None, :] * carry[:, None]
        carry = out[:, b, 0]
    unpacked = torch.zeros_like(x).scatter(1, order, out.view(rows, -1)[:, :length])
    return torch.where(m, unpacked, 0.0).to(values.dtype)


def sampled_reverse_kl_loss(
    student_logprobs: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_penalty_coef: float = 1.0,
    kl_discount_factor: float = 0.0,
    clip_ratio: float | None = None,
    normalization: Normalization = Normalization.TOKENS,
    token_count: float | None = None,
) -> LossResult:
    """On-policy distillation with the sampled reverse KL (all inputs ``[B, T]``).

    Per-token advantage ``a_t = -kl_penalty_coef * (s_t - q_t)`` on student tokens (detached):
    positive where the teacher likes the sampled token more than the sampler did. With
    ``kl_discount_factor`` g > 0 each student token is credited with the discounted future
    advantage over later student tokens of its row (:func:`discounted_student_sum`). The loss is
    :func:`policy_gradient_loss` with these advantages: ``-sum m_t r_t A_t / normaliser``,
    ``r_t = exp(p_t - s_t)``, optionally clipped.

    Metrics add ``teacher_kl``: the mean of ``s_t - q_t`` over student tokens, a one-sample
    estimate of KL(sampler || teacher) per token.
    """
    m = _as_mask(mask, student_logprobs)
    gap = torch.where(m, sampling_logprobs.detach() - teacher_logprobs.detach(), 0.0)
    advantages = -kl_penalty_coef * gap
    if kl_discount_factor > 0.0:
        advantages = discounted_student_sum(advantages, m, kl_discount_factor)
    result = policy_gradient_loss(
        student_logprobs,
        sampling_logprobs,
        advantages,
        m,
        clip_ratio=clip_ratio,
        normalization=normalization,
        token_count=token_count,
    )
    result.metrics["teacher_kl"] = _masked_mean(gap, m)
    return result


def group_centered_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, normalize_std: bool = False
) -> torch.Tensor:
    """``[N]`` rewards and ``[N]`` group ids -> ``[N]`` advantages: each reward minus the mean
    reward of its group (episodes of one task), optionally divided by the group's standard
    deviation (population; groups with no spread get 0). A group of one gets 0."""
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} "
            "must both be [N]"
        )
    rewards = rewards.double()
    _, group = torch.unique(group_ids, return_inverse=True)
    groups = int(group.max()) + 1 if group.numel() else 0
    counts = torch.zeros(groups, dtype=torch.float64).index_add_(0, group, torch.ones_like(rewards))
    means = torch.zeros(groups, dtype=torch.float64).index_add_(0, group, rewards) / counts
    centered = rewards - means[group]
    if normalize_std:
        variances = torch.zeros(groups, dtype=torch.float64).index_add_(0, group, centered**2)
        stds = (variances / counts).sqrt()[group]
        centered = torch.where(stds > 1e-8, centered / stds.clamp(min=1e-8), 0.0)
    return centered.float()


# ----------------------------------------------------------------------------- distributions


def _divergence(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float
) -> torch.Tensor:
    """Generalized JSD between two distributions given as logprobs over the last dimension.

    beta=0: KL(teacher || student); beta=1: KL(student || teacher); otherwise, with the mixture
    M = beta * teacher + (1 - beta) * student,
    ``beta * KL(teacher || M) + (1 - beta) * KL(student || M)`` (TRL's convention)."""
    ls = _upcast(student_logp).clamp(min=_MIN_LOGPROB)
    lt = _upcast(teacher_logp).clamp(min=_MIN_LOGPROB)
    if beta == 0.0:
        return (lt.exp() * (lt - ls)).sum(-1)
    if beta == 1.0:
        return (ls.exp() * (ls - lt)).sum(-1)
    lm = torch.logaddexp(ls + math.log1p(-beta), lt + math.log(beta))
    kl_teacher = (lt.exp() * (lt - lm)).sum(-1)
    kl_student = (ls.exp() * (ls - lm)).sum(-1)
    return beta * kl_teacher + (1.0 - beta) * kl_student


def _check_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    normalization: Normalization = Normalization.TOKENS,
    token_count: float | None = None,
) -> LossResult:
    """GKD's generalized Jensen-Shannon divergence over the full vocabulary (a local teacher).

    ``student_logits``, ``teacher_logits`` ``[B, T, V]`` (position t predicts token t),
    ``mask`` ``[B, T]``. Both are divided by ``temperature`` before the softmax. ``beta=0`` is
    forward KL(teacher || student) (mass-covering), ``beta=1`` reverse KL(student || teacher)
    (mode-seeking), in between the generalized JSD with mixture
    ``beta * teacher + (1 - beta) * student``; as in TRL, the in-between values tend to 0, not
    to the KLs, as beta approaches 0 or 1. ``chunk_size`` bounds the ``[B, C, V]`` temporaries
    (checkpointed per chunk). The loss per token is summed over the vocabulary and reduced like
    TRL's ``batchmean`` by default.
    """
    _check_beta(beta)
    m = _as_mask(mask, student_logits)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits {tuple(teacher_logits.shape)} must match student_logits "
            f"{tuple(student_logits.shape)}: teachers must share the student's vocabulary"
        )

    def per_token(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        ls = torch.log_softmax(_upcast(student) / temperature, dim=-1)
        lt = torch.log_softmax(_upcast(teacher.detach()) / temperature, dim=-1)
        return _divergence(ls, lt, beta)

    divergence = _by_chunks(per_token, chunk_size, student_logits, teacher_logits)
    loss = _reduce(divergence, m, normalization, token_count)
    metrics = {"tokens": float(m.sum()), "divergence": _masked_mean(divergence, m)}
    return LossResult(loss, metrics)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    tail: bool = True,
    chunk_size: int | None = None,
    normalization: Normalization = Normalization.TOKENS,
    token_count: float | None = None,
) -> LossResult:
    """Generalized JSD on the teacher's top-K support, for teachers that only return top-K
    (a vLLM server).

    ``student_logits`` ``[B, T, V]``; ``teacher_topk_ids`` ``[B, T, K]`` long (distinct at each
    position); ``teacher_topk_logprobs`` ``[B, T, K]`` (``-inf`` marks a missing entry), taken
    as given: score the teacher at the same ``temperature`` that divides the student's logits.
    With ``tail`` the mass outside the top-K, for each distribution, is one extra category, so
    both are proper distributions over K + 1 categories and the loss cannot vanish just because
    K is small; the student's tail is computed exactly from its full distribution. With K = V
    this equals :func:`generalized_jsd_loss`. Without ``tail`` both are renormalised over the
    K entries (TRL's ``add_tail=False``).
    """
    _check_beta(beta)
    m = _as_mask(mask, student_logits)
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape:
        raise ValueError(
            f"teacher_topk_ids {tuple(teacher_topk_ids.shape)} and teacher_topk_logprobs "
            f"{tuple(teacher_topk_logprobs.shape)} must have the same shape"
        )

    def per_token(student: torch.Tensor, ids: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        ls_full = torch.log_softmax(_upcast(student) / temperature, dim=-1)
        teacher = _upcast(teacher.detach())
        valid = torch.isfinite(teacher)
        ids = torch.where(valid, ids, 0).long()
        ls = torch.where(valid, ls_full.gather(-1, ids), -math.inf)
        lt = torch.where(valid, teacher, -math.inf)
        if tail:
            in_support = torch.zeros(ls_full.shape, dtype=torch.int32, device=ls_full.device)
            in_support.scatter_add_(-1, ids, valid.to(torch.int32))
            student_tail = torch.logsumexp(ls_full.masked_fill(in_support > 0, -math.inf), dim=-1)
            teacher_tail = _log1mexp(torch.logsumexp(lt, dim=-1))
            # A support covering the whole vocabulary has no tail: the teacher's leftover is
            # rounding error, not mass.
            teacher_tail = torch.where(torch.isinf(student_tail), -math.inf, teacher_tail)
            ls = torch.cat([ls, student_tail[..., None]], dim=-1)
            lt = torch.cat([lt, teacher_tail[..., None]], dim=-1)
        else:
            # clamp: a position with no entries (padding) gives -inf, not NaN
            ls = ls - torch.logsumexp(ls, dim=-1, keepdim=True).clamp(min=_MIN_LOGPROB)
            lt = lt - torch.logsumexp(lt, dim=-1, keepdim=True).clamp(min=_MIN_LOGPROB)
        return _divergence(ls, lt, beta)

    divergence = _by_chunks(
        per_token, chunk_size, student_logits, teacher_topk_ids, teacher_topk_logprobs
    )
    loss = _reduce(divergence, m, normalization, token_count)
    metrics = {"tokens": float(m.sum()), "divergence": _masked_mean(divergence, m)}
    return LossResult(loss, metrics)


def blend_topk(
    teachers: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix several teachers' top-K distributions by weight, on the union of their supports.

    ``teachers``: ``(ids [B, T, K_i], logprobs [B, T, K_i], weight)`` each. Every teacher's
    top-K is renormalised, weights are normalised to sum to 1, and the mass of an id that
    several teachers return is added up. Returns ``(ids, logprobs)`` ``[B, T, sum K_i]``: each
    id once per position, ``-inf`` in the slots freed by merging (ready for
    :func:`topk_forward_kl_loss`).
    """
    if not teachers:
        raise ValueError("blend_topk needs at least one teacher")
    total = sum(float(w) for _, _, w in teachers)
    if any(float(w) < 0 for _, _, w in teachers) or total <= 0:
        weights = [float(w) for _, _, w in teachers]
        raise ValueError(f"blend weights must be >= 0 with a positive sum, got {weights}")
    ids = torch.cat([i.long() for i, _, _ in teachers], dim=-1)
    probs = torch.cat(
        [
            torch.softmax(_upcast(lp), dim=-1).nan_to_num(0.0) * (float(w) / total)
            for _, lp, w in teachers
        ],
        dim=-1,
    )
    probs = torch.where(torch.cat([torch.isfinite(lp) for _, lp, _ in teachers], -1), probs, 0.0)
    same = ids[..., :, None] == ids[..., None, :]  # [B, T, K, K]
    earlier = torch.ones(ids.shape[-1], ids.shape[-1], dtype=torch.bool).tril(-1)
    first = ~(same & earlier).any(-1)  # no earlier slot holds the same id
    merged = (same.to(probs.dtype) @ probs[..., None]).squeeze(-1)
    logprobs = torch.where(first & (merged > 0), merged.log(), -math.inf)
    return ids, logprobs


def topk_forward_kl_loss(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    normalization: Normalization = Normalization.TOKENS,
    token_count: float | None = None,
) -> LossResult:
    """SDFT: forward KL from the teacher's renormalised top-K distribution to the student.

    ``student_logits`` ``[B, T, V]``; ``teacher_topk_ids``, ``teacher_topk_logprobs``
    ``[B, T, K]`` at temperature 1 (``-inf`` marks a missing entry; use :func:`blend_topk`
    for several teachers). With ``w = softmax(teacher_topk_logprobs / temperature)`` (exact
    for a distribution renormalised over its support) and the student's full-vocabulary
    ``log p = log_softmax(student_logits / temperature)``, the per-token loss is
    ``sum_k w_k (log w_k - log p[id_k])``: the cross-entropy on soft ``[N, K]`` targets minus
    the targets' entropy (same gradient; 0 when the student matches on the support).
    Metrics: ``cross_entropy`` and ``target_entropy``.
    """
    m = _as_mask(mask, student_logits)

    def per_token(student: torch.Tensor, ids: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        teacher = _upcast(teacher.detach()) / temperature
        valid = torch.isfinite(teacher)
        log_total = torch.logsumexp(teacher, dim=-1, keepdim=True)
        log_w = torch.where(valid, teacher - log_total, _MIN_LOGPROB).clamp(min=_MIN_LOGPROB)
        w = torch.where(valid, log_w.exp(), 0.0)
        ls = torch.log_softmax(_upcast(student) / temperature, dim=-1)
        ls = ls.gather(-1, torch.where(valid, ids, 0).long())
        cross_entropy = -(w * ls).sum(-1)
        entropy = -(w * log_w).sum(-1)
        return torch.stack([cross_entropy - entropy, cross_entropy, entropy], dim=-1)

    parts = _by_chunks(
        per_token, chunk_size, student_logits, teacher_topk_ids, teacher_topk_logprobs
    )
    loss = _reduce(parts[..., 0], m, normalization, token_count)
    metrics = {
        "tokens": float(m.sum()),
        "cross_entropy": _masked_mean(parts[..., 1], m),
        "target_entropy": _masked_mean(parts[..., 2], m),
    }
    return LossResult(loss, metrics)


def sft_loss(
    student_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    normalization: Normalization = Normalization.TOKENS,
    token_count: float | None = None,
) -> LossResult:
    """Cross-entropy on teacher-written tokens: ``-sum m_t p_t / normaliser``.

    ``student_logprobs`` ``[B, T]`` (grad; from :func:`token_logprobs`), ``mask`` ``[B, T]``: 1
    on the tokens to imitate. Metrics: ``nll`` (mean per token) and ``tokens``."""
    m = _as_mask(mask, student_logprobs)
    loss = _reduce(-student_logprobs, m, normalization, token_count)
    return LossResult(loss, {"tokens": float(m.sum()), "nll": -_masked_mean(student_logprobs, m)})
