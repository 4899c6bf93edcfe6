"""What both vLLM samplers share: the server client (``samplers.vllm``) and the in-process
engine (``samplers.vllm_engine``) translate ``SamplingParams`` into vLLM's sampling options
and vLLM's answer into ``SampledTokens`` here, so ``tool_choice``, stop sequences and the two
logprob kinds mean the same thing whichever way vLLM is reached.

- ``required``: the envelope (``forced_prefix``) is appended to the prompt; its sampling
  logprobs are 0.0 (forced), its model logprobs are scored on the side (the server client
  reads ``prompt_logprobs=0``; the engine sends one-token requests, see ``vllm_engine``).
- ``none``: the envelope's text is a vLLM ``bad_words`` entry (vLLM bans its last token where
  the tokens before it match).
- Stops: one-token stop sequences are ``stop_token_ids``; longer ones travel as text (vLLM's
  ``stop`` works on text) and the tokens are cut at the sequence itself afterwards.
- Logprobs: vLLM reports one kind per engine (``logprobs_mode``). ``raw_logprobs`` are the
  model's own, equal to the sampling distribution's only at temperature 1 without top-k/top-p;
  ``processed_logprobs`` (after temperature and filters) are the sampling ones, and the model's
  are then not reported (NaN).

Python 3.11 compatible on purpose: the CPU build of vLLM installs only there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from training.types import SampledTokens, SamplingParams

LogprobsMode = Literal["raw_logprobs", "processed_logprobs"]


def forced_tokens(params: SamplingParams) -> list[int]:
    """The tokens emitted before sampling starts (the envelope, for ``required``)."""
    return list(params.forced_prefix) if params.tool_choice == "required" else []


def completion_budget(params: SamplingParams, forced: Sequence[int]) -> int:
    """``max_tokens`` left for vLLM to sample after the forced tokens."""
    budget = params.max_tokens - len(forced)
    if budget <= 0:
        raise ValueError(
            f"max_tokens={params.max_tokens} leaves no room after the "
            f"{len(forced)}-token forced prefix"
        )
    return budget


def needs_processed_logprobs(params: SamplingParams, mode: LogprobsMode) -> bool:
    """True when ``params`` sample from a distribution other than the model's own, so
    ``raw_logprobs`` cannot give the sampling logprobs the losses need."""
    trivial = params.temperature == 1.0 and params.top_k <= 0 and params.top_p >= 1.0
    return mode == "raw_logprobs" and params.temperature > 0 and not trivial


def stop_texts(tokenizer, params: SamplingParams) -> list[str]:
    """Multi-token stop sequences as text, so vLLM stops there too."""
    return [tokenizer.decode(list(s)) for s in params.stop_sequences if len(s) > 1]


def stop_token_ids(params: SamplingParams) -> list[int]:
    return [s[0] for s in params.stop_sequences if len(s) == 1]


def banned_texts(tokenizer, params: SamplingParams) -> list[str]:
    """vLLM ``bad_words`` for ``tool_choice='none'``: the envelope opening as text."""
    if params.tool_choice != "none" or not params.forced_prefix:
        return []
    return [tokenizer.decode(list(params.forced_prefix))]


def truncate_at_stop(tokens: list[int], stop_sequences: Sequence[Sequence[int]]) -> int | None:
    """The length up to and including the first complete stop sequence, if any."""
    for end in range(1, len(tokens) + 1):
        for stop in stop_sequences:
            if stop and end >= len(stop) and tokens[end - len(stop) : end] == list(stop):
                return end
    return None


def sampled_tokens(
    params: SamplingParams,
    mode: LogprobsMode,
    *,
    forced: list[int],
    forced_model_logprobs: list[float],
    tokens: list[int],
    logprobs: list[float],
    finish_reason: str,
) -> SampledTokens:
    """One completion from vLLM's sampled ``tokens`` and the ``logprobs`` it reported for them
    (of kind ``mode``), cut after the first complete stop sequence."""
    cut = truncate_at_stop(forced + tokens, params.stop_sequences)
    if cut is not None and cut > len(forced):
        keep = cut - len(forced)
        tokens, logprobs, finish_reason = tokens[:keep], logprobs[:keep], "stop"
    unreported = [math.nan] * len(tokens)
    if params.temperature <= 0:
        sampling = [0.0] * len(tokens)  # greedy: a point mass
        model = logprobs if mode == "raw_logprobs" else unreported
    elif mode == "raw_logprobs":
        sampling, model = logprobs, logprobs
    else:
        sampling, model = logprobs, unreported
    return SampledTokens(
        tokens=forced + tokens,
        sampling_logprobs=[0.0] * len(forced) + list(sampling),
        model_logprobs=list(forced_model_logprobs) + list(model),
        finish_reason="length" if finish_reason == "length" else "stop",
        num_forced=len(forced),
    )
