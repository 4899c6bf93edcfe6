"""Sample from a vLLM OpenAI-compatible server (GPU, or the CPU one from
``scripts/vllm_cpu.py``). Concurrent ``sample`` calls are concurrent HTTP requests; the server
batches them (continuous batching), so no client-side batching window is needed.

Logprobs: vLLM reports one kind per server, chosen by ``--logprobs-mode``. With the default
``raw_logprobs`` they are the model's own (``model_logprobs``), which equal the sampling
distribution's only at temperature 1 without top-k/top-p; other params then need a server
started with ``--logprobs-mode processed_logprobs`` (after temperature and filters), whose
values become ``sampling_logprobs`` while ``model_logprobs`` are NaN (not reported).

Weights: ``update_weights`` saves a peft model's LoRA adapter to ``adapter_dir`` and loads it
with ``POST /v1/load_lora_adapter`` (the server needs ``--enable-lora`` and
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``; ``scripts/vllm_cpu.py`` sets the latter), then
samples with the new adapter's name and unloads the previous one (and deletes its folder).
Adapter names carry a random id per sampler, so runs sharing one server never collide, and
``close`` unloads the last one. Full-weight updates cannot travel over this HTTP API: use
``HFSampler`` or ``VLLMEngineSampler`` for full fine-tuning.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from training.errors import SamplerServerError
from training.samplers.vllm_common import (
    LogprobsMode,
    banned_texts,
    completion_budget,
    forced_tokens,
    needs_processed_logprobs,
    sampled_tokens,
    stop_texts,
)
from training.types import SampledTokens, SamplingParams
from training.vllm_http import (
    CompletionsClient,
    parse_prompt_logprobs,
    parse_sampled,
    sampling_payload,
)

log = logging.getLogger(__name__)


class VLLMServerSampler:
    """A ``Sampler`` backed by a vLLM server serving ``model_name``."""

    def __init__(
        self,
        base_url: str,
        model_name: str,
        *,
        tokenizer=None,
        logprobs_mode: LogprobsMode = "raw_logprobs",
        adapter_dir: str | Path | None = None,
        max_concurrency: int = 32,
        max_attempts: int = 5,
        backoff_s: float = 0.5,
        timeout_s: float = 600.0,
        seed: int | None = None,
    ) -> None:
        self.base_model = model_name
        self.model_name = model_name
        """What requests name: the base model, or the latest LoRA adapter."""
        self.tokenizer = tokenizer
        self.logprobs_mode = logprobs_mode
        self.adapter_dir = Path(adapter_dir) if adapter_dir else None
        self._own_adapter_dir = adapter_dir is None  # a temporary folder: removed by close
        self._adapter_id = uuid.uuid4().hex[:8]
        self._adapter_path: Path | None = None  # the folder of the adapter now loaded
        self.seed = seed
        """Request n carries ``seed + n``: reproducible, yet a group's samples differ (one seed
        on every request would make vLLM draw the same tokens for the same prompt)."""
        self._requests = 0
        self._version = 0
        self.client = CompletionsClient(
            base_url,
            what="vLLM sampler",
            error_type=SamplerServerError,
            max_concurrency=max_concurrency,
            max_attempts=max_attempts,
            backoff_s=backoff_s,
            timeout_s=timeout_s,
        )

    def reseed(self, seed: int) -> None:
        """Restart the per-request seed sequence (the trainer reseeds every step)."""
        self.seed, self._requests = seed, 0

    def _next_seed(self) -> int | None:
        if self.seed is None:
            return None
        self._requests += 1
        return self.seed + self._requests - 1

    async def sample(self, prompt: Sequence[int], params: SamplingParams) -> SampledTokens:
        forced = forced_tokens(params)
        if needs_processed_logprobs(params, self.logprobs_mode):
            raise ValueError(
                f"vLLM sampler at {self.client.base_url}: temperature={params.temperature}, "
                f"top_k={params.top_k}, top_p={params.top_p} need the sampling distribution's "
                "logprobs; start the server with --logprobs-mode processed_logprobs and pass "
                "logprobs_mode='processed_logprobs'"
            )
        payload = sampling_payload(
            self.model_name,
            [*prompt, *forced],
            replace(params, max_tokens=completion_budget(params, forced)),
            bad_words=self._bad_words(params),
            # Without a tokenizer the server decodes to max_tokens and the cut happens here.
            stop_texts=stop_texts(self.tokenizer, params) if self.tokenizer else [],
            seed=self._next_seed(),
        )
        if forced:
            payload["prompt_logprobs"] = 0
        answer = await self.client.post("/v1/completions", payload)
        try:
            tokens, values, reason = parse_sampled(answer)
            forced_model = (
                parse_prompt_logprobs(answer, [*prompt, *forced], 0)[0][-len(forced) :]
                if forced
                else []
            )
        except (KeyError, ValueError, TypeError) as error:
            raise SamplerServerError(
                f"vLLM sampler at {self.client.base_url} answered without usable tokens and "
                f"logprobs for model {self.model_name!r}: {error!r}"
            ) from error
        return sampled_tokens(
            params,
            self.logprobs_mode,
            forced=forced,
            forced_model_logprobs=forced_model,
            tokens=tokens,
            logprobs=values,
            finish_reason=reason,
        )

    def _bad_words(self, params: SamplingParams) -> list[str]:
        if params.tool_choice == "none" and self.tokenizer is None:
            raise ValueError(
                "tool_choice='none' with a vLLM server needs VLLMServerSampler(tokenizer=...): "
                "the envelope opening is banned as text (vLLM bad_words)"
            )
        return banned_texts(self.tokenizer, params)

    async def update_weights(self, model: torch.nn.Module) -> None:
        if not hasattr(model, "peft_config"):
            raise NotImplementedError(
                f"vLLM sampler at {self.client.base_url} can only load LoRA adapters over HTTP; "
                "train with lora_rank > 0, or sample with HFSampler for full fine-tuning"
            )
        self._version += 1
        root = self.adapter_dir or Path(tempfile.mkdtemp(prefix="apprentice-lora-"))
        self.adapter_dir = root
        path = root / f"v{self._version}"
        model.save_pretrained(path)
        name = f"{self.base_model}-lora-{self._adapter_id}-v{self._version}"
        await self.client.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        previous = self.model_name, self._adapter_path
        self.model_name, self._adapter_path = name, path
        if previous[0] != self.base_model:
            await self._unload(*previous)

    async def _unload(self, name: str, path: Path | None) -> None:
        await self.client.post("/v1/unload_lora_adapter", {"lora_name": name})
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)

    async def close(self) -> None:
        """Unload the last adapter (the server serves only what it served before), close the
        connections, remove a temporary ``adapter_dir``. A server that cannot be reached any
        more is logged, not raised: closing must not hide the error that ended a run."""
        try:
            if self.model_name != self.base_model:
                await self._unload(self.model_name, self._adapter_path)
                self.model_name, self._adapter_path = self.base_model, None
        except SamplerServerError as error:
            log.warning("could not unload the sampler's LoRA adapter: %s", error)
        finally:
            await self.client.aclose()
            if self._own_adapter_dir and self.adapter_dir is not None:
                shutil.rmtree(self.adapter_dir, ignore_errors=True)
