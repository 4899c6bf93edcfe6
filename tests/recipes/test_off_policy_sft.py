"""recipes.distillation.off_policy_sft end to end on tiny random models: SFT on the rows'
reference answers (the student learns them: the loss falls), and on responses the teacher writes
on the fly (their logprobs are the teacher's own, under its privileged view)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from recipes.distillation import off_policy_sft
from tool_use.renderers import get_renderer
from tool_use.trajectory import read_jsonl
from training import models
from training.metrics import read_metrics
from training.teachers import LocalTeacher
from training.types import ScoreRequest

DATA = Path(off_policy_sft.__file__).resolve().parents[1] / "data"


def args(tiny_folders, log_path, **overrides) -> list[str]:
    options = {
        "model_name": tiny_folders["student"],
        "teacher_model": tiny_folders["teacher"],
        "dtype": "fp32",
        "lora_rank": 4,
        "learning_rate": 2e-2,
        "groups_per_batch": 2,
        "max_tokens": 8,
        "eval_every": 0,
        "save_every": 0,
        "progress": "false",
        "validation_dataset": "null",
        "log_path": str(log_path),
        **overrides,
    }
    return [f"{k}={v}" for k, v in options.items()]


def test_sft_on_reference_answers_learns_them(tiny_folders, tmp_path, smollm2_tokenizer):
    two = tmp_path / "two.jsonl"
    two.write_text("\n".join((DATA / "arithmetic.jsonl").read_text().splitlines()[:2]) + "\n")
    log = tmp_path / "run"
    argv = args(tiny_folders, log, dataset=two, epochs=4, group_size=2)
    assert off_policy_sft.cli(off_policy_sft.main, off_policy_sft.Config, argv) == 0
    records = read_metrics(log)
    assert len(records) == 4 and all(r["phase/off_policy"] == 1.0 for r in records)
    nll = [r["loss/nll"] for r in records]
    assert nll[-1] < 0.7 * nll[0], nll  # the same two answers, seen four times
    assert all("teacher_kl" not in r for r in records)
    answers = {
        json.loads(line)["messages"][0]["content"]: json.loads(line)["messages"][1]
        for line in two.read_text().splitlines()
    }
    for trajectory in read_jsonl(log / "rollouts" / "step_0001.jsonl"):
        (sequence,) = trajectory.sequences
        sampled = [t for t, m in zip(sequence.tokens, sequence.mask, strict=True) if m]
        expected = answers[trajectory.messages[0].content]["content"]
        assert smollm2_tokenizer.decode(sampled) == expected + "<|im_end|>"
    assert (log / "report.png").is_file() and (log / "rollouts.html").is_file()


def test_sft_on_responses_the_teacher_writes(tiny_folders, tmp_path, smollm2_tokenizer):
    log = tmp_path / "run"
    argv = args(tiny_folders, log, source="teacher", max_steps=1, group_size=2)
    assert off_policy_sft.cli(off_policy_sft.main, off_policy_sft.Config, argv) == 0
    (record,) = read_metrics(log)
    assert record["loss/nll"] > 0 and record["episodes/valid"] == 4
    renderer = get_renderer(None, smollm2_tokenizer)
    teacher = LocalTeacher(models.load_model(tiny_folders["teacher"], dtype="fp32"))
    for trajectory in read_jsonl(log / "rollouts" / "step_0001.jsonl"):
        # The teacher wrote the answer from its privileged prompt: its sampling logprobs are
        # the teacher's own logprobs of those tokens in that context.
        (sequence,) = trajectory.sequences
        turn = trajectory.turns[0]
        answer = sequence.tokens[turn.sample_start : turn.sample_end]
        prompt = renderer.render_prompt(trajectory.teacher_messages, [])
        scores = teacher.score_sync([ScoreRequest(prompt + answer)])[0].logprobs[len(prompt) :]
        recorded = torch.tensor(sequence.sampling_logprobs[turn.sample_start : turn.sample_end])
        torch.testing.assert_close(recorded, scores, atol=2e-3, rtol=0)
