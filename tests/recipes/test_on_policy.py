"""recipes.distillation.on_policy end to end on tiny random models: every loss trains, the
teacher scores under the rows' privileged prompts, validation reports teacher KL and exact-match
accuracy, lmbda mixes seeded off-policy steps, bad rows stop the run with file:line, and every
run writes its reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import anyio
import pytest
import torch

from recipes.cli import format_help, parse_cli
from recipes.common import check_resume, run_training
from recipes.distillation import on_policy
from tests.conftest import free_port
from tool_use.renderers import get_renderer
from tool_use.trajectory import read_jsonl
from training import models
from training.errors import TeacherServerError
from training.metrics import read_metrics
from training.off_policy import LmbdaMix
from training.teacher_view import teacher_views
from training.teachers import LocalTeacher, RemoteTeacher

DATA = Path(on_policy.__file__).resolve().parents[1] / "data"


def rows_file(path: Path, count: int, *, answers: bool = True) -> Path:
    """The first ``count`` rows of the bundled arithmetic set."""
    lines = (DATA / "arithmetic.jsonl").read_text().splitlines()[:count]
    if not answers:
        lines = [json.dumps({**json.loads(line), "expected_answer": None}) for line in lines]
    path.write_text("\n".join(lines) + "\n")
    return path


def args(tiny_folders, log_path, **overrides) -> list[str]:
    options = {
        "model_name": tiny_folders["student"],
        "teacher_model": tiny_folders["teacher"],
        "dtype": "fp32",
        "lora_rank": 4,
        "learning_rate": 1e-2,
        "max_steps": 2,
        "group_size": 2,
        "groups_per_batch": 2,
        "max_tokens": 8,
        "eval_every": 1,
        "save_every": 0,
        "progress": "false",
        "log_path": str(log_path),
        **overrides,
    }
    return [f"{k}={v}" for k, v in options.items()]


def test_on_policy_run_with_privileged_teacher_validation_and_reports(
    tiny_folders, tmp_path, smollm2_tokenizer
):
    validation = rows_file(tmp_path / "val.jsonl", 3)
    log = tmp_path / "run"
    assert (
        on_policy.cli(
            on_policy.main, on_policy.Config, args(tiny_folders, log, validation_dataset=validation)
        )
        == 0
    )

    records = read_metrics(log)
    assert [r["step"] for r in records] == [0, 1, 2]
    for record in records[1:]:
        assert math.isfinite(record["teacher_kl"]) and record["episodes/valid"] == 4
        assert record["grad_norm"] > 0 and "phase/off_policy" not in record
    for record in records:  # validation before, after each step
        assert math.isfinite(record["eval/teacher_kl"]) and record["eval/episodes"] == 3
        assert 0.0 <= record["eval/success_rate"] <= 1.0
    for name in ("report.png", "rollouts.html", "summary.json", "config.json"):
        assert (log / name).is_file(), name
    assert (log / "export" / "adapter" / "adapter_config.json").is_file()
    assert (log / "rollouts" / "eval_0002.jsonl").is_file()

    # Each row is one turn without tools; the teacher scored under the row's teacher_messages.
    rows = {
        json.loads(line)["messages"][0]["content"]: json.loads(line)
        for line in (DATA / "arithmetic.jsonl").read_text().splitlines()
    }
    step = list(read_jsonl(log / "rollouts" / "step_0001.jsonl"))
    renderer = get_renderer(None, smollm2_tokenizer)
    teacher = LocalTeacher(models.load_model(tiny_folders["teacher"], dtype="fp32"))
    for trajectory in step:
        row = rows[trajectory.messages[0].content]
        assert trajectory.tools == [] and len(trajectory.turns) == 1
        assert [m.content for m in trajectory.teacher_messages] == [
            m["content"] for m in row["teacher_messages"]
        ]
        assert trajectory.metadata["teacher"] == "math" and trajectory.metadata["graded"]
        (view,) = teacher_views(trajectory, renderer, student_renderer=renderer)
        hint = row["teacher_messages"][0]["content"]
        assert smollm2_tokenizer.decode(view.tokens).count(hint) == 1
        expected = view.to_student(teacher.score_sync([view.score_request()])[0].logprobs)
        (sequence,) = trajectory.sequences
        assert len(sequence.teacher_logprobs) == len(sequence.tokens)
        torch.testing.assert_close(
            torch.tensor(sequence.teacher_logprobs), expected, atol=1e-4, rtol=0
        )


def test_a_resumed_runs_config_repeats_the_run_in_a_new_folder(tiny_folders, tmp_path):
    log = tmp_path / "run"
    first = args(tiny_folders, log, max_steps=1, eval_every=0, save_every=1)
    assert on_policy.cli(on_policy.main, on_policy.Config, first) == 0
    resumed = args(tiny_folders, log, max_steps=2, eval_every=0, save_every=1, resume="true")
    assert on_policy.cli(on_policy.main, on_policy.Config, resumed) == 0

    saved = json.loads((log / "config.json").read_text())
    assert saved["resume"] is False and saved["max_steps"] == 2
    again = parse_cli(
        on_policy.Config, [f"config={log / 'config.json'}", f"log_path={tmp_path / 'again'}"]
    )
    assert again.resume is False and again.max_steps == 2
    check_resume(again)  # a new run in a new folder: nothing to refuse


@pytest.mark.parametrize(
    "extra, metric",
    [
        ({"loss": "jsd", "beta": 0.5}, "loss/divergence"),
        ({"loss": "topk_forward_kl", "top_k": 5}, "loss/cross_entropy"),
    ],
    ids=["jsd", "topk_forward_kl"],
)
def test_distribution_losses_train(tiny_folders, tmp_path, extra, metric):
    log = tmp_path / "run"
    argv = args(tiny_folders, log, max_steps=1, validation_dataset="null", **extra)
    assert on_policy.cli(on_policy.main, on_policy.Config, argv) == 0
    (record,) = read_metrics(log)
    assert record[metric] > 0 and record["grad_norm"] > 0 and math.isfinite(record["teacher_kl"])


def test_rows_without_expected_answers_are_not_graded(tiny_folders, tmp_path):
    validation = rows_file(tmp_path / "val.jsonl", 2, answers=False)
    log = tmp_path / "run"
    argv = args(tiny_folders, log, max_steps=1, validation_dataset=validation)
    assert on_policy.cli(on_policy.main, on_policy.Config, argv) == 0
    first = read_metrics(log)[0]
    assert first["eval/success_rate"] is None and math.isfinite(first["eval/teacher_kl"])


def test_lmbda_mixes_seeded_off_policy_steps(tiny_folders, tmp_path, smollm2_tokenizer):
    log = tmp_path / "run"
    argv = args(
        tiny_folders, log, max_steps=6, lmbda=0.5, seed=5, eval_every=0, validation_dataset="null"
    )
    assert on_policy.cli(on_policy.main, on_policy.Config, argv) == 0
    records = read_metrics(log)
    choices = LmbdaMix(0.5, policy=None, objective=None, seed=5)  # type: ignore[arg-type]
    expected = [0.0 if choices.on_policy(step) else 1.0 for step in range(6)]
    assert [r["phase/off_policy"] for r in records] == expected
    assert 0 < sum(expected) < 6, "seed 5 should give both kinds of steps in 6"
    rows = {
        json.loads(line)["messages"][0]["content"]: json.loads(line)
        for line in (DATA / "arithmetic.jsonl").read_text().splitlines()
    }
    for record, off in zip(records, expected, strict=True):
        if off:  # SFT on the rows' reference answers; no teacher KL on teacher-written tokens
            assert record["loss/nll"] > 0 and "teacher_kl" not in record
            for trajectory in read_jsonl(log / "rollouts" / f"step_{record['step']:04d}.jsonl"):
                answer = rows[trajectory.messages[0].content]["messages"][1]["content"]
                (sequence,) = trajectory.sequences
                sampled = [t for t, m in zip(sequence.tokens, sequence.mask, strict=True) if m]
                assert smollm2_tokenizer.decode(sampled) == answer + "<|im_end|>"
        else:
            assert math.isfinite(record["teacher_kl"]) and "loss/nll" not in record


def test_lmbda_draws_are_seeded_per_step_with_the_right_proportion():
    mix = LmbdaMix(0.3, policy=None, objective=None, seed=1)  # type: ignore[arg-type]
    draws = [mix.on_policy(step) for step in range(4000)]
    assert abs(sum(draws) / len(draws) - 0.3) < 0.03
    again = LmbdaMix(0.3, policy=None, objective=None, seed=1)  # type: ignore[arg-type]
    assert [again.on_policy(step) for step in reversed(range(4000))] == draws[::-1]
    other = LmbdaMix(0.3, policy=None, objective=None, seed=2)  # type: ignore[arg-type]
    assert [other.on_policy(step) for step in range(4000)] != draws
    always = LmbdaMix(1.0, policy=None, objective=None)  # type: ignore[arg-type]
    never = LmbdaMix(0.0, policy=None, objective=None)  # type: ignore[arg-type]
    assert all(always.on_policy(s) for s in range(50)) and not any(
        never.on_policy(s) for s in range(50)
    )
    with pytest.raises(ValueError, match="lmbda must be in"):
        LmbdaMix(1.5, policy=None, objective=None)  # type: ignore[arg-type]


def test_teacher_generated_off_policy_steps_with_jsd(tiny_folders, tmp_path):
    log = tmp_path / "run"
    argv = args(
        tiny_folders,
        log,
        max_steps=1,
        lmbda=0.0,
        off_policy_source="teacher",
        loss="jsd",
        beta=0.5,
        validation_dataset="null",
    )
    assert on_policy.cli(on_policy.main, on_policy.Config, argv) == 0
    (record,) = read_metrics(log)
    assert record["phase/off_policy"] == 1.0 and record["loss/divergence"] > 0


def test_bad_rows_stop_the_run_naming_file_and_line(tiny_folders, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": "oops"}\n')
    argv = args(tiny_folders, tmp_path / "run", dataset=bad)
    assert on_policy.cli(on_policy.main, on_policy.Config, argv) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: field 'messages'" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_rows_without_reference_answers_cannot_feed_off_policy_steps(
    tiny_folders, tmp_path, capsys
):
    prompts_only = tmp_path / "prompts.jsonl"
    prompts_only.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    argv = args(
        tiny_folders, tmp_path / "run", dataset=prompts_only, lmbda=0.5, validation_dataset="null"
    )
    assert on_policy.cli(on_policy.main, on_policy.Config, argv) == 2
    assert "needs a reference response" in capsys.readouterr().err


def broken_datasets():
    return [], None


def test_a_dataset_builder_that_returns_no_datasets_exits_2(tiny_folders, tmp_path, capsys):
    reference = f"{__name__}:broken_datasets"
    argv = args(tiny_folders, tmp_path / "run", dataset_builder=reference)
    assert on_policy.cli(on_policy.main, on_policy.Config, argv) == 2
    err = capsys.readouterr().err
    assert f"dataset_builder={reference} returned a list as the train dataset" in err
    assert "Traceback" not in err
    assert "dataset_builder: module:attr | null = null" in format_help(on_policy.Config)


def test_a_teacher_server_that_stays_down_stops_the_run_saying_where(tiny_folders, tmp_path):
    """Scoring runs outside the episodes: a dead teacher stops the run, with how to go on."""
    config = parse_cli(on_policy.Config, args(tiny_folders, tmp_path / "run", eval_every=0))
    trainer = on_policy.build_trainer(config)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    trainer.teacher = RemoteTeacher(dead, max_attempts=2, backoff_s=0.01)
    with pytest.raises(TeacherServerError) as stopped:
        anyio.run(run_training, trainer)
    assert f"teacher server at {dead} is unreachable" in str(stopped.value)
    assert stopped.value.__notes__ == [
        "the run stopped during step 1 of 2; last checkpoint: none (save_every=0: only at the "
        f"end), so there is nothing to resume: start again in a new or empty log_path (not "
        f"{tmp_path / 'run'})"
    ]
