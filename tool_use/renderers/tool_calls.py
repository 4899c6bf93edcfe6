"""Tool-call syntaxes models are trained on: writing them and reading them back from samples.

- ``hermes``: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` (SmolLM2 with our
  ChatML prompt, Qwen2.5, Qwen3, Hermes models);
- ``json``: a bare ``{"name": ..., "parameters": {...}}`` object, optionally after
  ``<|python_tag|>`` (Llama 3.1+ custom tools).

Readers never raise: a call they cannot read is reported as a message the model can act on.
``ToolCall.arguments`` keeps the argument JSON exactly as sampled; validating it is the tool
executor's job.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from tool_use.types import ToolCall

_DECODER = json.JSONDecoder()


@dataclass
class ToolCallReading:
    """What a reader found in the text of one assistant turn."""

    content: str
    """The text before the first tool call."""
    calls: list[ToolCall] = field(default_factory=list)
    error: str | None = None


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:16]}"


def _read_call(body: str, *, arguments_keys: tuple[str, ...], example: str) -> ToolCall | str:
    """One call from its JSON text, or a readable error."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as exc:
        return f"the tool call is not valid JSON ({exc.msg} at character {exc.pos}); {example}"
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return f'the tool call must be a JSON object with a string "name"; {example}'
    key = next((k for k in arguments_keys if k in obj), None)
    if key is None:
        return ToolCall(id=new_call_id(), name=obj["name"], arguments="{}")
    return ToolCall(id=new_call_id(), name=obj["name"], arguments=_raw_value(body, key, obj[key]))


def _raw_value(body: str, key: str, value: object) -> str:
    """The value's text exactly as sampled (whitespace, key order and all)."""
    for match in re.finditer(rf'"{key}"\s*:\s*', body):
        try:
            parsed, end = _DECODER.raw_decode(body, match.end())
        except json.JSONDecodeError:
            continue
        if parsed == value:
            return body[match.end() : end]
    return json.dumps(value, ensure_ascii=False)


class HermesToolCalls:
    """``<tool_call>`` JSON ``</tool_call>`` blocks, any number per turn."""

    open, close = "<tool_call>", "</tool_call>"
    prefix = '<tool_call>\n{"name": "'
    example = (
        'write each call as <tool_call>\n{"name": <tool-name>, "arguments": <JSON object>}\n'
        "</tool_call>"
    )

    def render(self, name: str, arguments: str) -> str:
        return f'{self.open}\n{{"name": "{name}", "arguments": {arguments}}}\n{self.close}'

    def read(self, text: str) -> ToolCallReading:
        first = text.find(self.open)
        if first < 0:
            return ToolCallReading(content=text)
        reading = ToolCallReading(content=text[:first].removesuffix("\n"))
        errors = []
        pos = first
        while (start := text.find(self.open, pos)) >= 0:
            end = text.find(self.close, start)
            if end < 0:
                errors.append(f"a {self.open} is not closed with {self.close}")
                break
            body = text[start + len(self.open) : end].strip()
            call = _read_call(
                body, arguments_keys=("arguments", "parameters"), example=self.example
            )
            if isinstance(call, str):
                errors.append(call)
            else:
                reading.calls.append(call)
            pos = end + len(self.close)
        if errors:
            reading.error = "; ".join(errors)
        return reading


class JsonToolCalls:
    """One bare JSON object per turn (Llama 3.x custom tools); ``<|python_tag|>`` may lead."""

    python_tag = "<|python_tag|>"
    prefix = '{"name": "'
    example = 'answer with only {"name": <tool-name>, "parameters": <JSON object>}'

    def render(self, name: str, arguments: str) -> str:
        return f'{{"name": "{name}", "parameters": {arguments}}}'

    def read(self, text: str) -> ToolCallReading:
        tagged = text.lstrip().startswith(self.python_tag)
        body = text.lstrip().removeprefix(self.python_tag).strip()
        if not body.startswith("{"):
            if tagged:
                return ToolCallReading(
                    content=text, error=f"after {self.python_tag}, {self.example}"
                )
            return ToolCallReading(content=text)
        try:
            obj, end = _DECODER.raw_decode(body)
        except json.JSONDecodeError as exc:
            if tagged or re.match(r'\{\s*"name"\s*:', body):
                return ToolCallReading(
                    content=text,
                    error=f"the tool call is not valid JSON ({exc.msg} at character {exc.pos}); "
                    f"{self.example}",
                )
            return ToolCallReading(content=text)
        looks_like_call = isinstance(obj, dict) and ("name" in obj or "parameters" in obj)
        if not looks_like_call:
            return ToolCallReading(content=text)
        if body[end:].strip():
            return ToolCallReading(
                content=text, error=f"one tool call per turn and nothing after it; {self.example}"
            )
        call = _read_call(
            body[:end], arguments_keys=("parameters", "arguments"), example=self.example
        )
        if isinstance(call, str):
            return ToolCallReading(content=text, error=call)
        return ToolCallReading(content="", calls=[call])


def split_thinking(text: str) -> tuple[str | None, str]:
    """``(reasoning, rest)`` for ``<think>...</think>`` output (Qwen3); ``(None, text)`` without
    a think block. An unclosed block (truncated turn) is all reasoning."""
    if "</think>" in text:
        head, _, _ = text.partition("</think>")
        reasoning = head.split("<think>")[-1].strip("\n")
        return reasoning, text.split("</think>")[-1].lstrip("\n")
    if text.lstrip().startswith("<think>"):
        return text.lstrip().removeprefix("<think>").strip("\n"), ""
    return None, text
