"""``@tool``: a typed Python function or method becomes a Tool the model can call.

    @tool
    async def bash(command: Annotated[str, "The shell command to run."]) -> str:
        \"\"\"Run a shell command and return its output.\"\"\"

A decorated method is a descriptor: ``sandbox_tools.bash`` is a tool bound to that instance,
which is how tools get per-episode state (a sandbox, a scratch directory). Sync functions run
in a worker thread, so a slow tool never stalls the other episodes on the event loop.
``functools.partial`` objects work too: the arguments they fix are not shown to the model.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal, overload

import anyio.to_thread
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from tool_use.errors import ToolCallError, ToolDefinitionError
from tool_use.execution import addressed, error_result, tool_message
from tool_use.schema import FunctionSchema, function_label, function_name, function_schema
from tool_use.types import Message, ToolCall, ToolResult, ToolSpec

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""What OpenAI-style APIs and chat templates accept as a function name."""


class FunctionTool:
    """A Tool made from a typed function (see ``tool``). Calling it calls the function."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        timeout_s: float | None = None,
        strict: bool = False,
        max_output_chars: int | None = None,
    ) -> None:
        self._binding: Literal["none", "instance", "owner"] = "none"
        """What the first parameter is bound to: nothing, the instance (``self``), or the
        class (a classmethod's ``cls``)."""
        if isinstance(fn, staticmethod):
            fn = fn.__func__
        elif isinstance(fn, classmethod):
            fn, self._binding = fn.__func__, "owner"
        elif _first_parameter(fn) == "self":
            self._binding = "instance"
        functools.update_wrapper(self, fn)
        label = function_label(fn)
        if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
            raise ToolDefinitionError(
                f"tool function {label}: generators are not supported; return the whole result"
            )
        tool_name = name or function_name(fn)
        if not _NAME.match(tool_name):
            raise ToolDefinitionError(
                f"tool function {label}: name {tool_name!r} must be 1-64 letters, digits, "
                "'_' or '-'"
            )
        if timeout_s is not None and timeout_s <= 0:
            raise ToolDefinitionError(f"tool {tool_name!r}: timeout_s must be > 0, got {timeout_s}")
        if max_output_chars is not None and max_output_chars < 1:
            raise ToolDefinitionError(
                f"tool {tool_name!r}: max_output_chars must be >= 1, got {max_output_chars}"
            )
        self.fn = fn
        self.schema: FunctionSchema = function_schema(
            fn,
            name=tool_name,
            description=description,
            strict=strict,
            skip_first=self._binding != "none",
        )
        self.timeout_s = timeout_s
        self.max_output_chars = max_output_chars
        self.strict = strict
        self.is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            type(fn).__call__  # objects with an `async def __call__`
        )
        self._bound_to: Any = None
        self._attribute: str | None = None

    @property
    def name(self) -> str:
        return self.schema.name

    @property
    def description(self) -> str:
        return self.schema.description

    @property
    def spec(self) -> ToolSpec:
        return self.schema.spec

    # ---- methods: the descriptor protocol ---------------------------------------------------

    def __set_name__(self, owner: type, name: str) -> None:
        self._attribute = name

    def __get__(self, instance: Any, owner: type | None = None) -> FunctionTool:
        if self._binding == "owner":
            return self._bind(owner if owner is not None else type(instance))
        if self._binding == "none" or instance is None or self._bound_to is not None:
            return self
        # Cached on the instance, so `obj.tool is obj.tool` and settings made on the bound
        # tool last. A copy of the instance (copy.copy, deepcopy) carries the cache with it:
        # the cached tool counts only when bound to this very instance, else it is rebound
        # (keeping its settings), so a copy never runs its tool on the original's state.
        key = f"__tool_{self._attribute}"
        cache = getattr(instance, "__dict__", None) if self._attribute is not None else None
        cached = cache.get(key) if cache is not None else None
        if isinstance(cached, FunctionTool) and cached._bound_to is instance:
            return cached
        bound = (cached if isinstance(cached, FunctionTool) else self)._bind(instance)
        if cache is not None:
            cache[key] = bound
        return bound

    def _bind(self, target: Any) -> FunctionTool:
        bound = copy.copy(self)
        bound._bound_to = target
        return bound

    def __deepcopy__(self, memo: dict[int, Any]) -> FunctionTool:
        """A deep copy shares the function and schema, and copies only what it is bound to."""
        return self._bind(copy.deepcopy(self._bound_to, memo))

    def check_callable(self) -> None:
        """Raise ``TypeError`` for a method tool reached through its class (``Notes.write``)
        rather than an instance: it cannot run. ``AgentToolMessageEnv`` calls this when built."""
        if self._binding == "instance" and self._bound_to is None:
            raise TypeError(
                f"tool {self.name!r} is a method; use it through an instance "
                f"(e.g. `obj.{self.fn.__name__}`), not through the class"
            )

    # ---- calling ------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the underlying function directly (no validation), as if undecorated."""
        if self._bound_to is not None:
            return self.fn(self._bound_to, *args, **kwargs)
        return self.fn(*args, **kwargs)

    async def run(self, call: ToolCall) -> ToolResult:
        """Validate ``call.arguments`` and run the function.

        Bad arguments come back as an error ToolResult. Exceptions from the function itself
        propagate; ``execute_tool_call`` (used by the episode loop) turns them into messages
        and applies timeouts and the output cap.
        """
        self.check_callable()
        try:
            args, kwargs = self.schema.validate(call.arguments)
        except ToolCallError as exc:
            return error_result(call, exc.kind, exc.detail)
        if self._bound_to is not None:
            args.insert(0, self._bound_to)
        if self.is_async:
            value = await self.fn(*args, **kwargs)
        else:
            value = await anyio.to_thread.run_sync(
                functools.partial(self.fn, *args, **kwargs), abandon_on_cancel=True
            )
        if inspect.isawaitable(value):  # an async function behind a plain decorator
            value = await value
        return as_tool_result(value, call)

    def __repr__(self) -> str:
        bound = f" bound to {self._bound_to!r}" if self._bound_to is not None else ""
        return f"<tool {self.name!r}{bound}>"


def as_tool_result(value: Any, call: ToolCall) -> ToolResult:
    """What a tool function returned -> ToolResult.

    ``str`` is the message text, and so are ``bytes`` that are UTF-8 (other bytes raise
    ``ValueError``: only the tool knows their encoding); a ``ToolResult`` or ``Message``(s)
    are used as they are (tool-role messages get the call's id and name); anything else is
    dumped as JSON (pydantic models, dataclasses, dicts, lists, numbers, ``None`` -> ``null``).
    """
    if isinstance(value, ToolResult):
        return addressed(value, call)
    if isinstance(value, Message):
        return addressed(ToolResult(messages=[value]), call)
    if (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and value
        and all(isinstance(item, Message) for item in value)
    ):
        return addressed(ToolResult(messages=list(value)), call)
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"tool {call.name!r} returned bytes that are not UTF-8 text ({exc.reason} at "
                f"byte {exc.start}); the tool must decode them itself"
            ) from None
    if isinstance(value, str):
        return ToolResult(messages=[tool_message(call, value)])
    if isinstance(value, BaseModel):
        return ToolResult(messages=[tool_message(call, value.model_dump_json())])
    try:
        text = json.dumps(to_jsonable_python(value), ensure_ascii=False)
    except Exception as exc:
        raise TypeError(
            f"tool {call.name!r} returned an object of type {type(value).__name__}, which is "
            "not JSON serialisable; return a str, a ToolResult, Messages or JSON data"
        ) from exc
    return ToolResult(messages=[tool_message(call, text)])


@overload
def tool(fn: Callable[..., Any], /) -> FunctionTool: ...


@overload
def tool(
    *,
    name: str | None = None,
    description: str | None = None,
    timeout_s: float | None = None,
    strict: bool = False,
    max_output_chars: int | None = None,
) -> Callable[[Callable[..., Any]], FunctionTool]: ...


def tool(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout_s: float | None = None,
    strict: bool = False,
    max_output_chars: int | None = None,
) -> FunctionTool | Callable[[Callable[..., Any]], FunctionTool]:
    """Turn a typed function (or method) into a Tool.

    ``name`` and ``description`` override the function name and docstring summary;
    ``timeout_s`` and ``max_output_chars`` override the episode's defaults for this tool;
    ``strict`` rejects arguments of the wrong JSON type instead of coercing them
    (``"3"`` -> ``3`` is accepted only when ``strict=False``, the default).
    Raises ``ToolDefinitionError`` at decoration time for signatures a model cannot call.
    """

    def decorate(function: Callable[..., Any]) -> FunctionTool:
        return FunctionTool(
            function,
            name=name,
            description=description,
            timeout_s=timeout_s,
            strict=strict,
            max_output_chars=max_output_chars,
        )

    return decorate if fn is None else decorate(fn)


def _first_parameter(fn: Callable[..., Any]) -> str | None:
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return params[0] if params else None
