"""Messages + tool specs <-> tokens, per chat-template family; ``get_renderer`` picks one.

Families: ``chatml`` (SmolLM2 and other ChatML models, Hermes tool calls), ``qwen2.5``,
``qwen3`` (thinking), ``llama3`` (JSON tool calls) and ``template`` (any model, driven by the
tokenizer's own chat template, checked turn by turn). See docs/tokens.md.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from tool_use.renderers.base import Renderer, RendererError, to_hf
from tool_use.renderers.hermes import HermesRenderer, Qwen3Renderer, Qwen25Renderer
from tool_use.renderers.llama3 import Llama3Renderer
from tool_use.renderers.template import TemplateRenderer
from tool_use.types import Message, ToolCall

__all__ = [
    "RENDERERS",
    "HermesRenderer",
    "Llama3Renderer",
    "Qwen3Renderer",
    "Qwen25Renderer",
    "Renderer",
    "RendererError",
    "TemplateRenderer",
    "detect_family",
    "get_renderer",
]

log = logging.getLogger(__name__)

RENDERERS: dict[str, Callable[[Any], Renderer]] = {
    "chatml": HermesRenderer,
    "qwen2.5": Qwen25Renderer,
    "qwen3": Qwen3Renderer,
    "llama3": Llama3Renderer,
    "template": TemplateRenderer,
}
"""Renderer names accepted by ``get_renderer`` (``chatml`` and ``qwen2.5`` share one layout;
each reads its default system prompt from the tokenizer's template)."""


def detect_family(chat_template: str | None) -> str:
    """The renderer name for a chat template, from the markers it contains."""
    if not chat_template:
        return "chatml"
    if "<|start_header_id|>" in chat_template:
        return "llama3"
    if "<|im_start|>" in chat_template:
        if "<think>" in chat_template and "<tool_call>" in chat_template:
            return "qwen3"
        if "<tool_call>" in chat_template:
            return "qwen2.5"
        return "chatml"
    return "template"


def get_renderer(name: str | None, tokenizer: Any) -> Renderer:
    """The renderer called ``name``, or (``None``) the one matching the tokenizer's chat template.

    An automatic pick is checked against ``tokenizer.apply_chat_template`` on a short
    conversation with a tool call; when the family renderer disagrees (a variant template), the
    generic ``template`` renderer is used instead and a warning says so.
    """
    if name is not None:
        if name not in RENDERERS:
            raise RendererError(
                f"unknown renderer {name!r}; expected one of {', '.join(sorted(RENDERERS))}"
            )
        return RENDERERS[name](tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    family = detect_family(template)
    renderer = RENDERERS[family](tokenizer)
    if family == "template" or not template or _agrees_with_template(renderer, tokenizer):
        return renderer
    log.warning(
        "renderer %r does not reproduce the chat template of %r token for token; using the "
        "generic 'template' renderer (slower: it re-renders the history as text every turn)",
        family,
        getattr(tokenizer, "name_or_path", "?"),
    )
    return TemplateRenderer(tokenizer)


_PROBE_TOOL = {
    "name": "read_file",
    "description": "Read a file.",
    "parameters": {
        "type": "object",
        "properties": {"path": {"type": "string"}},
        "required": ["path"],
    },
}


def _agrees_with_template(renderer: Renderer, tokenizer: Any) -> bool:
    """Whether ``renderer`` renders a probe conversation exactly like the tokenizer's template.
    Tools are only probed when the template renders them (SmolLM2's does not)."""
    call = ToolCall(id="call_0", name="read_file", arguments=json.dumps({"path": "a.txt"}))
    with_tools = "tools" in tokenizer.chat_template
    messages = [
        Message(role="system", content="You are a careful agent."),
        Message(role="user", content="Show me a.txt"),
    ]
    if with_tools:
        messages += [
            Message(role="assistant", content="", tool_calls=[call]),
            Message(role="tool", content="hello", tool_call_id="call_0"),
        ]
    messages += [
        Message(role="assistant", content="It says hello."),
        Message(role="user", content="Thanks"),
    ]
    tools = [_PROBE_TOOL] if with_tools else []
    expected = tokenizer.apply_chat_template(
        to_hf(messages),
        tools=[{"type": "function", "function": t} for t in tools] or None,
        tokenize=False,
        add_generation_prompt=True,
    )
    try:
        return renderer.render_prompt(messages, tools) == renderer.encode(expected)
    except RendererError:
        return False
