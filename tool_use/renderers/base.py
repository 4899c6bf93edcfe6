"""The renderer contract: messages + tool specs <-> token ids, one turn at a time.

A renderer turns a conversation into exactly the tokens a model's chat template would produce,
but *incrementally*: the first prompt is rendered whole; after each sampled assistant turn only
the env messages that follow (tool results, user corrections) and the next assistant header are
rendered, and appended after the sampled tokens, which are kept verbatim. The history is never
re-tokenised, so masks stay exact and the cost of a turn grows with its new tokens only.

Some templates rewrite history (Qwen3 drops the thinking of earlier turns once a new user query
arrives). ``rewrites_history`` says when; the caller then renders the whole conversation again
with ``render_prompt`` and starts a new training sequence.
"""

from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from tool_use.errors import ToolUseError
from tool_use.types import Message, ParsedResponse, ToolSpec


class RendererError(ToolUseError, ValueError):
    """A conversation cannot be rendered by the chosen renderer (the message says why and which
    renderer to pick instead)."""


class Renderer(ABC):
    """Renders conversations for one chat-template family on top of a Hugging Face tokenizer."""

    name: ClassVar[str]
    """Registry name (``chatml``, ``qwen3``, ...), as accepted by ``get_renderer``."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    # ---- rendering ---------------------------------------------------------------------------

    @abstractmethod
    def render_prompt(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec] = ()
    ) -> list[int]:
        """The whole conversation, ending with the assistant header the model continues from."""

    @abstractmethod
    def render_continuation(
        self,
        history: Sequence[Message],
        new_messages: Sequence[Message],
        tools: Sequence[ToolSpec] = (),
    ) -> list[int]:
        """Only the tokens that follow a sampled assistant turn (which ended with one of
        ``stop_sequences`` and is ``history[-1]``): ``new_messages`` and the next assistant
        header. Valid only when ``rewrites_history`` is False."""

    def rewrites_history(
        self,
        history: Sequence[Message],
        new_messages: Sequence[Message],
        tools: Sequence[ToolSpec] = (),
    ) -> bool:
        """True when appending ``new_messages`` makes the template render ``history``
        differently (the old context is no longer a prefix: start a new sequence)."""
        return False

    @property
    @abstractmethod
    def stop_sequences(self) -> list[list[int]]:
        """Token sequences that end an assistant turn; they are kept in the sampled tokens."""

    @property
    @abstractmethod
    def tool_call_prefix(self) -> list[int]:
        """The tool-call envelope up to the tool name (``<tool_call>\\n{"name": "``): the tokens a
        constrained decoder forces for ``tool_choice="required"``."""

    # ---- parsing -----------------------------------------------------------------------------

    @abstractmethod
    def parse(self, tokens: Sequence[int]) -> ParsedResponse:
        """Read one sampled assistant turn (stop sequence included or not). Never raises: a
        malformed tool call comes back as ``parse_error``."""

    # ---- shared helpers ----------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Tokenise rendered text; special tokens written in it are recognised, none are added."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=False)

    def strip_stop(self, tokens: Sequence[int]) -> tuple[list[int], bool]:
        """``tokens`` without a trailing stop sequence, and whether one was there."""
        tokens = list(tokens)
        for stop in self.stop_sequences:
            if stop and tokens[-len(stop) :] == stop:
                return tokens[: -len(stop)], True
        return tokens, False

    def same_rendering_as(self, other: Renderer | None) -> bool:
        """Whether ``other`` renders every conversation to the same tokens (same family, options
        and vocabulary): then a teacher can reuse the student's tokens as they are."""
        if other is None or type(other) is not type(self):
            return False
        if self.options() != other.options():
            return False
        mine, theirs = self.tokenizer, other.tokenizer
        return mine is theirs or (
            getattr(mine, "name_or_path", None) == getattr(theirs, "name_or_path", None)
            and len(mine) == len(theirs)
            and getattr(mine, "chat_template", None) == getattr(theirs, "chat_template", None)
        )

    def options(self) -> dict[str, Any]:
        """Constructor options that change the rendering (compared by ``same_rendering_as``)."""
        return {}

    def token_id(self, token: str) -> int:
        """The id of a single special token, with a clear error when the vocabulary lacks it."""
        ids = self.encode(token)
        if len(ids) != 1:
            raise RendererError(
                f"renderer {self.name!r} needs {token!r} to be one token in the tokenizer "
                f"{getattr(self.tokenizer, 'name_or_path', '?')!r}, but it encodes to {ids}; "
                "pick the renderer that matches the model (or renderer='template')"
            )
        return ids[0]


def function_spec(tool: ToolSpec) -> dict[str, Any]:
    """The ``{"type": "function", "function": spec}`` wrapper chat templates were trained on."""
    if tool.get("type") == "function" and "function" in tool:
        return dict(tool)
    return {"type": "function", "function": dict(tool)}


def canonical_json(raw: str) -> str:
    """``raw`` re-serialised the way a template's ``tojson`` filter writes a parsed value; kept
    as it is when it is not valid JSON (malformed arguments still render, for the record)."""
    try:
        return json.dumps(json.loads(raw), ensure_ascii=False)
    except ValueError:
        return raw


def to_hf(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Messages in the shape ``tokenizer.apply_chat_template`` expects (arguments parsed)."""
    out = []
    for message in messages:
        item = message.to_openai()
        for call in item.get("tool_calls", []):
            with contextlib.suppress(ValueError):
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
        out.append(item)
    return out
