"""recipes.distillation.multi_teacher end to end on tiny random models: rows routed to their
teacher (each episode scored exactly by it), a teacher per dataset, blending, per-teacher
metrics, a teacher's checkpoint loaded onto its model, and routes that match no teacher stopping
the run before it starts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from recipes.distillation import multi_teacher
from tool_use.renderers import get_renderer
from tool_use.trajectory import read_jsonl
from training import models
from training.metrics import read_metrics
from training.teacher_view import teacher_views
from training.teachers import LocalTeacher
from training.weights import load_weights

DATA = Path(multi_teacher.__file__).resolve().parents[1] / "data"


def teachers(tiny_folders, **weights) -> str:
    return json.dumps(
        [
            {"model": tiny_folders["teacher"], "route": "math", "weight": weights.get("math", 1)},
            {"model": tiny_folders["teacher2"], "route": "geo", "weight": weights.get("geo", 1)},
        ]
    )


def args(tiny_folders, log_path, **overrides) -> list[str]:
    options = {
        "model_name": tiny_folders["student"],
        "teachers": teachers(tiny_folders),
        "dtype": "fp32",
        "lora_rank": 4,
        "learning_rate": 1e-2,
        "max_steps": 1,
        "group_size": 2,
        "groups_per_batch": 4,
        "max_tokens": 8,
        "eval_every": 0,
        "save_every": 0,
        "progress": "false",
        "seed": 1,
        "log_path": str(log_path),
        **overrides,
    }
    return [f"{k}={v}" for k, v in options.items()]


def scored_by(trajectory, model, renderer) -> torch.Tensor:
    """The logprobs ``model`` (or the model in a folder) gives the episode's sampled tokens."""
    if isinstance(model, str):
        model = models.load_model(model, dtype="fp32")
    teacher = LocalTeacher(model)
    (view,) = teacher_views(trajectory, renderer, student_renderer=renderer)
    return view.to_student(teacher.score_sync([view.score_request()])[0].logprobs)


def test_routed_rows_are_scored_by_their_teacher(tiny_folders, tmp_path, smollm2_tokenizer):
    log = tmp_path / "run"
    argv = args(tiny_folders, log, max_steps=2)
    assert multi_teacher.cli(multi_teacher.main, multi_teacher.Config, argv) == 0
    records = read_metrics(log)
    assert len(records) == 2
    renderer = get_renderer(None, smollm2_tokenizer)
    folder = {"math": tiny_folders["teacher"], "geo": tiny_folders["teacher2"]}
    seen = set()
    for record in records:
        shares = {k: v for k, v in record.items() if k.startswith("teacher_share/")}
        assert math.isclose(sum(shares.values()), 1.0)
        step = list(read_jsonl(log / "rollouts" / f"step_{record['step']:04d}.jsonl"))
        for route in ("math", "geo"):
            mine = [t for t in step if t.metadata["teacher"] == route]
            tokens = sum(t.num_sampled_tokens for t in mine)
            total = sum(t.num_sampled_tokens for t in step)
            assert record.get(f"teacher_share/{route}", 0.0) == pytest.approx(tokens / total)
            if mine:
                seen.add(route)
                assert math.isfinite(record[f"teacher_kl/{route}"])
            for trajectory in mine:
                expected = scored_by(trajectory, folder[route], renderer)
                got = torch.tensor(trajectory.sequences[0].teacher_logprobs)
                torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert seen == {"math", "geo"}, "the mixed example routes to both teachers"
    assert (log / "report.png").is_file() and (log / "rollouts.html").is_file()


def test_a_teacher_per_dataset(tiny_folders, tmp_path):
    math_rows, geo_rows = tmp_path / "math.jsonl", tmp_path / "geo.jsonl"
    lines = [json.loads(line) for line in (DATA / "mixed.jsonl").read_text().splitlines()]
    for path, route in ((math_rows, "math"), (geo_rows, "geo")):
        picked = [{**row, "teacher": None} for row in lines if row["teacher"] == route][:4]
        path.write_text("".join(json.dumps(row) + "\n" for row in picked))
    datasets = json.dumps(
        [
            {"prompts": str(math_rows), "teacher": "math", "groups_per_batch": 1},
            {"prompts": str(geo_rows), "teacher": "geo", "groups_per_batch": 3},
        ]
    )
    log = tmp_path / "run"
    argv = args(tiny_folders, log, datasets=datasets, max_steps=1)
    assert multi_teacher.cli(multi_teacher.main, multi_teacher.Config, argv) == 0
    (record,) = read_metrics(log)
    step = list(read_jsonl(log / "rollouts" / "step_0001.jsonl"))
    routes = [t.metadata["teacher"] for t in step]
    assert routes.count("math") == 2 and routes.count("geo") == 6  # groups x group_size
    assert all(
        ("capital" in t.messages[0].content) == (t.metadata["teacher"] == "geo") for t in step
    )
    assert {"teacher_kl/math", "teacher_kl/geo"} <= record.keys()


def test_blended_teachers_mix_by_weight(tiny_folders, tmp_path):
    log = tmp_path / "run"
    argv = args(
        tiny_folders, log, mode="blended", top_k=5, teachers=teachers(tiny_folders, math=3, geo=1)
    )
    assert multi_teacher.cli(multi_teacher.main, multi_teacher.Config, argv) == 0
    config = json.loads((log / "config.json").read_text())
    assert config["loss"] == "topk_forward_kl"  # the blended default
    (record,) = read_metrics(log)
    assert record["teacher_share/math"] == pytest.approx(0.75)
    assert record["teacher_share/geo"] == pytest.approx(0.25)
    assert record["loss/cross_entropy"] >= record["loss/target_entropy"] >= 0
    assert math.isfinite(record["teacher_kl/math"]) and math.isfinite(record["teacher_kl/geo"])
    assert record["teacher_kl/math"] != record["teacher_kl/geo"]


def test_a_teacher_with_a_checkpoint_scores_with_its_weights(
    tiny_folders, tmp_path, smollm2_tokenizer
):
    """A teacher's ``checkpoint`` (here: the checkpoint folder a 1-step run of the student
    left) is loaded onto its model: its scores are the trained weights', not the base's."""
    first = tmp_path / "first"
    argv = args(tiny_folders, first, save_every=1, learning_rate=5e-2)
    assert multi_teacher.cli(multi_teacher.main, multi_teacher.Config, argv) == 0
    checkpoint = first / "checkpoints" / "step_000001"
    assert (checkpoint / "state.json").is_file()

    rows = tmp_path / "math.jsonl"
    lines = [json.loads(line) for line in (DATA / "mixed.jsonl").read_text().splitlines()]
    rows.write_text("".join(json.dumps(r) + "\n" for r in lines if r["teacher"] == "math"))
    spec = [
        {"model": tiny_folders["student"], "checkpoint": str(checkpoint), "route": "math"},
        {"model": tiny_folders["teacher2"], "route": "geo"},
    ]
    log = tmp_path / "run"
    argv = args(tiny_folders, log, teachers=json.dumps(spec), dataset=rows)
    assert multi_teacher.cli(multi_teacher.main, multi_teacher.Config, argv) == 0

    renderer = get_renderer(None, smollm2_tokenizer)
    trained = load_weights(checkpoint, dtype="fp32").model
    base = models.load_model(tiny_folders["student"], dtype="fp32")
    step = list(read_jsonl(log / "rollouts" / "step_0001.jsonl"))
    assert len(step) == 8 and {t.metadata["teacher"] for t in step} == {"math"}
    for trajectory in step:
        got = torch.tensor(trajectory.sequences[0].teacher_logprobs)
        torch.testing.assert_close(got, scored_by(trajectory, trained, renderer), atol=1e-4, rtol=0)
        assert (got - scored_by(trajectory, base, renderer)).abs().max() > 1e-2


def test_a_route_no_teacher_answers_to_stops_the_run(tiny_folders, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "teacher": "poetry"}) + "\n"
    )
    argv = args(tiny_folders, tmp_path / "run", dataset=rows)
    assert multi_teacher.cli(multi_teacher.main, multi_teacher.Config, argv) == 2
    err = capsys.readouterr().err
    assert "teacher='poetry' matches no teacher; expected one of 'math', 'geo'" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.bwrap
def test_prompt_rows_and_harbor_tasks_each_with_their_teacher(
    tiny_folders, tmp_path, smollm2_tokenizer
):
    """A dataset-level teacher for a Harbor task set beside routed prompt rows: the Harbor
    episodes (real sandboxes) carry the route and are scored by their teacher under the task's
    privileged view."""
    from envs.harbor.tasks import SUITE_DIR

    datasets = json.dumps(
        [
            {"prompts": str(DATA / "mixed.jsonl"), "groups_per_batch": 2},
            {"tasks": [str(SUITE_DIR / "count-lines")], "teacher": "geo", "groups_per_batch": 1},
        ]
    )
    log = tmp_path / "run"
    argv = args(tiny_folders, log, datasets=datasets, max_turns=1, max_tokens=12)
    assert multi_teacher.cli(multi_teacher.main, multi_teacher.Config, argv) == 0
    step = list(read_jsonl(log / "rollouts" / "step_0001.jsonl"))
    harbor = [t for t in step if t.metadata.get("task") == "count-lines"]
    assert len(harbor) == 2 and len(step) == 6
    renderer = get_renderer(None, smollm2_tokenizer)
    for trajectory in harbor:
        assert trajectory.valid and trajectory.metadata["teacher"] == "geo"
        assert trajectory.metadata["teacher_view"] == "privileged"
        expected = scored_by(trajectory, tiny_folders["teacher2"], renderer)
        got = torch.tensor(trajectory.sequences[0].teacher_logprobs)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    (record,) = read_metrics(log)
    assert record["episodes/valid"] == 6
