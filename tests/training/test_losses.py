"""Every loss against a direct computation on small tensors: values and gradients, masking,
discounting over student tokens, clipping, the beta endpoints, top-K vs full vocabulary, and
chunked vs unchunked."""

from __future__ import annotations

import math

import pytest
import torch

from training.errors import ObjectiveError
from training.losses import (
    Normalization,
    blend_topk,
    discounted_student_sum,
    gather_logprobs,
    generalized_jsd_loss,
    group_centered_advantages,
    policy_gradient_loss,
    sampled_reverse_kl_loss,
    sft_loss,
    token_logprobs,
    topk_forward_kl_loss,
    topk_generalized_jsd_loss,
)
from training.objectives import make_objective

B, T, V = 3, 7, 11


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def interleaved_mask() -> torch.Tensor:
    """Prompt, student turn, tool output, student turn, padding: env tokens in between."""
    return torch.tensor(
        [
            [0, 1, 1, 0, 0, 1, 1],
            [0, 0, 1, 0, 1, 0, 1],
            [1, 1, 1, 1, 0, 0, 0],
        ],
        dtype=torch.bool,
    )


def logprob_triplet(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    p = (s + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)).requires_grad_()
    q = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    return p, s, q


# ----------------------------------------------------------------------------- direct references


def naive_discounted(a: list[float], m: list[bool], g: float) -> list[float]:
    """Loop over later student tokens, counting student tokens (not positions)."""
    out = []
    for t in range(len(a)):
        if not m[t]:
            out.append(0.0)
            continue
        total, k = 0.0, 0
        for u in range(t, len(a)):
            if m[u]:
                total += g**k * a[u]
                k += 1
        out.append(total)
    return out


def naive_reverse_kl(p, s, q, m, coef=1.0, g=0.0, clip=None, per_sequence=False):
    rows = []
    for b in range(p.shape[0]):
        a = [-coef * float(s[b, t] - q[b, t]) if m[b, t] else 0.0 for t in range(p.shape[1])]
        adv = naive_discounted(a, [bool(x) for x in m[b]], g)
        terms = []
        for t in range(p.shape[1]):
            if not m[b, t]:
                continue
            ratio = torch.exp(p[b, t] - s[b, t])
            obj = ratio * adv[t]
            if clip is not None:
                obj = torch.minimum(obj, torch.clamp(ratio, 1 - clip, 1 + clip) * adv[t])
            terms.append(-obj)
        rows.append(terms)
    if per_sequence:
        means = [sum(r) / len(r) for r in rows if r]
        return sum(means) / len(means)
    flat = [x for r in rows for x in r]
    return sum(flat) / len(flat)


def naive_jsd(ps: torch.Tensor, pt: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized JSD of one position from probabilities, summed explicitly."""
    total = torch.zeros((), dtype=ps.dtype)
    for v in range(ps.shape[0]):
        mix = beta * pt[v] + (1 - beta) * ps[v]
        if beta == 0:
            total = total + pt[v] * torch.log(pt[v] / ps[v])
        elif beta == 1:
            total = total + ps[v] * torch.log(ps[v] / pt[v])
        else:
            total = total + beta * pt[v] * torch.log(pt[v] / mix)
            total = total + (1 - beta) * ps[v] * torch.log(ps[v] / mix)
    return total


def naive_jsd_loss(student_logits, teacher_logits, m, beta, temperature):
    terms = []
    for b in range(m.shape[0]):
        for t in range(m.shape[1]):
            if m[b, t]:
                ps = torch.softmax(student_logits[b, t] / temperature, -1)
                pt = torch.softmax(teacher_logits[b, t] / temperature, -1)
                terms.append(naive_jsd(ps, pt, beta))
    return sum(terms) / len(terms)


def grad(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(loss, x)[0]


# ----------------------------------------------------------------------------- sampled reverse KL


@pytest.mark.parametrize("coef,g,clip", [(1.0, 0.0, None), (0.5, 0.9, None), (2.0, 0.7, 0.2)])
def test_sampled_reverse_kl_matches_direct_value_and_grad(gen, coef, g, clip):
    p, s, q = logprob_triplet(gen)
    m = interleaved_mask()
    result = sampled_reverse_kl_loss(
        p, s, q, m, kl_penalty_coef=coef, kl_discount_factor=g, clip_ratio=clip
    )
    expected = naive_reverse_kl(p, s, q, m, coef=coef, g=g, clip=clip)
    torch.testing.assert_close(result.loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad(result.loss, p), grad(expected, p), rtol=1e-10, atol=1e-12)
    gaps = (s - q)[m]
    assert result.metrics["teacher_kl"] == pytest.approx(float(gaps.mean()))
    assert result.metrics["tokens"] == float(m.sum())


def test_on_policy_gradient_is_the_advantage(gen):
    """At p = s the ratio is 1 and d loss / d p_t = -A_t / N = (s_t - q_t) / N."""
    _, s, q = logprob_triplet(gen)
    p = s.clone().requires_grad_()
    m = interleaved_mask()
    loss = sampled_reverse_kl_loss(p, s, q, m).loss
    expected = torch.where(m, (s - q) / m.sum(), 0.0)
    torch.testing.assert_close(grad(loss, p), expected)


def test_env_tokens_contribute_nothing_even_when_garbage(gen):
    p, s, q = logprob_triplet(gen)
    m = interleaved_mask()
    reference = sampled_reverse_kl_loss(p, s, q, m, kl_discount_factor=0.9, clip_ratio=0.2)
    g_ref = grad(reference.loss, p)
    garbage_p = torch.where(m, p.detach(), torch.nan).requires_grad_()
    garbage_s = torch.where(m, s, math.inf)
    garbage_q = torch.where(m, q, -math.inf)
    result = sampled_reverse_kl_loss(
        garbage_p, garbage_s, garbage_q, m, kl_discount_factor=0.9, clip_ratio=0.2
    )
    g = grad(result.loss, garbage_p)
    torch.testing.assert_close(result.loss, reference.loss)
    assert torch.all(g[~m] == 0)
    torch.testing.assert_close(g, g_ref)
    assert result.metrics == reference.metrics


def test_discounting_counts_student_tokens_not_positions():
    a = torch.tensor([[1.0, 100.0, 2.0, 4.0, 100.0, 8.0]])
    m = torch.tensor([[1, 0, 1, 1, 0, 1]], dtype=torch.bool)
    out = discounted_student_sum(a, m, 0.5)
    # the 100s sit on env tokens: they neither get credit nor count as distance
    expected = torch.tensor([[1 + 0.5 * 2 + 0.25 * 4 + 0.125 * 8, 0, 2 + 2 + 2, 4 + 4, 0, 8]])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("g", [0.0, 0.3, 0.95, 1.0])
def test_discounted_sum_matches_loop_across_blocks(gen, g):
    length = 600  # > two blocks of 256
    values = torch.randn(4, length, generator=gen, dtype=torch.float64)
    mask = torch.rand(4, length, generator=gen) < 0.6
    mask[3] = False  # a row without student tokens
    out = discounted_student_sum(values, mask, g)
    for b in range(4):
        a = [float(x) if mask[b, t] else 0.0 for t, x in enumerate(values[b])]
        expected = torch.tensor(naive_discounted(a, mask[b].tolist(), g), dtype=torch.float64)
        torch.testing.assert_close(out[b], expected, rtol=1e-9, atol=1e-9)


def test_discount_never_crosses_rows():
    values = torch.tensor([[1.0, 1.0], [5.0, 5.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    out = discounted_student_sum(values, mask, 1.0)
    torch.testing.assert_close(out, torch.tensor([[2.0, 1.0], [10.0, 5.0]]))


def test_clipping_is_pessimistic():
    s = torch.zeros(1, 4, dtype=torch.float64)
    # ratios 1.5, 1.5, 0.5, 0.5 with advantages +1, -1, +1, -1 (eps = 0.2)
    p = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]], dtype=torch.float64)
    m = torch.ones(1, 4, dtype=torch.bool)
    result = policy_gradient_loss(p, s, adv, m, clip_ratio=0.2)
    # min(1.5, 1.2) = 1.2 | min(-1.5, -1.2) = -1.5 | min(0.5, 0.8) = 0.5 | min(-0.5, -0.8) = -0.8
    torch.testing.assert_close(
        result.loss, -(1.2 - 1.5 + 0.5 - 0.8) / 4 * torch.ones((), dtype=torch.float64)
    )
    g = grad(result.loss, p)
    # clipped tokens (0 and 3) get no gradient; the others get -ratio * A / 4
    torch.testing.assert_close(
        g, torch.tensor([[0.0, 1.5 / 4, -0.5 / 4, 0.0]], dtype=torch.float64)
    )
    assert result.metrics["clip_fraction"] == 0.5
    assert result.metrics["ratio_max"] == pytest.approx(1.5)
    assert result.metrics["ratio_min"] == pytest.approx(0.5)


def test_sequence_normalisation_and_token_count(gen):
    p, s, q = logprob_triplet(gen)
    m = interleaved_mask()
    result = sampled_reverse_kl_loss(p, s, q, m, normalization=Normalization.SEQUENCES)
    expected = naive_reverse_kl(p, s, q, m, per_sequence=True)
    torch.testing.assert_close(result.loss, expected)
    torch.testing.assert_close(grad(result.loss, p), grad(expected, p))
    # a micro-batch normalised by the whole batch's token count: the halves add up
    whole = sampled_reverse_kl_loss(p, s, q, m).loss
    halves = sum(
        sampled_reverse_kl_loss(
            p[i : i + 2], s[i : i + 2], q[i : i + 2], m[i : i + 2], token_count=float(m.sum())
        ).loss
        for i in (0, 2)
    )
    torch.testing.assert_close(halves, whole)
    # per-sequence means of micro-batches cannot add up to the batch's: refused, not wrong
    with pytest.raises(ValueError, match="give the whole batch, without token_count"):
        sampled_reverse_kl_loss(
            p, s, q, m, normalization=Normalization.SEQUENCES, token_count=float(m.sum())
        )


def test_policy_gradient_with_per_sequence_advantages(gen):
    p, s, _ = logprob_triplet(gen)
    m = interleaved_mask()
    adv = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    result = policy_gradient_loss(p, s, adv, m)
    terms = [-torch.exp(p[b, t] - s[b, t]) * adv[b] for b in range(B) for t in range(T) if m[b, t]]
    expected = sum(terms) / len(terms)
    torch.testing.assert_close(result.loss, expected)
    torch.testing.assert_close(grad(result.loss, p), grad(expected, p))


def test_group_centered_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 3.0, 5.0, 2.0])
    groups = torch.tensor([7, 7, 7, 2, 2, 9])
    adv = group_centered_advantages(rewards, groups)
    torch.testing.assert_close(adv, torch.tensor([2 / 3, -1 / 3, -1 / 3, -1.0, 1.0, 0.0]))
    scaled = group_centered_advantages(rewards, groups, normalize_std=True)
    std7 = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 3)
    torch.testing.assert_close(
        scaled, torch.tensor([2 / 3 / std7, -1 / 3 / std7, -1 / 3 / std7, -1.0, 1.0, 0.0])
    )
    with pytest.raises(ValueError, match="must both be"):
        group_centered_advantages(rewards, groups[:3])


# ----------------------------------------------------------------------------- GKD


def logits_pair(gen, vocab=V, dtype=torch.float64):
    student = torch.randn(B, T, vocab, generator=gen, dtype=dtype).requires_grad_()
    teacher = torch.randn(B, T, vocab, generator=gen, dtype=dtype) * 2
    return student, teacher


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generalized_jsd_matches_direct(gen, beta, temperature):
    student, teacher = logits_pair(gen)
    m = interleaved_mask()
    result = generalized_jsd_loss(student, teacher, m, beta=beta, temperature=temperature)
    expected = naive_jsd_loss(student, teacher, m, beta, temperature)
    torch.testing.assert_close(result.loss, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        grad(result.loss, student), grad(expected, student), rtol=1e-4, atol=1e-6
    )


def test_beta_endpoints_are_the_kls(gen):
    student, teacher = logits_pair(gen)
    m = torch.ones(B, T, dtype=torch.bool)
    ls, lt = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    forward = (lt.exp() * (lt - ls)).sum(-1).mean()
    reverse = (ls.exp() * (ls - lt)).sum(-1).mean()
    torch.testing.assert_close(generalized_jsd_loss(student, teacher, m, beta=0.0).loss, forward)
    torch.testing.assert_close(generalized_jsd_loss(student, teacher, m, beta=1.0).loss, reverse)
    assert generalized_jsd_loss(student, student.detach(), m, beta=0.5).loss.abs() < 1e-6


def test_jsd_env_positions_get_no_gradient(gen):
    student, teacher = logits_pair(gen)
    m = interleaved_mask()
    loss = generalized_jsd_loss(student, teacher, m, beta=0.5).loss
    g = grad(loss, student)
    assert torch.all(g[~m] == 0)
    assert torch.all(g[m].abs().sum(-1) > 0)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_equals_unchunked(gen, beta):
    student, teacher = logits_pair(gen, dtype=torch.float32)
    m = interleaved_mask()
    ids = torch.topk(teacher, 4, dim=-1).indices
    top_lp = torch.log_softmax(teacher, -1).gather(-1, ids)
    calls = {
        "jsd": lambda c: generalized_jsd_loss(student, teacher, m, beta=beta, chunk_size=c),
        "topk_jsd": lambda c: topk_generalized_jsd_loss(
            student, ids, top_lp, m, beta=beta, chunk_size=c
        ),
        "sdft": lambda c: topk_forward_kl_loss(student, ids, top_lp, m, chunk_size=c),
    }
    for name, call in calls.items():
        whole, chunked = call(None), call(3)
        torch.testing.assert_close(chunked.loss, whole.loss, msg=name)
        torch.testing.assert_close(grad(chunked.loss, student), grad(whole.loss, student), msg=name)
        assert chunked.metrics == pytest.approx(whole.metrics)


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("tail", [True, False])
def test_topk_with_k_equal_v_is_full_vocabulary(gen, beta, tail):
    student, teacher = logits_pair(gen)
    m = interleaved_mask()
    lt = torch.log_softmax(teacher, -1)
    ids = torch.randperm(V, generator=gen).expand(B, T, V)  # every id, in any order
    topk = topk_generalized_jsd_loss(student, ids, lt.gather(-1, ids), m, beta=beta, tail=tail)
    full = generalized_jsd_loss(student, teacher, m, beta=beta)
    torch.testing.assert_close(topk.loss, full.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        grad(topk.loss, student), grad(full.loss, student), rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_topk_tail_bucket_matches_direct(gen, beta):
    student, teacher = logits_pair(gen)
    m = interleaved_mask()
    k = 3
    lt = torch.log_softmax(teacher, -1)
    ids = torch.topk(teacher, k, dim=-1).indices
    result = topk_generalized_jsd_loss(student, ids, lt.gather(-1, ids), m, beta=beta)
    terms = []
    for b in range(B):
        for t in range(T):
            if not m[b, t]:
                continue
            ps_full, pt_full = torch.softmax(student[b, t], -1), lt[b, t].exp()
            support = ids[b, t].tolist()
            ps = torch.stack([ps_full[i] for i in support] + [1 - sum(ps_full[i] for i in support)])
            pt = torch.stack([pt_full[i] for i in support] + [1 - sum(pt_full[i] for i in support)])
            terms.append(naive_jsd(ps, pt, beta))
    expected = sum(terms) / len(terms)
    torch.testing.assert_close(result.loss, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        grad(result.loss, student), grad(expected, student), rtol=1e-4, atol=1e-6
    )


def test_topk_missing_entries_and_padding_rows(gen):
    """-inf marks entries a server did not return; a position with none is harmless."""
    student, teacher = logits_pair(gen)
    m = interleaved_mask()
    lt = torch.log_softmax(teacher, -1)
    ids = torch.topk(teacher, 4, dim=-1).indices
    top_lp = lt.gather(-1, ids)
    short = top_lp.clone()
    short[..., 3] = -math.inf  # only 3 returned
    short[~m] = -math.inf  # nothing at env positions
    for tail in (True, False):
        loss = topk_generalized_jsd_loss(student, ids, short, m, beta=0.5, tail=tail).loss
        ref = topk_generalized_jsd_loss(
            student, ids[..., :3], top_lp[..., :3], m, beta=0.5, tail=tail
        ).loss
        g = grad(loss, student)
        torch.testing.assert_close(loss, ref)
        assert torch.isfinite(g).all() and torch.all(g[~m] == 0)


# ----------------------------------------------------------------------------- SDFT


def test_topk_forward_kl_matches_direct(gen):
    student, teacher = logits_pair(gen)
    m = interleaved_mask()
    ids = torch.topk(teacher, 4, dim=-1).indices
    top_lp = torch.log_softmax(teacher, -1).gather(-1, ids)
    result = topk_forward_kl_loss(student, ids, top_lp, m, temperature=0.8)
    terms, ces = [], []
    for b in range(B):
        for t in range(T):
            if m[b, t]:
                w = torch.softmax(top_lp[b, t] / 0.8, -1)  # renormalised, tempered top-K
                ls = torch.log_softmax(student[b, t] / 0.8, -1)
                ce = -sum(w[k] * ls[ids[b, t, k]] for k in range(4))
                terms.append(ce + (w * w.log()).sum())
                ces.append(float(ce.detach()))
    expected = sum(terms) / len(terms)
    torch.testing.assert_close(result.loss, expected)
    torch.testing.assert_close(
        grad(result.loss, student), grad(expected, student), rtol=1e-5, atol=1e-7
    )
    assert result.metrics["cross_entropy"] == pytest.approx(sum(ces) / len(ces), rel=1e-5)
    g = grad(topk_forward_kl_loss(student, ids, top_lp, m).loss, student)
    assert torch.all(g[~m] == 0)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_topk_forward_kl_tempers_the_teacher_like_the_full_vocabulary_loss(gen, temperature):
    """Teachers score at temperature 1: with K = V the top-K loss is the full-vocabulary forward
    KL at the same temperature, 0 for a student equal to the teacher."""
    student, teacher = logits_pair(gen)
    m = interleaved_mask()
    ids = torch.arange(V).expand(B, T, V)
    top_lp = torch.log_softmax(teacher, -1)
    topk = topk_forward_kl_loss(student, ids, top_lp, m, temperature=temperature).loss
    full = generalized_jsd_loss(student, teacher, m, beta=0.0, temperature=temperature).loss
    torch.testing.assert_close(topk, full, rtol=1e-4, atol=1e-6)
    same = topk_forward_kl_loss(teacher, ids, top_lp, m, temperature=temperature).loss
    assert float(same) == pytest.approx(0.0, abs=1e-5)


def test_blend_topk_merges_mass_on_the_union():
    ids_a = torch.tensor([[[0, 1, 2]]])
    ids_b = torch.tensor([[[2, 3, 0]]])
    lp_a = torch.log(torch.tensor([[[0.5, 0.3, 0.2]]]))  # already normalised
    lp_b = torch.log(torch.tensor([[[0.2, 0.2, 0.1]]]))  # renormalised to 0.4, 0.4, 0.2
    ids, lp = blend_topk([(ids_a, lp_a, 3.0), (ids_b, lp_b, 1.0)])
    mass = {}
    for i, x in zip(ids[0, 0].tolist(), lp[0, 0].exp().tolist(), strict=True):
        if x > 0:
            assert i not in mass, "each id appears once"
            mass[i] = x
    expected = {
        0: 0.75 * 0.5 + 0.25 * 0.2,
        1: 0.75 * 0.3,
        2: 0.75 * 0.2 + 0.25 * 0.4,
        3: 0.25 * 0.4,
    }
    assert mass == pytest.approx(expected)
    assert sum(mass.values()) == pytest.approx(1.0)


def test_blended_cross_entropy_is_the_weighted_mix(gen):
    """The blended target is linear in the teachers: its cross-entropy is the weighted sum."""
    student, teacher = logits_pair(gen)
    m = interleaved_mask()
    other = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    ids_a, ids_b = torch.topk(teacher, 3, -1).indices, torch.topk(other, 4, -1).indices
    lp_a = torch.log_softmax(teacher, -1).gather(-1, ids_a)
    lp_b = torch.log_softmax(other, -1).gather(-1, ids_b)
    ids, lp = blend_topk([(ids_a, lp_a, 0.25), (ids_b, lp_b, 0.75)])
    blended = topk_forward_kl_loss(student, ids, lp, m).metrics["cross_entropy"]
    ce_a = topk_forward_kl_loss(student, ids_a, lp_a, m).metrics["cross_entropy"]
    ce_b = topk_forward_kl_loss(student, ids_b, lp_b, m).metrics["cross_entropy"]
    assert blended == pytest.approx(0.25 * ce_a + 0.75 * ce_b, rel=1e-6)
    with pytest.raises(ValueError, match="positive sum"):
        blend_topk([(ids_a, lp_a, 0.0)])


# ----------------------------------------------------------------------------- SFT, logprobs


def test_sft_loss(gen):
    p, _, _ = logprob_triplet(gen)
    m = interleaved_mask()
    result = sft_loss(p, m)
    expected = -sum(p[b, t] for b in range(B) for t in range(T) if m[b, t]) / m.sum()
    torch.testing.assert_close(result.loss, expected)
    g = grad(result.loss, p)
    torch.testing.assert_close(g, torch.where(m, -1.0 / m.sum(), 0.0).double())
    assert result.metrics["nll"] == pytest.approx(float(expected.detach()))


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_token_logprobs_matches_naive(gen, chunk_size, temperature):
    hidden = torch.randn(2, 9, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, V, (2, 9), generator=gen)
    a = torch.randn(2, 9, generator=gen, dtype=torch.float64)
    c = torch.randn(2, 9, generator=gen, dtype=torch.float64)
    ours = token_logprobs(hidden, weight, tokens, chunk_size=chunk_size, temperature=temperature)
    logp = torch.log_softmax(hidden @ weight.T / temperature, -1)
    naive_lp = logp.gather(-1, tokens[..., None]).squeeze(-1)
    naive_ent = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(ours.logprobs, naive_lp)
    torch.testing.assert_close(ours.entropy, naive_ent)
    ours_obj = (a * ours.logprobs + c * ours.entropy).sum()
    naive_obj = (a * naive_lp + c * naive_ent).sum()
    ours_grads = torch.autograd.grad(ours_obj, (hidden, weight))
    naive_grads = torch.autograd.grad(naive_obj, (hidden, weight))
    torch.testing.assert_close(ours_grads, naive_grads)
    assert torch.autograd.gradcheck(
        lambda h, w: token_logprobs(h, w, tokens, chunk_size=chunk_size),
        (hidden, weight),
    )


def test_token_logprobs_only_computes_needed_grads(gen):
    hidden = torch.randn(4, 6, generator=gen, requires_grad=True)
    frozen = torch.randn(V, 6, generator=gen)  # a frozen lm_head (LoRA)
    tokens = torch.randint(0, V, (4,), generator=gen)
    lp = token_logprobs(hidden, frozen, tokens, chunk_size=3).logprobs
    assert grad(lp.sum(), hidden).shape == hidden.shape
    with pytest.raises(ValueError, match="must agree"):
        token_logprobs(hidden, frozen, tokens[:3])


def test_gather_logprobs_chunked(gen):
    logits = torch.randn(B, T, V, generator=gen, requires_grad=True)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    whole = gather_logprobs(logits, tokens, temperature=0.5)
    expected = torch.log_softmax(logits / 0.5, -1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(whole, expected)
    chunked = gather_logprobs(logits, tokens, temperature=0.5, chunk_size=2)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(grad(chunked.sum(), logits), grad(expected.sum(), logits))


def test_bad_arguments_are_named(gen):
    student, teacher = logits_pair(gen)
    m = interleaved_mask()
    with pytest.raises(ValueError, match="beta must be in"):
        generalized_jsd_loss(student, teacher, m, beta=1.5)
    with pytest.raises(ValueError, match="share the student's vocabulary"):
        generalized_jsd_loss(student, teacher[..., :5], m)
    with pytest.raises(ValueError, match="clip_ratio"):
        policy_gradient_loss(student[..., 0], teacher[..., 0], teacher[..., 0], m, clip_ratio=1.5)
    with pytest.raises(ValueError, match="mask has shape"):
        sft_loss(student[..., 0], m[:, :3])


def test_objectives_refuse_what_a_server_teacher_cannot_give():
    """A server teacher returns top-K logprobs at temperature 1: a tempered tail bucket cannot
    be computed from them, so ``jsd`` asks for temperature 1 (``topk_forward_kl`` re-tempers)."""
    with pytest.raises(ObjectiveError, match=r"needs temperature=1 \(got 0.7\)"):
        make_objective("jsd", temperature=0.7, top_k=20, full_vocabulary=False)
    with pytest.raises(ObjectiveError, match="set top_k > 0"):
        make_objective("jsd", top_k=0, full_vocabulary=False)
    assert make_objective("jsd", temperature=0.7, full_vocabulary=True).temperature == 0.7
    tempered = make_objective("topk_forward_kl", temperature=0.7, top_k=5, full_vocabulary=False)
    assert tempered.temperature == 0.7
