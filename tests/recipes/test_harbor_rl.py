"""recipes.harbor_rl: the pass@k estimator; episodes cut off by a token budget are still graded
by the task's verifier; RL training and evaluation end to end on tiny random models, real
bundled Harbor tasks and real bubblewrap sandboxes; evaluation of an exported adapter and of a
run folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from envs.harbor.builders import HarborEnvConfig, HarborEnvGroupBuilder
from envs.harbor.tasks import SUITE_DIR, load_task
from envs.harbor.teacher_view import solution_commands
from recipes.cli import dump_config, format_help
from recipes.distillation import on_policy
from recipes.harbor_rl import eval as harbor_eval
from recipes.harbor_rl import train as harbor_train
from sandboxes.factory import make_factory
from tool_use.renderers import get_renderer
from tool_use.trajectory import Trajectory, read_jsonl
from tool_use.types import Message, StopReason, ToolCall
from training.eval import pass_at_k
from training.metrics import read_metrics
from training.rollouts import RolloutSettings, ScriptedPolicy, do_rollouts

TASKS = [str(SUITE_DIR / "count-lines"), str(SUITE_DIR / "hello-file")]


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 0, 1, 0.0),
        (5, 5, 3, 1.0),
        (10, 3, 1, 0.3),
        (10, 3, 5, 1 - math.comb(7, 5) / math.comb(10, 5)),
        (4, 2, 3, 1.0),  # fewer failures than k: every draw of 3 holds a success
        (2, 1, 2, 1.0),
        (200, 10, 50, 1 - math.comb(190, 50) / math.comb(200, 50)),
    ],
)
def test_pass_at_k_is_the_unbiased_estimator(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    for n, c, k in ((3, 4, 1), (3, 1, 4), (3, 1, 0), (0, 0, 1)):
        with pytest.raises(ValueError, match="pass_at_k needs"):
            pass_at_k(n, c, k)


def test_task_results_and_overall_means():
    def episode(task: str, reward: float, failure: str | None = None) -> Trajectory:
        return Trajectory(reward=reward, failure=failure, metadata={"task": task})

    trajectories = [
        episode("a", 1.0),
        episode("a", 0.0),
        episode("a", 0.0),
        episode("a", 1.0),
        episode("b", 0.0),
        episode("b", 0.0, failure="sandbox: dead"),
        episode("b", 1.0),
        episode("c", 0.0, failure="grading: no reward"),
    ]
    rows = harbor_eval.task_results(["a", "b", "c"], trajectories, [1, 3])
    a, b, c = rows
    assert (a["valid"], a["solved"], a["success_rate"]) == (4, 2, 0.5)
    assert a["pass@1"] == pytest.approx(0.5) and a["pass@3"] == 1.0
    assert (b["attempts"], b["valid"], b["solved"]) == (3, 2, 1)
    assert b["pass@3"] is None  # 2 valid attempts cannot estimate pass@3
    assert c["success_rate"] is None and c["pass@1"] is None
    total = harbor_eval.overall(rows, [1, 3])
    assert total["invalid"] == 2 and total["attempts"] == 8
    assert total["success_rate"] == pytest.approx(0.5)  # (0.5 + 0.5) / 2 tasks with a value
    assert total["pass@3"] == 1.0


@pytest.mark.bwrap
@pytest.mark.anyio
async def test_an_episode_a_token_budget_cuts_off_is_still_graded(smollm2_tokenizer):
    """The agent fixes the task, then rambles past max_tokens: Harbor grades the sandbox as it
    is, so the episode earns the verifier's 1 (it used to end with 0, never graded)."""
    task = load_task(TASKS[1])
    config = HarborEnvConfig(tasks=[TASKS[1]], group_size=1, max_turns=5)
    builder = HarborEnvGroupBuilder(task, make_factory("local"), config)
    renderer = get_renderer(None, smollm2_tokenizer)
    command = solution_commands(task.reference_solution)
    call = ToolCall(id="c0", name="bash", arguments=json.dumps({"command": command}))
    script = [
        Message(role="assistant", content="", tool_calls=[call]),
        Message(role="assistant", content="All done. " * 200),
    ]
    settings = RolloutSettings(max_tokens=400, max_trajectory_tokens=4000)
    (group,) = await do_rollouts(
        [builder], ScriptedPolicy(lambda env: script, renderer), renderer, settings
    )
    (trajectory,) = group.trajectories
    assert trajectory.valid and trajectory.stop_reason is StopReason.MAX_TOKENS
    assert trajectory.reward == 1.0


def tiny_args(tiny_folders, log: Path, **overrides) -> list[str]:
    options = {
        "model_name": tiny_folders["student"],
        "dtype": "fp32",
        "lora_rank": 4,
        "learning_rate": 1e-2,
        "max_turns": 2,
        "max_tokens": 200,
        "max_trajectory_tokens": 1500,
        "progress": "false",
        "save_every": 0,
        "log_path": str(log),
        **overrides,
    }
    return [f"{k}={v}" for k, v in options.items()]


@pytest.mark.bwrap
def test_rl_training_end_to_end(tiny_folders, tmp_path):
    log = tmp_path / "rl"
    argv = tiny_args(
        tiny_folders,
        log,
        tasks=json.dumps(TASKS),
        eval_tasks=json.dumps(TASKS[:1]),
        group_size=2,
        groups_per_batch=2,
        max_steps=2,
        sft_warmup_steps=1,
        eval_every=1,
    )
    assert harbor_train.cli(harbor_train.main, harbor_train.Config, argv) == 0
    before, warmup, rl = read_metrics(log)
    assert before["eval/episodes"] == 1 and before["eval/success_rate"] == 0.0
    # The reference solutions, graded by the tasks' own tests, score 1 in the warmup.
    assert warmup["phase/sft_warmup"] == 1.0 and warmup["reward/mean"] == 1.0
    assert warmup["episodes/valid"] == 4
    assert rl["phase/sft_warmup"] == 0.0 and rl["episodes/valid"] == 4
    assert "loss/advantage_mean" in rl and "teacher_kl" not in rl
    assert "eval/success_rate" in rl
    step = list(read_jsonl(log / "rollouts" / "step_0002.jsonl"))
    for task in {t.metadata["task"] for t in step}:
        group = [t for t in step if t.metadata["task"] == task]
        mean = sum(t.reward for t in group) / len(group)
        assert all(t.metadata["advantage"] == pytest.approx(t.reward - mean) for t in group)
    for name in ("report.png", "rollouts.html"):
        assert (log / name).is_file()
    assert "advantage <b>" in (log / "rollouts.html").read_text()  # shown per RL episode
    assert (log / "export" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("kl_penalty_coef", "0.5", "it scales the teacher-KL advantage"),
        ("kl_discount_factor", "0.9", "it discounts the teacher KL"),
        ("beta", "0.1", "it weighs the jsd distillation loss"),
        ("top_k", "5", "it sets how many teacher alternatives"),
        ("teacher_from_warmup", "true", "it makes the warm-started student a teacher"),
    ],
)
def test_distillation_keys_are_errors_naming_the_key_and_why(key, value, why, tmp_path, capsys):
    argv = [f"{key}={value}", f"log_path={tmp_path / 'rl'}"]
    assert harbor_train.cli(harbor_train.main, harbor_train.Config, argv) == 2
    err = capsys.readouterr().err
    assert f"key {key!r} does not apply to this recipe: {why}" in err
    assert "there is no teacher" in err and "Traceback" not in err
    assert not (tmp_path / "rl").exists()


def test_only_the_rl_loss_and_no_distillation_keys_in_help(tmp_path, capsys):
    argv = ["loss=jsd", f"log_path={tmp_path / 'rl'}"]
    assert harbor_train.cli(harbor_train.main, harbor_train.Config, argv) == 2
    err = capsys.readouterr().err
    assert "loss='jsd'" in err and "its only loss (policy_gradient)" in err
    assert "recipes.distillation.harbor_multi_turn" in err

    text = format_help(harbor_train.Config, prog="harbor_rl")
    for key in harbor_train.Config.excluded_keys:
        assert f"\n  {key}:" not in text, key
    for key in ("loss", "clip_ratio", "sft_warmup_steps", "temperature", "normalize_advantages"):
        assert f"\n  {key}:" in text, key
    assert "policy gradient's importance ratio" in text
    dumped = dump_config(harbor_train.Config())
    assert not set(harbor_train.Config.excluded_keys) & set(dumped)


@pytest.mark.bwrap
def test_eval_reports_success_and_pass_at_k(tiny_folders, tmp_path, capsys):
    log = tmp_path / "eval"
    argv = [
        f"model_name={tiny_folders['student']}",
        f"tasks={json.dumps(TASKS)}",
        "samples=2",
        "k=1,2",
        "max_turns=1",
        "max_tokens=16",
        "dtype=fp32",
        f"log_path={log}",
    ]
    assert harbor_eval.cli(harbor_eval.main, harbor_eval.Config, argv) == 0
    results = json.loads((log / "results.json").read_text())
    assert [r["task"] for r in results["tasks"]] == ["count-lines", "hello-file"]
    for row in results["tasks"]:
        assert row["attempts"] == 2 and row["valid"] == 2
        assert row["success_rate"] == 0.0 and row["pass@1"] == 0.0 and row["pass@2"] == 0.0
    assert results["overall"]["pass@2"] == 0.0 and results["temperature"] == 1.0
    assert results["loaded"]["kind"] == "model"
    out = capsys.readouterr().out
    assert "count-lines" in out and "pass@2" in out and "all (2 tasks)" in out
    assert len(list(read_jsonl(log / "rollouts" / "eval_0000.jsonl"))) == 4
    assert (log / "report.png").is_file() and (log / "rollouts.html").is_file()


@pytest.mark.bwrap
def test_eval_loads_an_exported_adapter_and_a_run_folder(tiny_folders, tmp_path):
    run = tmp_path / "opd"
    opd = [
        f"model_name={tiny_folders['student']}",
        f"teacher_model={tiny_folders['teacher']}",
        "dtype=fp32",
        "lora_rank=4",
        "max_steps=1",
        "group_size=2",
        "groups_per_batch=2",
        "max_tokens=8",
        "eval_every=0",
        "save_every=1",
        "progress=false",
        "validation_dataset=null",
        f"log_path={run}",
    ]
    assert on_policy.cli(on_policy.main, on_policy.Config, opd) == 0
    for source, kind in ((run / "export" / "adapter", "adapter"), (run, "checkpoint")):
        log = tmp_path / f"eval-{kind}"
        argv = [
            f"model_name={source}",
            f"tasks={json.dumps(TASKS[:1])}",
            "max_turns=1",
            "max_tokens=8",
            "dtype=fp32",
            f"log_path={log}",
        ]
        assert harbor_eval.cli(harbor_eval.main, harbor_eval.Config, argv) == 0
        results = json.loads((log / "results.json").read_text())
        assert results["loaded"] == {"kind": kind, "base_model": tiny_folders["student"]}
        assert results["temperature"] == 0.0 and results["tasks"][0]["attempts"] == 1


def test_eval_config_checks_k_against_samples():
    with pytest.raises(Exception, match="k=4 needs samples >= 4"):
        harbor_eval.Config(k=[1, 4], samples=2)
    assert harbor_eval.Config(k=[1, 4]).attempts == 4
