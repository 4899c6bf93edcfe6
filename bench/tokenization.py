"""Per-turn cost of turning an agent conversation into tokens: incremental vs whole-history.

A synthetic shell-agent episode (a bash tool call per turn, ~430-token tool outputs) on the
embedded SmolLM2 tokenizer with the ``chatml`` renderer. At turn n we time:

- ``ours``: what ``MessageTokenEnv`` does per turn: parse the sampled turn and render +
  tokenise only the new env messages and the next assistant header;
- ``full_template``: re-tokenising the whole history with ``tokenizer.apply_chat_template``
  (SmolLM2's own template; it ignores tools, so this baseline is slightly flattering);
- ``full_retokenise``: rendering the same text as ours for the whole history and tokenising it.

``share_of_step`` puts ``ours`` for every episode of a step against the step time: DESIGN.md's
~7 s for a batch of 4 episodes generating one 64-token turn each. Usage::

    python -m bench.tokenization [quick]

Progress goes to stderr; the last line printed is one JSON object.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.common import context, run_main
from tool_use.renderers import get_renderer
from tool_use.renderers.base import to_hf
from tool_use.types import Message, ToolCall

STEP_MS = 7000.0
"""One training step (DESIGN.md: SmolLM2, LoRA, batch 4, 64 new tokens, this CPU)."""
EPISODES_PER_STEP = 4

BASH = {
    "name": "bash",
    "description": "Run a shell command and return its output.",
    "parameters": {
        "type": "object",
        "properties": {"command": {"type": "string", "description": "The command to run."}},
        "required": ["command"],
    },
}


def _turn(index: int) -> tuple[Message, list[Message]]:
    command = f"ls -l /app/src/module_{index} && wc -l /app/src/module_{index}/*.py"
    arguments = json.dumps({"command": command})
    call = ToolCall(id=f"call_{index}", name="bash", arguments=arguments)
    assistant = Message(role="assistant", content=f"Step {index}: inspecting.", tool_calls=[call])
    lines = [
        f"-rw-r--r-- 1 root root {1000 + 37 * k} Jan {1 + k % 28} 12:{k:02d} file_{index}_{k}.py"
        for k in range(12)
    ]
    output = Message(role="tool", content="\n".join(lines), tool_call_id=f"call_{index}")
    return assistant, [output]


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main(quick: bool = False) -> dict[str, Any]:
    from training.models import EMBEDDED_MODEL, load_tokenizer

    result = context("tokenization", quick)
    turn_counts = [1, 2, 4, 8, 16, 32] if quick else [1, 2, 4, 8, 16, 32, 64, 128]
    repeats = 5 if quick else 9
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    renderer = get_renderer("chatml", tokenizer)
    tools = [BASH]
    history = [
        Message(role="system", content="You are a shell agent working in /app."),
        Message(role="user", content="Find the module with the most Python lines."),
    ]
    rows = []
    for n in range(1, max(turn_counts) + 1):
        assistant, answers = _turn(n)
        before = renderer.prompt_text(history, tools)
        with_turn = renderer.prompt_text([*history, assistant], tools)
        end = with_turn.index("<|im_end|>", len(before)) + len("<|im_end|>")
        sampled = renderer.encode(with_turn[len(before) : end])
        answered = [*history, assistant]
        history = [*answered, *answers]
        if n not in turn_counts:
            continue

        def ours(answered=answered, answers=answers, sampled=sampled) -> list[int]:
            renderer.parse(sampled)
            return renderer.render_continuation(answered, answers, tools)

        def full_template(history=history) -> list[int]:
            return tokenizer.apply_chat_template(to_hf(history), add_generation_prompt=True)[
                "input_ids"
            ]

        def full_retokenise(history=history) -> list[int]:
            return renderer.encode(renderer.prompt_text(history, tools))

        row = {
            "turns": n,
            "context_tokens": len(full_retokenise()),
            "new_tokens": len(ours()),
            "ours_ms": round(_median_ms(ours, repeats), 3),
            "full_template_ms": round(_median_ms(full_template, repeats), 3),
            "full_retokenise_ms": round(_median_ms(full_retokenise, repeats), 3),
        }
        row["share_of_step"] = round(EPISODES_PER_STEP * row["ours_ms"] / STEP_MS, 6)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    last = rows[-1]
    return result | {
        "tokenizer": EMBEDDED_MODEL,
        "renderer": renderer.name,
        "step_ms": STEP_MS,
        "episodes_per_step": EPISODES_PER_STEP,
        "rows": rows,
        "ours_ms_first_last": [rows[0]["ours_ms"], last["ours_ms"]],
        "speedup_at_last": round(last["full_template_ms"] / last["ours_ms"], 1),
        "max_share_of_step": max(r["share_of_step"] for r in rows),
        "target_met": max(r["share_of_step"] for r in rows) < 0.02,
    }


if __name__ == "__main__":
    run_main(main)
