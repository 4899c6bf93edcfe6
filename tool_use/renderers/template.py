"""Any model, driven by the tokenizer's own chat template (``tokenizer.apply_chat_template``).

The fallback for families we have no renderer for. Each turn it renders the conversation
before and after the new env messages and checks that the template is prefix-consistent:

- ``P`` = the context the last turn was sampled from (history without the sampled turn, with
  the generation prompt);
- ``A`` = the history including the sampled turn, cut right after its end-of-turn token;
- ``E`` = the history plus the new messages, with the generation prompt.

When ``P`` is a prefix of ``A`` and ``A`` of ``E``, the new tokens are ``E[len(A):]``; otherwise
the template rewrote history and the caller starts a new sequence. Rendering is whole-history
text (jinja) each turn; only the new text is tokenised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jinja2

from tool_use.renderers.base import Renderer, RendererError, function_spec, to_hf
from tool_use.renderers.tool_calls import (
    HermesToolCalls,
    JsonToolCalls,
    ToolCallReading,
    split_thinking,
)
from tool_use.types import Message, ParsedResponse, ToolSpec

_PROBE_USER, _PROBE_ASSISTANT = "user probe 7c1f", "assistant probe 7c1f"


class TemplateRenderer(Renderer):
    name = "template"

    def __init__(self, tokenizer: Any):
        super().__init__(tokenizer)
        template = getattr(tokenizer, "chat_template", None)
        self._where = f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r}"
        if not isinstance(template, str) or not template:
            raise RendererError(
                f"{self._where} has no chat template; renderer='template' needs one"
            )
        self.template = template
        self.supports_tools = "tools" in template
        self.thinking = "<think>" in template
        if "<tool_call>" in template:
            self.calls: HermesToolCalls | JsonToolCalls | None = HermesToolCalls()
        elif "ipython" in template or '"parameters"' in template:
            self.calls = JsonToolCalls()
        else:
            self.calls = None
        self.end_of_turn = self._probe_end_of_turn()
        stops = [self.encode(self.end_of_turn)]
        eos = getattr(tokenizer, "eos_token_id", None)
        if isinstance(eos, int) and [eos] not in stops:
            stops.append([eos])
        self._stops = stops
        self._last_continuation: tuple[tuple[list, list, list], str | None] | None = None

    def _probe_end_of_turn(self) -> str:
        """The special token the template writes right after an assistant message."""
        text = self.apply(
            [
                Message(role="user", content=_PROBE_USER),
                Message(role="assistant", content=_PROBE_ASSISTANT),
            ],
            (),
            generation_prompt=False,
        )
        after = text[text.rfind(_PROBE_ASSISTANT) + len(_PROBE_ASSISTANT) :]
        specials = sorted(
            {str(t) for t in getattr(self.tokenizer, "all_special_tokens", [])}
            | {str(t) for t in getattr(self.tokenizer, "added_tokens_decoder", {}).values()},
            key=len,
            reverse=True,
        )
        for token in specials:
            if token and after.startswith(token):
                return token
        eos = getattr(self.tokenizer, "eos_token", None)
        if eos and after.startswith(eos):
            return eos
        raise RendererError(
            f"the chat template of {self._where} writes {after[:40]!r} after an assistant "
            "message, not a special end-of-turn token; renderer='template' cannot find where a "
            "turn ends"
        )

    @property
    def stop_sequences(self) -> list[list[int]]:
        return [list(s) for s in self._stops]

    @property
    def tool_call_prefix(self) -> list[int]:
        if self.calls is None:
            raise RendererError(
                f"the chat template of {self._where} has no tool-call syntax this renderer knows "
                "(<tool_call> or Llama JSON); tool_choice='required' needs one"
            )
        return self.encode(self.calls.prefix)

    def apply(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec], *, generation_prompt: bool
    ) -> str:
        if tools and not self.supports_tools:
            raise RendererError(
                f"the chat template of {self._where} does not render tools; pick a renderer that "
                "does (renderer='chatml' for ChatML models)"
            )
        try:
            return self.tokenizer.apply_chat_template(
                to_hf(messages),
                tools=[function_spec(t) for t in tools] or None,
                tokenize=False,
                add_generation_prompt=generation_prompt,
            )
        except jinja2.TemplateError as exc:
            raise RendererError(f"the chat template of {self._where} failed: {exc}") from exc

    def _continuation_text(
        self, history: Sequence[Message], new_messages: Sequence[Message], tools: Sequence[ToolSpec]
    ) -> str | None:
        """The text after ``history``'s last turn, or None when the template rewrites history.
        A token env asks twice per turn (``rewrites_history``, then ``render_continuation``);
        the last answer is kept, since each costs three renders of the whole history."""
        key = (list(history), list(new_messages), list(tools))
        if self._last_continuation is not None and self._last_continuation[0] == key:
            return self._last_continuation[1]
        text = self._render_continuation_text(history, new_messages, tools)
        self._last_continuation = (key, text)
        return text

    def _render_continuation_text(
        self, history: Sequence[Message], new_messages: Sequence[Message], tools: Sequence[ToolSpec]
    ) -> str | None:
        before = self.apply(history[:-1], tools, generation_prompt=True)
        with_turn = self.apply(history, tools, generation_prompt=False)
        cut = with_turn.rfind(self.end_of_turn)
        if cut < 0:
            return None
        with_turn = with_turn[: cut + len(self.end_of_turn)]
        after = self.apply([*history, *new_messages], tools, generation_prompt=True)
        if not (with_turn.startswith(before) and after.startswith(with_turn)):
            return None
        return after[len(with_turn) :]

    def render_prompt(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec] = ()
    ) -> list[int]:
        return self.encode(self.apply(messages, tools, generation_prompt=True))

    def rewrites_history(
        self,
        history: Sequence[Message],
        new_messages: Sequence[Message],
        tools: Sequence[ToolSpec] = (),
    ) -> bool:
        return self._continuation_text(history, new_messages, tools) is None

    def render_continuation(
        self,
        history: Sequence[Message],
        new_messages: Sequence[Message],
        tools: Sequence[ToolSpec] = (),
    ) -> list[int]:
        text = self._continuation_text(history, new_messages, tools)
        if text is None:
            raise RendererError(
                f"the chat template of {self._where} renders earlier turns differently once new "
                "messages follow, so they cannot be appended; check rewrites_history() first (the "
                "token env then starts a new sequence)"
            )
        return self.encode(text)

    def parse(self, tokens: Sequence[int]) -> ParsedResponse:
        body, _ = self.strip_stop(tokens)
        text = self.decode(body)
        reasoning = None
        if self.thinking:
            reasoning, text = split_thinking(text)
        reading = self.calls.read(text) if self.calls else ToolCallReading(content=text)
        message = Message(
            role="assistant", content=reading.content, tool_calls=reading.calls, reasoning=reasoning
        )
        return ParsedResponse(message=message, parse_error=reading.error)
