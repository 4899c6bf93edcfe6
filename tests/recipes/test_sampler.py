"""The ``sampler`` key of every recipe: its validation, what ``make_sampler`` builds for each
value, and an on_policy run whose student samples from a real vLLM server (LoRA adapters loaded
there after every step, unloaded at the end)."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from pathlib import Path

import anyio
import pytest

from recipes import common
from recipes.cli import ConfigError, parse_cli
from recipes.common import Student, make_sampler, run_training, vllm_max_lora_rank
from recipes.distillation import harbor_multi_turn, multi_teacher, off_policy_sft, on_policy
from recipes.harbor_rl import eval as harbor_eval
from recipes.harbor_rl import train as harbor_train
from tests.conftest import SERVED_NAME, VLLM_MAX_LORA_RANK, served_models
from tool_use.renderers import get_renderer
from training.metrics import read_metrics
from training.samplers import HFSampler
from training.samplers.vllm import VLLMServerSampler

URL = "http://127.0.0.1:8000"
CONFIGS = [
    on_policy.Config,
    off_policy_sft.Config,
    multi_teacher.Config,
    harbor_multi_turn.Config,
    harbor_train.Config,
    harbor_eval.Config,
]


@pytest.fixture
def student(tiny_model, smollm2_tokenizer) -> Student:
    return Student(tiny_model, smollm2_tokenizer, get_renderer(None, smollm2_tokenizer))


# ---- the key -----------------------------------------------------------------------------------


@pytest.mark.parametrize("config_cls", CONFIGS, ids=lambda c: c.__module__.split(".")[-1])
@pytest.mark.parametrize("value", ["hf", "vllm", URL, "https://gpu-box:8443/"])
def test_every_recipe_takes_each_kind_of_sampler(config_cls, value):
    assert parse_cli(config_cls, [f"sampler={value}"]).sampler == value.rstrip("/")


@pytest.mark.parametrize("value", ["HF", "vllm-engine", "127.0.0.1:8000", "ftp://host", "http://"])
def test_a_bad_sampler_names_the_key_and_the_choices(value):
    with pytest.raises(ConfigError) as error:
        parse_cli(on_policy.Config, [f"sampler={value}"])
    message = str(error.value)
    assert message.startswith(f"sampler={value!r}: ")
    assert "expected hf" in message and "vllm" in message and "http://127.0.0.1:8000" in message


def test_a_server_sampler_needs_lora():
    with pytest.raises(ConfigError, match=rf"sampler={URL!r}: .*full fine-tuning \(lora_rank=0\)"):
        parse_cli(on_policy.Config, ["lora_rank=0", f"sampler={URL}"])
    assert parse_cli(on_policy.Config, ["lora_rank=0", "sampler=vllm"]).lora_rank == 0


@pytest.mark.parametrize("config_cls", [on_policy.Config, harbor_eval.Config])
def test_a_served_name_goes_with_a_server(config_cls):
    with pytest.raises(ConfigError, match=r"sampler_served_name='m': .* but sampler=vllm"):
        parse_cli(config_cls, ["sampler=vllm", "sampler_served_name=m"])
    config = parse_cli(config_cls, [f"sampler={URL}", "sampler_served_name=m"])
    assert config.sampler_served_name == "m"


# ---- make_sampler ------------------------------------------------------------------------------


def test_hf_samples_the_student_in_this_process(student):
    sampler = make_sampler(parse_cli(on_policy.Config, []), student, seed=3)
    assert isinstance(sampler, HFSampler) and sampler.model is student.model


@pytest.mark.anyio
async def test_a_url_asks_that_server_for_the_served_name(student):
    config = parse_cli(on_policy.Config, [f"sampler={URL}/", "model_name=some/model"])
    sampler = make_sampler(config, student, seed=3)
    try:
        assert isinstance(sampler, VLLMServerSampler)
        assert sampler.client.base_url == URL and sampler.model_name == "some/model"
        assert sampler.tokenizer is student.tokenizer and sampler.seed == 3
    finally:
        await sampler.close()
    config = parse_cli(on_policy.Config, [f"sampler={URL}", "sampler_served_name=student"])
    sampler = make_sampler(config, student, seed=0)
    await sampler.close()
    assert sampler.model_name == "student"


@pytest.mark.parametrize("key", ["temperature=0.7", "eval_temperature=0.5"])
def test_vllm_samplers_refuse_temperatures_their_logprobs_do_not_describe(student, key):
    config = parse_cli(on_policy.Config, [f"sampler={URL}", key])
    with pytest.raises(ConfigError, match=rf"{key} with sampler={URL}: .*temperature 1"):
        make_sampler(config, student, seed=0)


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is not None,
    reason="vllm is importable in this Python, so the missing-vllm error cannot happen",
)
def test_vllm_without_vllm_says_how_to_get_it(student):
    config = parse_cli(on_policy.Config, ["sampler=vllm"])
    with pytest.raises(ConfigError) as error:
        make_sampler(config, student, seed=0)
    message = str(error.value)
    assert message.startswith("sampler=vllm runs vLLM's engine in this process")
    assert "pip install 'apprentice[vllm]'" in message and "sampler=http://HOST:PORT" in message


def test_vllm_starts_the_engine_on_the_students_folder(student, embedded_model_dir, monkeypatch):
    """``vllm`` does not import in this venv (tests/training/test_vllm_engine.py drives the real
    engine under .venv-vllm), so this checks only what make_sampler hands the engine."""
    created: list[tuple[tuple, dict]] = []
    monkeypatch.setattr(common, "VLLMEngineSampler", lambda *a, **kw: created.append((a, kw)))
    config = parse_cli(on_policy.Config, ["sampler=vllm", "lora_rank=4", "dtype=bf16"])
    make_sampler(config, student, seed=5)
    args, kwargs = created[0]
    assert Path(args[0]) == embedded_model_dir  # the embedded alias, resolved to its folder
    # max_model_len: max_trajectory_tokens; max_lora_rank: vLLM's smallest rank >= 4
    assert kwargs == dict(dtype="bfloat16", max_model_len=1024, max_lora_rank=8, seed=5)
    make_sampler(parse_cli(harbor_eval.Config, ["sampler=vllm"]), student, 0, base_model="/m")
    assert created[1][0] == ("/m",) and created[1][1]["max_lora_rank"] == 0


def test_vllm_lora_ranks_round_up_to_what_vllm_accepts():
    ranks = [vllm_max_lora_rank(r) for r in (0, 1, 4, 8, 9, 16, 100, 512)]
    assert ranks == [0, 1, 8, 8, 16, 16, 128, 512]


@pytest.mark.bwrap  # the eval checks its sandbox backend first
def test_the_eval_refuses_merged_weights_for_a_server(tmp_path, tiny_folders):
    """A run folder's weights are merged here and cannot reach a server."""
    run = tmp_path / "run"
    assert (
        on_policy.cli(
            on_policy.main,
            on_policy.Config,
            [
                f"model_name={tiny_folders['student']}",
                f"teacher_model={tiny_folders['teacher']}",
                "max_steps=1",
                "group_size=1",
                "groups_per_batch=1",
                "max_tokens=4",
                "lora_rank=4",
                "validation_dataset=null",
                "progress=false",
                f"log_path={run}",
            ],
        )
        == 0
    )
    config = parse_cli(harbor_eval.Config, [f"model_name={run}", f"sampler={URL}"])
    with pytest.raises(ConfigError, match=rf"sampler={URL} .* names checkpoint weights"):
        anyio.run(harbor_eval.main, config)


# ---- against a real vLLM server ----------------------------------------------------------------


def child_pids() -> set[int]:
    """This process's child processes (the session's vLLM server among them)."""
    pids: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            pids.update(int(pid) for pid in (task / "children").read_text().split())
    return pids


@pytest.mark.vllm
@pytest.mark.slow
def test_on_policy_samples_from_a_vllm_server(vllm_server, tmp_path):
    """Two LoRA steps on the embedded model: the student samples on the server, which holds
    exactly one adapter of this run at a time (the one the trainer sent at the start, then after
    each step) and none once the run is over."""
    log = tmp_path / "run"
    config = parse_cli(
        on_policy.Config,
        [
            f"sampler={vllm_server}",
            f"lora_rank={VLLM_MAX_LORA_RANK}",
            "max_steps=2",
            "group_size=2",
            "groups_per_batch=2",
            "max_tokens=16",
            "learning_rate=1e-3",
            "dtype=fp32",
            "validation_dataset=null",
            "eval_every=0",
            "save_every=0",
            "progress=false",
            f"log_path={log}",
        ],
    )
    children = child_pids()
    served: list[tuple[int, str, set[str]]] = []

    async def main():  # on_policy.main, watching the server after every step
        trainer = on_policy.build_trainer(config)
        sampler = trainer.sampler
        assert isinstance(sampler, VLLMServerSampler) and sampler.model_name == SERVED_NAME
        trainer.callbacks.append(
            lambda step, _: served.append((step, sampler.model_name, served_models(vllm_server)))
        )
        return sampler, await run_training(trainer)

    sampler, result = anyio.run(main)

    assert result.steps == 2
    records = read_metrics(log)
    assert [r["step"] for r in records] == [1, 2]
    for record in records:  # every episode was sampled (an unreachable sampler: invalid ones)
        assert record["episodes/valid"] == 4 and math.isfinite(record["teacher_kl"])
        assert record["grad_norm"] > 0
    prefix = f"{SERVED_NAME}-lora-"
    for step, name, models_now in served:  # v1 at the start, v<step + 1> after step <step>
        assert name.startswith(prefix) and name.endswith(f"-v{step + 1}")
        assert models_now == {SERVED_NAME, name}
    assert [step for step, _, _ in served] == [1, 2]
    # Nothing left behind: no adapter on the server, no adapter files, no process.
    assert served_models(vllm_server) == {SERVED_NAME}
    assert sampler.adapter_dir is not None and not sampler.adapter_dir.exists()
    assert child_pids() == children
    assert (log / "export" / "adapter" / "adapter_config.json").is_file()
