"""What a recipe exports serves in vLLM unchanged: a short on_policy run on the embedded SmolLM2
exports a merged model and a LoRA adapter; the CPU vLLM server serves each (the merged folder
as the model; the adapter with --enable-lora --lora-modules on the base model), and the logprobs
of its completions match our HF model's within bf16 tolerance."""

from __future__ import annotations

import anyio
import pytest
import torch
from peft import PeftModel

from recipes.cli import parse_cli
from recipes.distillation import on_policy
from tests.conftest import free_port, load_vllm_cpu_script
from training import models
from training.samplers.vllm import VLLMServerSampler
from training.teachers import LocalTeacher
from training.types import SamplingParams, ScoreRequest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

QUESTIONS = ["What is 17 + 25? Reply with the number only.", "Name a primary colour."]


@pytest.fixture(scope="module")
def run(tmp_path_factory, embedded_model_dir):
    """Three on-policy steps with a large learning rate, so the export differs from the base."""
    log = tmp_path_factory.mktemp("serving") / "run"
    config = parse_cli(
        on_policy.Config,
        [
            f"log_path={log}",
            "max_steps=3",
            "group_size=2",
            "groups_per_batch=4",
            "max_tokens=24",
            "lora_rank=8",
            "learning_rate=1e-2",
            "export_merged=true",
            "validation_dataset=null",
            "eval_every=0",
            "save_every=0",
            "progress=false",
            "dtype=fp32",
        ],
    )
    result = anyio.run(on_policy.main, config)
    return result.exported


@pytest.fixture(scope="module")
def prompts(embedded_model_dir):
    tokenizer = models.load_tokenizer(embedded_model_dir)
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for q in QUESTIONS
    ]


async def completions(url: str, served: str, prompts: list[list[int]]):
    sampler = VLLMServerSampler(url, served)
    try:
        return [
            await sampler.sample(
                p, SamplingParams(max_tokens=24, temperature=0.0, stop_sequences=((2,),))
            )
            for p in prompts
        ]
    finally:
        await sampler.close()


def check_matches(model, base, prompts, outs) -> None:
    """The server's logprobs are our model's (bf16 vs fp32: the tolerance of
    tests/training/test_vllm_server.py), and much closer to it than the base model is."""
    ours, theirs = LocalTeacher(model), LocalTeacher(base)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.tokens, "the server returned an empty completion"
        request = [ScoreRequest(prompt + out.tokens)]
        expected = ours.score_sync(request)[0].logprobs[len(prompt) :]
        served = (expected - torch.tensor(out.model_logprobs)).abs()
        trained = (expected - theirs.score_sync(request)[0].logprobs[len(prompt) :]).abs()
        print(
            f"served gap {served.mean():.3f} (max {served.max():.3f}), "
            f"base gap {trained.mean():.3f}"
        )
        assert served.mean() <= 0.1 and served.max() <= 1.0, served
        assert trained.mean() > 3 * served.mean(), "the export is not the trained model"


def test_the_merged_export_serves_unchanged(run, prompts, smollm2, tmp_path):
    script = load_vllm_cpu_script()
    process, url = script.start(
        run["merged"],
        free_port(),
        served_model_name="merged",
        max_model_len=1024,
        log_path=tmp_path / "merged.log",
    )
    try:
        outs = anyio.run(completions, url, "merged", prompts)
    finally:
        script.stop(process)
    merged, _ = models.load_frozen(run["merged"], dtype=torch.float32, device="cpu")
    check_matches(merged, smollm2, prompts, outs)


def test_the_adapter_export_serves_with_lora_modules(
    run, prompts, smollm2, embedded_model_dir, tmp_path
):
    script = load_vllm_cpu_script()
    process, url = script.start(
        embedded_model_dir,
        free_port(),
        served_model_name="base",
        max_model_len=1024,
        enable_lora=True,
        max_lora_rank=8,
        extra_args=("--lora-modules", f"student={run['adapter']}"),
        log_path=tmp_path / "adapter.log",
    )
    try:
        outs = anyio.run(completions, url, "student", prompts)
    finally:
        script.stop(process)
    base, _ = models.load_frozen(embedded_model_dir, dtype=torch.float32, device="cpu")
    adapted = PeftModel.from_pretrained(base, str(run["adapter"])).eval()
    check_matches(adapted, smollm2, prompts, outs)
