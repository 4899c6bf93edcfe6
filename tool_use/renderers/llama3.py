"""Llama 3.1 / 3.2 / 3.3 with custom (JSON) tool calls.

Token for token the official template with its defaults: tools listed in the first user turn,
``Environment: ipython`` and the knowledge/today dates in the system turn, one
``{"name": ..., "parameters": ...}`` call per assistant turn, tool results in ``ipython`` turns
(the template JSON-encodes their text). Built-in tools (brave_search, wolfram_alpha) are not
supported.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from tool_use.renderers.base import Renderer, RendererError, canonical_json, function_spec
from tool_use.renderers.tool_calls import JsonToolCalls
from tool_use.types import Message, ParsedResponse, ToolSpec

EOT, EOM = "<|eot_id|>", "<|eom_id|>"

_TOOLS_INSTRUCTIONS = (
    "Given the following functions, please respond with a JSON for a function call with its "
    "proper arguments that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and '
    "its value}.Do not use variables.\n\n"
)


def _header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


class Llama3Renderer(Renderer):
    name = "llama3"
    calls = JsonToolCalls()

    def __init__(self, tokenizer: Any, *, date_string: str = "26 Jul 2024"):
        super().__init__(tokenizer)
        self.date_string = date_string
        self.eot = self.token_id(EOT)
        stops = [[self.eot]]
        if (eom := self.encode(EOM)) and len(eom) == 1:
            stops.append(eom)
        self._stops = stops
        self._prefix = self.encode(self.calls.prefix)

    def options(self) -> dict[str, Any]:
        return {"date_string": self.date_string}

    @property
    def stop_sequences(self) -> list[list[int]]:
        return [list(s) for s in self._stops]

    @property
    def tool_call_prefix(self) -> list[int]:
        return list(self._prefix)

    def messages_text(self, messages: Sequence[Message]) -> str:
        parts = []
        for message in messages:
            if message.role == "tool":
                content = json.dumps(message.content, ensure_ascii=False)
                parts.append(f"{_header('ipython')}{content}{EOT}")
            elif message.tool_calls:
                if len(message.tool_calls) != 1:
                    raise RendererError(
                        "renderer 'llama3' renders exactly one tool call per assistant message "
                        f"(the Llama 3 template's rule), got {len(message.tool_calls)}"
                    )
                call = message.tool_calls[0]
                text = self.calls.render(call.name, canonical_json(call.arguments))
                parts.append(f"{_header('assistant')}{text}{EOT}")
            else:
                parts.append(f"{_header(message.role)}{message.content.strip()}{EOT}")
        return "".join(parts)

    def prompt_text(self, messages: Sequence[Message], tools: Sequence[ToolSpec] = ()) -> str:
        messages = list(messages)
        system = ""
        if messages and messages[0].role == "system":
            system, messages = messages[0].content.strip(), messages[1:]
        bos = getattr(self.tokenizer, "bos_token", None) or ""
        env = "Environment: ipython\n" if tools else ""
        text = (
            f"{bos}{_header('system')}{env}Cutting Knowledge Date: December 2023\n"
            f"Today Date: {self.date_string}\n\n{system}{EOT}"
        )
        if tools:
            if not messages:
                raise RendererError(
                    "renderer 'llama3' lists tools in the first user message, but the "
                    "conversation has none"
                )
            specs = "".join(
                json.dumps(function_spec(t), indent=4, ensure_ascii=False) + "\n\n" for t in tools
            )
            first = messages.pop(0).content.strip()
            text += f"{_header('user')}{_TOOLS_INSTRUCTIONS}{specs}{first}{EOT}"
        return text + self.messages_text(messages) + _header("assistant")

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
        return self.encode(self.messages_text(new_messages) + _header("assistant"))

    def parse(self, tokens: Sequence[int]) -> ParsedResponse:
        body, _ = self.strip_stop(tokens)
        reading = self.calls.read(self.decode(body))
        message = Message(role="assistant", content=reading.content, tool_calls=reading.calls)
        return ParsedResponse(message=message, parse_error=reading.error)
