"""Sample from a Hugging Face model, batching the turns of all running episodes.

Every episode awaits ``sample(prompt, params)`` on its own; the sampler gathers the requests
that arrive within ``batch_window_s`` (or until every tracked episode is waiting) and decodes
them together in a worker thread, so the event loop keeps running tools meanwhile.

Why a hand-written decoding loop rather than ``model.generate``: each row needs two logprobs
(the model's own, and the one under the distribution that sampled it), per-row temperature /
top-k / top-p, forced and banned tokens for ``tool_choice``, and multi-token stop sequences.
The loop computes ``log_softmax`` only for each row's last position, prefills prompts in
groups of similar length (then merges their KV caches with left padding, so short prompts do
not pay for long ones), and drops finished rows from the batch.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field

import anyio
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from training.types import SampledTokens, SamplingParams


@dataclass(eq=False)
class _Row:
    """One request's state during decoding."""

    prompt: list[int]
    params: SamplingParams
    forced: list[int]
    banned_sequence: list[int]
    tokens: list[int] = field(default_factory=list)
    sampling_logprobs: list[float] = field(default_factory=list)
    model_logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"

    @property
    def context_length(self) -> int:
        return len(self.prompt) + len(self.forced)

    def banned_token(self) -> int | None:
        """The token that would complete the banned envelope opening, if it is next."""
        seq = self.banned_sequence
        if not seq:
            return None
        head = seq[:-1]
        if not head or self.tokens[-len(head) :] == head:
            return seq[-1]
        return None


@dataclass
class _Pending:
    prompt: list[int]
    params: SamplingParams
    done: anyio.Event = field(default_factory=anyio.Event)
    result: SampledTokens | None = None
    error: BaseException | None = None


class HFSampler:
    """A ``Sampler`` over a Hugging Face causal LM (plain or peft), on CPU or GPU.

    ``model`` may be the very module being trained: sampling runs in eval mode without
    gradients and puts the module back in train mode afterwards, so samples always come from
    the current weights."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer=None,
        *,
        max_batch_size: int = 32,
        batch_window_s: float = 0.02,
        eos_token_ids: Iterable[int] | None = None,
        prefill_padding_waste: float = 0.25,
        max_prefill_tokens: int = 16384,
        seed: int | None = None,
    ) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        self.prefill_padding_waste = prefill_padding_waste
        self.max_prefill_tokens = max_prefill_tokens
        self.eos_token_ids = frozenset(
            eos_token_ids if eos_token_ids is not None else _eos_ids(model, tokenizer)
        )
        self.active_episodes = 0
        """Episodes that will call ``sample`` again; a batch starts as soon as all of them wait."""
        self._pending: list[_Pending] = []
        self._lock = anyio.Lock()
        device = _device_of(model)
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(seed if seed is not None else torch.seed())
        self.stats = {"batches": 0, "rows": 0, "tokens": 0, "seconds": 0.0}

    @contextlib.asynccontextmanager
    async def track_episode(self) -> AsyncIterator[None]:
        """Count an episode as active for the batching window while inside the block."""
        self.active_episodes += 1
        try:
            yield
        finally:
            self.active_episodes -= 1

    def reseed(self, seed: int) -> None:
        """Restart the sampling random stream (the trainer reseeds per step, so a resumed run
        draws what an uninterrupted one would have)."""
        self._generator.manual_seed(seed)

    async def update_weights(self, model: torch.nn.Module) -> None:
        """Sample from ``model`` from now on (a no-op when it is the module already held)."""
        self.model = model

    async def sample(self, prompt: Sequence[int], params: SamplingParams) -> SampledTokens:
        request = _Pending(list(prompt), params)
        self._pending.append(request)
        # The first waiter to get the lock decodes everything pending; the others find their
        # result already set when their turn comes.
        async with self._lock:
            if not request.done.is_set():
                await self._gather_batch()
                batch = self._pending[: self.max_batch_size]
                del self._pending[: len(batch)]
                with anyio.CancelScope(shield=True):
                    await self._run(batch)
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    async def _gather_batch(self) -> None:
        deadline = time.monotonic() + self.batch_window_s
        while (
            len(self._pending) < max(self.active_episodes, 1)
            and len(self._pending) < self.max_batch_size
            and time.monotonic() < deadline
        ):
            await anyio.sleep(0.001)

    async def _run(self, batch: list[_Pending]) -> None:
        try:
            results = await anyio.to_thread.run_sync(
                self.generate, [r.prompt for r in batch], [r.params for r in batch]
            )
        except BaseException as error:  # every waiter must wake, with the error
            for request in batch:
                request.error = error
                request.done.set()
            raise
        for request, result in zip(batch, results, strict=True):
            request.result = result
            request.done.set()

    # ---- decoding (synchronous; runs in a worker thread) -------------------------------------

    def generate(
        self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]
    ) -> list[SampledTokens]:
        """Decode a batch of prompts, each with its own params. Blocking."""
        model = self.model
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        try:
            with torch.no_grad():
                rows = [_make_row(p, s) for p, s in zip(prompts, params, strict=True)]
                self._decode(rows)
        finally:
            if was_training:
                model.train()
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["tokens"] += sum(len(r.tokens) - len(r.forced) for r in rows)
        self.stats["seconds"] += time.perf_counter() - start
        return [
            SampledTokens(
                tokens=r.tokens,
                sampling_logprobs=r.sampling_logprobs,
                model_logprobs=r.model_logprobs,
                finish_reason=r.finish_reason,
                num_forced=len(r.forced),
            )
            for r in rows
        ]

    def _decode(self, rows: list[_Row]) -> None:
        if not rows:
            return
        device = _device_of(self.model)
        live = [r for r in rows if r.params.max_tokens > len(r.forced)]
        for row in rows:
            if row not in live:  # the budget ends inside the forced prefix
                row.forced = row.forced[: max(row.params.max_tokens, 0)]
        order, cache, next_logits, forced_logprobs = self._prefill(rows, device)
        for row in order:
            row.tokens.extend(row.forced)
            row.sampling_logprobs.extend([0.0] * len(row.forced))
            row.model_logprobs.extend(forced_logprobs[row])
        active = [r for r in order if r in live]
        keep = [i for i, r in enumerate(order) if r in live]
        lengths = torch.tensor([r.context_length for r in order], device=device)
        total = int(lengths.max()) if len(order) else 0
        columns = torch.arange(total, device=device)[None, :]
        attention = (columns >= (total - lengths)[:, None]).long()  # left padding
        if len(keep) < len(order):
            cache, next_logits, attention, lengths = _select(
                keep, cache, next_logits, attention, lengths, device
            )
        while active:
            tokens = self._sample_step(active, next_logits)
            still = []
            for i, row in enumerate(active):
                if not _finished(row, self.eos_token_ids):
                    still.append(i)
            if not still:
                break
            if len(still) < len(active):
                cache, _, attention, lengths = _select(
                    still, cache, None, attention, lengths, device
                )
                tokens = tokens[still]
                active = [active[i] for i in still]
            attention = torch.cat([attention, attention.new_ones(len(active), 1)], dim=1)
            out = self.model(
                input_ids=tokens[:, None],
                attention_mask=attention,
                position_ids=lengths[:, None],
                use_cache=True,
                logits_to_keep=1,
                **{_cache_kwarg(self.model): cache},
            )
            lengths = lengths + 1
            next_logits = out.logits[:, -1, :].float()

    def _prefill(
        self, rows: list[_Row], device: torch.device
    ) -> tuple[list[_Row], DynamicCache, torch.Tensor, dict[_Row, list[float]]]:
        """Run the contexts (prompt + forced prefix) in groups of similar length; merge the
        groups' caches into one left-padded batch. Returns the row order of the merged batch,
        the cache, the next-token logits [B, V] and each row's forced-token model logprobs."""
        groups = _length_groups(rows, self.prefill_padding_waste, self.max_prefill_tokens)
        order: list[_Row] = []
        caches, lengths, next_logits = [], [], []
        forced: dict[_Row, list[float]] = {}
        for group in groups:
            width = max(r.context_length for r in group)
            ids = torch.full((len(group), width), 0, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for i, row in enumerate(group):
                context = row.prompt + row.forced
                ids[i, width - len(context) :] = torch.tensor(context)
                mask[i, width - len(context) :] = 1
            ids, mask = ids.to(device), mask.to(device)
            keep = 1 + max(len(r.forced) for r in group)
            cache = DynamicCache()
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=True,
                logits_to_keep=keep,
                **{_cache_kwarg(self.model): cache},
            )
            logits = out.logits.float()  # [g, keep, V]
            for i, row in enumerate(group):
                n = len(row.forced)
                if n:
                    lp = torch.log_softmax(logits[i, keep - 1 - n : keep - 1], dim=-1)
                    target = torch.tensor(row.forced, device=device)[:, None]
                    forced[row] = lp.gather(-1, target)[:, 0].tolist()
                else:
                    forced[row] = []
            next_logits.append(logits[:, -1, :])
            caches.append(cache)
            lengths.append(width)
            order.extend(group)
        cache = caches[0] if len(caches) == 1 else _merge_caches(caches, lengths)
        return order, cache, torch.cat(next_logits), forced

    def _sample_step(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """Pick one token per row; record both logprobs. ``logits`` [B, V] float32."""
        model_logprobs = torch.log_softmax(logits, dim=-1)
        banned = [(i, row.banned_token()) for i, row in enumerate(rows)]
        banned = [(i, t) for i, t in banned if t is not None]
        if banned:
            logits = logits.clone()
            for i, token in banned:
                logits[i, token] = -math.inf
        temperature = torch.tensor([r.params.temperature for r in rows], device=logits.device)
        greedy = temperature <= 0
        scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
        scaled = _top_k(scaled, [r.params.top_k for r in rows])
        scaled = _top_p(scaled, [r.params.top_p for r in rows])
        sampling_logprobs = torch.log_softmax(scaled, dim=-1)
        drawn = torch.multinomial(sampling_logprobs.exp(), 1, generator=self._generator)[:, 0]
        tokens = torch.where(greedy, logits.argmax(dim=-1), drawn)
        chosen_model = model_logprobs.gather(-1, tokens[:, None])[:, 0].tolist()
        chosen_sampling = sampling_logprobs.gather(-1, tokens[:, None])[:, 0]
        chosen_sampling = torch.where(greedy, 0.0, chosen_sampling).tolist()
        for row, token, s_lp, m_lp in zip(
            rows, tokens.tolist(), chosen_sampling, chosen_model, strict=True
        ):
            row.tokens.append(token)
            row.sampling_logprobs.append(s_lp)
            row.model_logprobs.append(m_lp)
        return tokens


def _make_row(prompt: Sequence[int], params: SamplingParams) -> _Row:
    if not prompt:
        raise ValueError("sample(prompt=[]): the prompt needs at least one token")
    if params.tool_choice not in ("auto", "none", "required"):
        raise ValueError(f"tool_choice={params.tool_choice!r}: expected auto, none or required")
    if params.tool_choice in ("none", "required") and not params.forced_prefix:
        raise ValueError(
            f"tool_choice={params.tool_choice!r} needs forced_prefix: the token ids that open "
            "the renderer's tool-call envelope"
        )
    return _Row(
        prompt=list(prompt),
        params=params,
        forced=list(params.forced_prefix) if params.tool_choice == "required" else [],
        banned_sequence=list(params.forced_prefix) if params.tool_choice == "none" else [],
    )


def _finished(row: _Row, eos_ids: frozenset[int]) -> bool:
    tokens = row.tokens
    if tokens[-1] in eos_ids or any(
        len(tokens) >= len(stop) and tuple(tokens[-len(stop) :]) == tuple(stop)
        for stop in row.params.stop_sequences
        if stop
    ):
        row.finish_reason = "stop"
        return True
    if len(tokens) >= row.params.max_tokens:
        row.finish_reason = "length"
        return True
    return False


def _top_k(logits: torch.Tensor, ks: list[int]) -> torch.Tensor:
    vocab = logits.shape[-1]
    if not any(0 < k < vocab for k in ks):
        return logits
    k_max = max(k for k in ks if k > 0)
    values = logits.topk(min(k_max, vocab), dim=-1).values
    index = torch.tensor([min(k, vocab) - 1 if k > 0 else 0 for k in ks], device=logits.device)
    threshold = values.gather(-1, index[:, None])
    disabled = torch.tensor([k <= 0 or k >= vocab for k in ks], device=logits.device)
    threshold = torch.where(disabled[:, None], -math.inf, threshold)
    return logits.masked_fill(logits < threshold, -math.inf)


def _top_p(logits: torch.Tensor, ps: list[float]) -> torch.Tensor:
    if all(p >= 1.0 for p in ps):
        return logits
    top_p = torch.tensor(ps, device=logits.device)[:, None]
    sorted_logits, sorted_index = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the tokens ranked above it already cover top_p (the first always stays).
    drop = (probs.cumsum(dim=-1) - probs) >= top_p
    drop_unsorted = drop.scatter(-1, sorted_index, drop)
    return logits.masked_fill(drop_unsorted, -math.inf)


def _length_groups(rows: list[_Row], waste: float, max_tokens: int) -> list[list[_Row]]:
    """Sort by context length and cut where left padding would exceed ``waste`` of a group."""
    groups: list[list[_Row]] = []
    for row in sorted(rows, key=lambda r: r.context_length):
        group = groups[-1] if groups else None
        if group is not None:
            width = row.context_length  # sorted ascending: the new row is the longest
            real = sum(r.context_length for r in group) + width
            padded = width * (len(group) + 1)
            if padded <= max_tokens and real >= (1 - waste) * padded:
                group.append(row)
                continue
        groups.append([row])
    return groups


def _merge_caches(caches: list[DynamicCache], widths: list[int]) -> DynamicCache:
    """Concatenate per-group caches along the batch, left-padding each to the widest."""
    total = max(widths)
    layers = []
    for layer in range(len(caches[0].layers)):
        keys, values = [], []
        for cache, width in zip(caches, widths, strict=True):
            pad = (0, 0, total - width, 0)
            keys.append(F.pad(cache.layers[layer].keys, pad))
            values.append(F.pad(cache.layers[layer].values, pad))
        layers.append((torch.cat(keys), torch.cat(values)))
    return DynamicCache(layers)


def _select(keep, cache, logits, attention, lengths, device):
    index = torch.tensor(keep, device=device)
    cache.batch_select_indices(index)
    return (
        cache,
        logits[index] if logits is not None else None,
        attention[index],
        lengths[index],
    )


def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers >= 5.2x names the KV cache argument ``cache`` (``past_key_values`` is
    deprecated); older releases only know ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _eos_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    for source in (config, getattr(model, "config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(eos)
    return ids
