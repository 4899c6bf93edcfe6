"""Run reports: the PNG plot and the HTML rollout viewer are written from a run folder, the viewer
shows student and env tokens, per-token KL, tool calls and results, and escapes everything."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest

from tool_use.trajectory import TokenSequence, Trajectory, Turn, write_jsonl
from tool_use.types import Message, StopReason, ToolCall
from training import reports

EVIL = "<script>alert(\"x\")</script> & 'q'"


def trajectory(tokenizer, step: int, group: int) -> Trajectory:
    prompt = tokenizer.encode("<|im_start|>user\nRun it<|im_end|>\n<|im_start|>assistant\n")
    sampled = tokenizer.encode(EVIL)
    tool_answer = tokenizer.encode("<|im_start|>user\nok<|im_end|>\n")
    teacher = [-0.1 * (i + 1) for i in range(len(sampled))]
    sequence = TokenSequence()
    sequence.append(prompt, sampled=False)
    sequence.append(
        sampled,
        sampled=True,
        sampling_logprobs=[-0.5] * len(sampled),
        model_logprobs=[-0.5] * len(sampled),
    )
    sequence.append(tool_answer, sampled=False)
    sequence.teacher_logprobs = [0.0] * len(prompt) + teacher + [0.0] * len(tool_answer)
    call = ToolCall(id="c1", name="bash", arguments=json.dumps({"command": "echo '<b>' && ls"}))
    message = Message(role="assistant", content=EVIL, tool_calls=[call])
    result = Message(role="tool", content="</div><img src=x onerror=alert(1)>", tool_call_id="c1")
    return Trajectory(
        sequences=[sequence],
        turns=[
            Turn(0, 0, len(prompt), len(prompt) + len(sampled), message, [result], 1),
        ],
        messages=[Message(role="user", content="Run it"), message, result],
        reward=1.0,
        stop_reason=StopReason.MAX_TURNS,
        metadata={"step": step, "group": group, "task": "<task&name>"},
    )


@pytest.fixture
def run(tmp_path, smollm2_tokenizer):
    folder = tmp_path / "run"
    (folder / "rollouts").mkdir(parents=True)
    records = [
        {"step": 0, "eval/success_rate": 0.0, "eval/teacher_kl": 1.5},
        *[
            {"step": s, "teacher_kl": 2.0 / s, "teacher_kl/math": 1.0 / s, "reward/mean": 0.0}
            for s in range(1, 6)
        ],
        {"step": 5, "eval/success_rate": 0.5, "eval/teacher_kl": 0.4},
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "config.json").write_text(json.dumps({"model_name": "smollm2-135m-instruct"}))
    for step in range(1, 6):
        write_jsonl(
            folder / "rollouts" / f"step_{step:04d}.jsonl",
            [trajectory(smollm2_tokenizer, step, g) for g in range(3)],
        )
    invalid = Trajectory(failure="sandbox: <dead>", stop_reason=StopReason.ENV_FAILURE)
    write_jsonl(folder / "rollouts" / "eval_0005.jsonl", [invalid])
    return folder


class Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.spans: list[dict[str, str | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "span":
            self.spans.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def test_reports_are_written_and_the_viewer_escapes_everything(run, smollm2_tokenizer):
    paths = reports.write_reports(run)
    png = paths["plot"].read_bytes()
    assert paths["plot"] == run / "report.png" and png.startswith(b"\x89PNG") and len(png) > 5000
    page = paths["rollouts"].read_text()
    assert paths["rollouts"] == run / "rollouts.html"
    # Nothing the episodes contain becomes markup: only our own tags appear.
    parsed = Collector()
    parsed.feed(page)
    assert set(parsed.tags) <= {
        "html",
        "head",
        "meta",
        "title",
        "style",
        "body",
        "h1",
        "h2",
        "p",
        "span",
        "div",
        "details",
        "summary",
        "b",
    }
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;" in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&lt;task&amp;name&gt;" in page and "sandbox: &lt;dead&gt;" in page
    # The files shown: first, middle, last step and the last eval.
    assert re.findall(r"<h2>(\S+)", page) == [
        "step_0001.jsonl",
        "step_0003.jsonl",
        "step_0005.jsonl",
        "eval_0005.jsonl",
    ]
    # Student tokens carry their KL on hover and a colour; env tokens are marked as such.
    student = [s for s in parsed.spans if s.get("class") == "student" and s.get("title")]
    env = [s for s in parsed.spans if s.get("class") == "env" and s.get("title")]
    sampled = len(smollm2_tokenizer.encode(EVIL))
    assert len(student) == 3 * 3 * sampled  # 3 files x 3 episodes (one per group)
    assert env and all("env token" in (s["title"] or "") for s in env)
    first = student[0]["title"]
    assert "sampling logprob -0.500" in first and "teacher logprob -0.100" in first
    assert "KL estimate -0.400" in first  # -0.5 - (-0.1)
    assert "rgba(40,90,220" in student[0]["style"]  # teacher liked it more: blue
    last = student[sampled - 1]
    assert f"KL estimate {-0.5 + 0.1 * sampled:+.3f}" in last["title"]
    # Tool calls and results are shown (escaped) under each episode.
    text = "".join(parsed.text)
    assert "bash(" in text and '"command": "echo \'<b>\' && ls"' in text
    assert "mean KL" in text


def test_plot_has_both_panels_and_survives_an_empty_run(run, tmp_path):
    out = reports.plot_report(run, tmp_path / "plot.png")
    import matplotlib.image

    height, width = matplotlib.image.imread(out).shape[:2]
    assert width == 800 and height == 640  # two panels of 3.2 inches at 100 dpi
    empty = tmp_path / "empty"
    empty.mkdir()
    assert reports.plot_report(empty).read_bytes().startswith(b"\x89PNG")
    page = reports.write_rollout_viewer(empty).read_text()
    assert "No rollouts were written" in page


def test_kl_colour_saturates_and_signs():
    assert reports.kl_colour(10.0) == reports.kl_colour(reports.KL_SCALE)
    assert reports.kl_colour(0.5).startswith("rgba(220,40,40")
    assert reports.kl_colour(-0.5).startswith("rgba(40,90,220")


def test_the_command_line_writes_both_files(run, capsys, tmp_path):
    assert reports.main([str(run)]) == 0
    assert "report.png" in capsys.readouterr().out
    assert reports.main([str(tmp_path / "nothing")]) == 2
    assert "not a run folder" in capsys.readouterr().err
