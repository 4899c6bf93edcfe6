"""ChatML with Hermes-style tools: SmolLM2 (``chatml``), Qwen2.5 (``qwen2.5``), Qwen3 (``qwen3``).

The layout is Qwen2.5's, token for token: tool specs as JSON lines inside ``<tools>`` in the
system turn, calls as ``<tool_call>`` JSON blocks, consecutive tool results grouped in one user
turn as ``<tool_response>`` blocks. SmolLM2's own template has no tool support, so ``chatml``
uses this layout with SmolLM2's default system prompt (read from its template).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import jinja2

from tool_use.renderers.base import Renderer, canonical_json, function_spec
from tool_use.renderers.tool_calls import HermesToolCalls, split_thinking
from tool_use.types import Message, ParsedResponse, ToolSpec

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

_TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def probe_default_system(tokenizer: Any) -> str | None:
    """The system prompt a ChatML template inserts when the conversation has none."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "probe"}], tokenize=False, add_generation_prompt=False
        )
    except (jinja2.TemplateError, ValueError, TypeError):
        return None
    head = f"{IM_START}system\n"
    if not text.startswith(head) or IM_END not in text:
        return None
    return text[len(head) : text.index(IM_END)]


class HermesRenderer(Renderer):
    """ChatML turns, Hermes tool calls; the Qwen2.5 layout."""

    name = "chatml"
    calls = HermesToolCalls()

    def __init__(self, tokenizer: Any, default_system: str | None = None, *, probe: bool = True):
        super().__init__(tokenizer)
        self.default_system = default_system
        if default_system is None and probe:
            self.default_system = probe_default_system(tokenizer)
        self.im_end = self.token_id(IM_END)
        stops = [[self.im_end]]
        eos = getattr(tokenizer, "eos_token_id", None)
        if isinstance(eos, int) and eos != self.im_end:
            stops.append([eos])
        self._stops = stops
        self._prefix = self.encode(self.calls.prefix)

    def options(self) -> dict[str, Any]:
        return {"default_system": self.default_system}

    @property
    def stop_sequences(self) -> list[list[int]]:
        return [list(s) for s in self._stops]

    @property
    def tool_call_prefix(self) -> list[int]:
        return list(self._prefix)

    # ---- text ----------------------------------------------------------------------------------

    def generation_header(self) -> str:
        return f"{IM_START}assistant\n"

    def system_text(self, messages: Sequence[Message], tools: Sequence[ToolSpec]) -> str:
        has_system = bool(messages) and messages[0].role == "system"
        system = messages[0].content if has_system else self.default_system
        if tools:
            lines = "".join("\n" + json.dumps(function_spec(t), ensure_ascii=False) for t in tools)
            head = f"{system}\n\n" if system is not None else ""
            return f"{IM_START}system\n{head}{_TOOLS_HEADER}{lines}{_TOOLS_FOOTER}{IM_END}\n"
        if system is None:
            return ""
        return f"{IM_START}system\n{system}{IM_END}\n"

    def arguments_text(self, arguments: str) -> str:
        """Qwen2.5 writes parsed arguments back with ``tojson``."""
        return canonical_json(arguments)

    def assistant_text(self, messages: Sequence[Message], index: int) -> str:
        message = messages[index]
        calls = "\n".join(
            self.calls.render(c.name, self.arguments_text(c.arguments)) for c in message.tool_calls
        )
        body = message.content + ("\n" if message.content and calls else "") + calls
        return f"{IM_START}assistant\n{body}{IM_END}\n"

    def messages_text(self, messages: Sequence[Message], start: int) -> str:
        """``messages[start:]``, looking at their neighbours for tool-result grouping."""
        parts = []
        for i in range(start, len(messages)):
            message = messages[i]
            if message.role == "assistant":
                parts.append(self.assistant_text(messages, i))
            elif message.role == "tool":
                if i == 0 or messages[i - 1].role != "tool":
                    parts.append(f"{IM_START}user")
                parts.append(f"\n<tool_response>\n{message.content}\n</tool_response>")
                if i == len(messages) - 1 or messages[i + 1].role != "tool":
                    parts.append(f"{IM_END}\n")
            else:
                parts.append(f"{IM_START}{message.role}\n{message.content}{IM_END}\n")
        return "".join(parts)

    def prompt_text(self, messages: Sequence[Message], tools: Sequence[ToolSpec] = ()) -> str:
        start = 1 if messages and messages[0].role == "system" else 0
        return (
            self.system_text(messages, tools)
            + self.messages_text(messages, start)
            + self.generation_header()
        )

    def continuation_text(self, history: Sequence[Message], new_messages: Sequence[Message]) -> str:
        # The sampled turn ended at <|im_end|>; the template's newline after it comes first.
        everything = [*history, *new_messages]
        return "\n" + self.messages_text(everything, len(history)) + self.generation_header()

    # ---- the Renderer contract -----------------------------------------------------------------

    def render_prompt(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec] = ()
    ) -> list[int]:
        return self.encode(self.prompt_text(messages, tools))

    def render_continuation(
        self,
        history: Sequence[Message],
        new_messages: Sequence[Message],
        tools: Sequence[ToolSpec] = (),
    ) -> list[int]:
        return self.encode(self.continuation_text(history, new_messages))

    def parse(self, tokens: Sequence[int]) -> ParsedResponse:
        body, _ = self.strip_stop(tokens)
        reading = self.calls.read(self.decode(body))
        message = Message(role="assistant", content=reading.content, tool_calls=reading.calls)
        return ParsedResponse(message=message, parse_error=reading.error)


class Qwen25Renderer(HermesRenderer):
    """Qwen2.5: the same layout; its default system prompt comes from its template."""

    name = "qwen2.5"


class Qwen3Renderer(HermesRenderer):
    """Qwen3: no default system prompt, ``<think>`` reasoning, and the template's rule that the
    reasoning of assistant turns before the latest user query is dropped (a history rewrite)."""

    name = "qwen3"

    def __init__(self, tokenizer: Any, *, enable_thinking: bool = True):
        super().__init__(tokenizer, probe=False)
        self.enable_thinking = enable_thinking
        self._prefix = self.encode(self._forced_prefix_text())

    def options(self) -> dict[str, Any]:
        return {"enable_thinking": self.enable_thinking}

    def _forced_prefix_text(self) -> str:
        # With thinking on, a forced call starts with an empty think block: the shape Qwen3 was
        # trained on for turns without reasoning. With thinking off, the header already has it.
        return ("<think>\n\n</think>\n\n" if self.enable_thinking else "") + self.calls.prefix

    def generation_header(self) -> str:
        header = f"{IM_START}assistant\n"
        return header if self.enable_thinking else header + "<think>\n\n</think>\n\n"

    def arguments_text(self, arguments: str) -> str:
        """Qwen3 writes string arguments as they are."""
        return arguments

    @staticmethod
    def is_query(message: Message) -> bool:
        content = message.content
        return message.role == "user" and not (
            content.startswith("<tool_response>") and content.endswith("</tool_response>")
        )

    def last_query_index(self, messages: Sequence[Message]) -> int:
        for i in range(len(messages) - 1, -1, -1):
            if self.is_query(messages[i]):
                return i
        return len(messages) - 1

    def assistant_text(self, messages: Sequence[Message], index: int) -> str:
        message = messages[index]
        content, reasoning = message.content, message.reasoning
        if reasoning is None:
            reasoning = ""
            if "</think>" in content:
                reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1]
                reasoning = reasoning.lstrip("\n")
                content = content.split("</think>")[-1].lstrip("\n")
        is_last = index == len(messages) - 1
        if index > self.last_query_index(messages) and (is_last or reasoning):
            thinking = reasoning.strip("\n")
            body = f"<think>\n{thinking}\n</think>\n\n" + content.lstrip("\n")
        else:
            body = content
        calls = "\n".join(
            self.calls.render(c.name, self.arguments_text(c.arguments)) for c in message.tool_calls
        )
        # The template separates calls from the content it split off, before any lstrip.
        separator = "\n" if content and calls else ""
        return f"{IM_START}assistant\n{body}{separator}{calls}{IM_END}\n"

    def rewrites_history(
        self,
        history: Sequence[Message],
        new_messages: Sequence[Message],
        tools: Sequence[ToolSpec] = (),
    ) -> bool:
        if not any(self.is_query(m) for m in new_messages):
            return False
        since_query = history[self.last_query_index(history) + 1 :]
        return any(
            m.role == "assistant" and (m.reasoning is not None or not self.enable_thinking)
            for m in since_query
        )

    def parse(self, tokens: Sequence[int]) -> ParsedResponse:
        body, _ = self.strip_stop(tokens)
        reasoning, rest = split_thinking(self.decode(body))
        reading = self.calls.read(rest)
        message = Message(
            role="assistant", content=reading.content, tool_calls=reading.calls, reasoning=reasoning
        )
        return ParsedResponse(message=message, parse_error=reading.error)
