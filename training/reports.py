"""Run reports: a PNG of the run's curves and an HTML viewer of sampled episodes.

    python -m training.reports LOG_PATH [--episodes N]

writes into the run's folder:

- ``report.png``: the teacher KL per step (and per teacher, ``teacher_kl/<name>``, when several
  teachers scored), the validation KL where there is one, and, on a second panel, eval success /
  exact-match accuracy and the mean training reward where the run has them;
- ``rollouts.html``: a self-contained page (inline CSS, no scripts, no network) with episodes
  sampled from ``rollouts/step_*.jsonl`` (the first, middle and last step) and the last
  ``rollouts/eval_*.jsonl``: every token of each sequence, environment tokens greyed, student
  tokens coloured by their per-token KL estimate ``sampling logprob - teacher logprob`` (red:
  the teacher liked the token less than the student; blue: more) with the numbers on hover,
  and below them each turn's parsed message, tool calls and tool results. All text is escaped.

Every recipe calls ``write_reports`` at the end of a run. Matplotlib runs with the Agg backend
(no display needed).
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tool_use.trajectory import TokenSequence, Trajectory, read_jsonl
from training.metrics import CONFIG_FILE, ROLLOUTS_DIR, read_metrics

REPORT_PNG = "report.png"
ROLLOUTS_HTML = "rollouts.html"
KL_SCALE = 3.0
"""Per-token KL (nats) at which the colour saturates."""


# ---- the plot ------------------------------------------------------------------------------------


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            steps.append(int(record.get("step", 0)))
            values.append(float(value))
    return steps, values


def plot_report(log_path: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.png`` (or ``out``) from the run's ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log_path = Path(log_path)
    out = Path(out) if out is not None else log_path / REPORT_PNG
    metrics_file = log_path / "metrics.jsonl"
    records = read_metrics(log_path) if metrics_file.is_file() else []
    keys = sorted({k for r in records for k in r})
    kl_keys = ["teacher_kl", *[k for k in keys if k.startswith("teacher_kl/")], "eval/teacher_kl"]
    outcome_keys = [
        "eval/success_rate",
        "eval/exact_match",
        *[k for k in keys if k.startswith("eval/pass@")],
        "reward/mean",
    ]
    kl = [(k, *_series(records, k)) for k in kl_keys]
    kl = [s for s in kl if s[1]]
    outcome = [(k, *_series(records, k)) for k in outcome_keys]
    outcome = [s for s in outcome if s[1] and not (s[0] == "reward/mean" and not any(s[2]))]
    panels = [p for p in (kl, outcome) if p] or [[]]
    figure, axes = plt.subplots(
        len(panels), 1, figsize=(8, 3.2 * len(panels)), squeeze=False, sharex=True
    )
    for ax, panel, title, ylabel in zip(
        axes[:, 0],
        panels,
        ("Teacher KL per student token", "Outcomes"),
        ("nats / token", "rate"),
        strict=False,
    ):
        if not panel:
            ax.text(0.5, 0.5, "no metrics recorded yet", ha="center", va="center")
            ax.set_axis_off()
            continue
        for key, steps, values in panel:
            marker = "o" if len(steps) < 30 or key.startswith("eval/") else None
            ax.plot(steps, values, label=key, marker=marker, markersize=3)
        ax.set_title(title if panel is not outcome else "Eval and reward")
        ax.set_ylabel(ylabel)
        if panel is outcome:
            ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("step")
    figure.suptitle(log_path.name)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def plot_task_success(
    rows: Sequence[dict[str, Any]], out: str | Path, *, title: str = "Success per task"
) -> Path:
    """A bar per task (``success_rate``, and the largest ``pass@k`` as a marker) for evaluation
    runs; ``rows`` as ``recipes.harbor_rl.eval`` writes them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    names = [str(r["task"]) for r in rows]
    success = [r.get("success_rate") or 0.0 for r in rows]
    passes = sorted(
        (k for k in (rows[0] if rows else {}) if k.startswith("pass@")),
        key=lambda k: int(k.split("@")[1]),
    )
    figure, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(rows) + 2), 4))
    ax.bar(range(len(rows)), success, label="success rate", color="#4a7bd0")
    if passes:
        key = passes[-1]
        values = [r.get(key) for r in rows]
        xs = [i for i, v in enumerate(values) if v is not None]
        ax.scatter(xs, [values[i] for i in xs], color="#d04a4a", zorder=3, label=key)
    ax.set_xticks(range(len(rows)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


# ---- the rollout viewer ------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 2em; border-bottom: 1px solid #ccc; }
.episode { border: 1px solid #ddd; border-radius: 6px; padding: .6em .9em; margin: 1em 0; }
.meta { color: #555; font-size: 12px; margin-bottom: .5em; }
.meta b { color: #222; }
.tokens { font: 12px/1.7 ui-monospace, monospace; white-space: pre-wrap; word-break: break-all;
  background: #fafafa; padding: .5em; border-radius: 4px; }
.tokens span { border-radius: 2px; }
.env { color: #999; }
.student { color: #000; outline: 1px solid rgba(0,0,0,.06); }
.turn { margin: .4em 0; font-size: 13px; }
.call { font-family: ui-monospace, monospace; background: #eef4ff; padding: 0 .3em; }
.result { font-family: ui-monospace, monospace; white-space: pre-wrap; background: #f3f3f3;
  margin: .2em 0 .2em 1em; padding: .2em .4em; max-height: 12em; overflow: auto; }
.failure { color: #b00; }
.legend span { padding: 0 .4em; margin-right: .3em; font-family: ui-monospace, monospace; }
"""


def kl_colour(kl: float) -> str:
    """Red for tokens the teacher liked less than the student (kl > 0), blue for more."""
    strength = min(abs(kl) / KL_SCALE, 1.0)
    alpha = round(0.08 + 0.62 * strength, 3)
    return f"rgba(220,40,40,{alpha})" if kl > 0 else f"rgba(40,90,220,{alpha})"


def _token_texts(tokens: Sequence[int], tokenizer: Any) -> list[str]:
    if tokenizer is None:
        return [f"[{t}]" for t in tokens]
    return [tokenizer.decode([t]) for t in tokens]


def _sequence_html(sequence: TokenSequence, tokenizer: Any) -> str:
    texts = _token_texts(sequence.tokens, tokenizer)
    teacher = sequence.teacher_logprobs if len(sequence.teacher_logprobs) == len(sequence) else []
    parts = []
    for t, (token, text) in enumerate(zip(sequence.tokens, texts, strict=True)):
        shown = html.escape(text)
        if not sequence.mask[t]:
            parts.append(f'<span class="env" title="env token {token}">{shown}</span>')
            continue
        sampling = sequence.sampling_logprobs[t]
        title = f"student token {token}&#10;sampling logprob {sampling:.3f}"
        style = ""
        if teacher:
            kl = sampling - teacher[t]
            title += f"&#10;teacher logprob {teacher[t]:.3f}&#10;KL estimate {kl:+.3f}"
            style = f' style="background:{kl_colour(kl)}"'
        parts.append(f'<span class="student"{style} title="{title}">{shown}</span>')
    return f'<div class="tokens">{"".join(parts)}</div>'


def _turns_html(trajectory: Trajectory) -> str:
    rows = []
    for index, turn in enumerate(trajectory.turns, 1):
        message = turn.message
        bits = [f"<b>turn {index}</b>"]
        if message is not None:
            if message.content.strip():
                text = message.content.strip()
                bits.append(html.escape(text[:300] + ("…" if len(text) > 300 else "")))
            for call in message.tool_calls:
                bits.append(
                    f'<span class="call">{html.escape(call.name)}({html.escape(call.arguments)})'
                    "</span>"
                )
        results = "".join(
            f'<div class="result">{html.escape(m.role)}: {html.escape(m.content[:2000])}</div>'
            for m in turn.env_messages
        )
        rows.append(f'<div class="turn">{" ".join(bits)}{results}</div>')
    return "".join(rows)


def _episode_html(trajectory: Trajectory, tokenizer: Any) -> str:
    meta = trajectory.metadata
    facts = [
        ("step", meta.get("step")),
        ("task", meta.get("task")),
        ("row", meta.get("row")),
        ("teacher", meta.get("teacher")),
        ("group", meta.get("group")),
        ("reward", f"{trajectory.reward:g}"),
        ("advantage", _fmt(meta.get("advantage"))),
        ("stop", trajectory.stop_reason),
        ("student tokens", trajectory.num_sampled_tokens),
    ]
    kls = [
        s.sampling_logprobs[t] - s.teacher_logprobs[t]
        for s in trajectory.sequences
        if len(s.teacher_logprobs) == len(s)
        for t in range(len(s))
        if s.mask[t]
    ]
    if kls:
        facts.append(("mean KL", f"{sum(kls) / len(kls):.3f}"))
    head = " · ".join(
        f"{html.escape(k)} <b>{html.escape(str(v))}</b>" for k, v in facts if v is not None
    )
    failure = (
        f'<div class="failure">invalid: {html.escape(trajectory.failure)}</div>'
        if trajectory.failure
        else ""
    )
    sequences = "".join(_sequence_html(s, tokenizer) for s in trajectory.sequences)
    return (
        f'<div class="episode"><div class="meta">{head}</div>{failure}{sequences}'
        f"<details><summary>turns, tool calls and results</summary>{_turns_html(trajectory)}"
        "</details></div>"
    )


def _fmt(value: Any) -> str | None:
    return f"{value:+.3f}" if isinstance(value, int | float) else None


def _pick(trajectories: list[Trajectory], count: int) -> list[Trajectory]:
    """Up to ``count`` episodes, one per group first (valid ones before invalid)."""
    ordered = sorted(trajectories, key=lambda t: not t.valid)
    picked, groups = [], set()
    for trajectory in ordered:
        group = trajectory.metadata.get("group")
        if group not in groups:
            groups.add(group)
            picked.append(trajectory)
    picked += [t for t in ordered if t not in picked]
    return picked[:count]


def rollout_files(log_path: str | Path) -> list[Path]:
    """The step files the viewer shows (first, middle, last) and the last eval file."""
    folder = Path(log_path) / ROLLOUTS_DIR
    steps = sorted(folder.glob("step_*.jsonl"))
    evals = sorted(folder.glob("eval_*.jsonl"))
    chosen = [steps[i] for i in sorted({0, len(steps) // 2, len(steps) - 1})] if steps else []
    return chosen + evals[-1:]


def write_rollout_viewer(
    log_path: str | Path,
    out: str | Path | None = None,
    *,
    tokenizer: Any = None,
    episodes: int = 4,
) -> Path:
    """Write ``rollouts.html`` (or ``out``) from the run's rollout files; ``tokenizer`` decodes
    tokens (None: ids are shown)."""
    log_path = Path(log_path)
    out = Path(out) if out is not None else log_path / ROLLOUTS_HTML
    sections = []
    for path in rollout_files(log_path):
        trajectories = list(read_jsonl(path))
        shown = _pick(trajectories, episodes)
        body = "".join(_episode_html(t, tokenizer) for t in shown)
        sections.append(
            f"<h2>{html.escape(path.name)} — {len(shown)} of {len(trajectories)} episodes</h2>"
            + body
        )
    if not sections:
        sections.append("<p>No rollouts were written (save_rollouts=false, or no steps).</p>")
    legend = (
        '<p class="legend"><span class="env">env token</span>'
        f'<span class="student" style="background:{kl_colour(KL_SCALE)}">teacher liked it less'
        f'</span><span class="student" style="background:{kl_colour(-KL_SCALE)}">teacher liked it '
        "more</span> hover a token for its logprobs</p>"
    )
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(log_path.name)} rollouts</title><style>{_CSS}</style></head><body>"
        f"<h1>Rollouts of {html.escape(str(log_path))}</h1>{legend}{''.join(sections)}"
        "</body></html>\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


# ---- both ----------------------------------------------------------------------------------------


def load_run_tokenizer(log_path: str | Path) -> Any:
    """The student's tokenizer, from the run's ``config.json`` (``model_name``); None when the
    run has no such key or it cannot be loaded."""
    from training import models
    from training.errors import ModelLoadError

    config_file = Path(log_path) / CONFIG_FILE
    if not config_file.is_file():
        return None
    name = json.loads(config_file.read_text()).get("model_name")
    if not name:
        return None
    try:
        return models.load_tokenizer(name)
    except ModelLoadError:
        return None


def write_reports(
    log_path: str | Path, *, tokenizer: Any = None, episodes: int = 4
) -> dict[str, Path]:
    """``report.png`` and ``rollouts.html`` in the run folder; the tokenizer defaults to the
    run's student's."""
    tokenizer = tokenizer if tokenizer is not None else load_run_tokenizer(log_path)
    return {
        "plot": plot_report(log_path),
        "rollouts": write_rollout_viewer(log_path, tokenizer=tokenizer, episodes=episodes),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.reports",
        description="Write report.png and rollouts.html into a run's folder.",
    )
    parser.add_argument("log_path", type=Path, help="the run's folder (log_path)")
    parser.add_argument("--episodes", type=int, default=4, help="episodes shown per file")
    args = parser.parse_args(argv)
    if (
        not (args.log_path / "metrics.jsonl").is_file()
        and not (args.log_path / ROLLOUTS_DIR).is_dir()
    ):
        print(
            f"error: {args.log_path} is not a run folder (no metrics.jsonl or rollouts/)",
            file=sys.stderr,
        )
        return 2
    for kind, path in write_reports(args.log_path, episodes=args.episodes).items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
