"""@tool at run time: validation errors the model reads, values it receives, return values,
stateful method tools, and sync tools kept off the event loop."""

from __future__ import annotations

import copy
import functools
import json
import threading
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Literal

import anyio
import pytest
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from tool_use import Message, ToolCall, ToolErrorKind, ToolResult, tool

pytestmark = pytest.mark.anyio


def call(name: str, arguments: str = "{}", id: str = "call-1") -> ToolCall:
    return ToolCall(id=id, name=name, arguments=arguments)


class Color(Enum):
    RED = "red"
    GREEN = "green"


class Point(BaseModel):
    x: int
    y: int = 0


@tool
async def bash(command: str, timeout: int = 10) -> str:
    """Run a shell command."""
    return f"ran {command!r} with timeout {timeout}"


@tool(strict=True)
def strict_add(a: int, b: int) -> int:
    return a + b


@tool
def lax_add(a: int, b: int) -> int:
    return a + b


# ---- errors the model reads ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "kind", "text"),
    [
        ("{}", ToolErrorKind.INVALID_ARGUMENTS, 'argument "command" is required (string).'),
        (
            '{"command": "ls", "cwd": "/"}',
            ToolErrorKind.INVALID_ARGUMENTS,
            'unexpected argument "cwd" (valid arguments: "command", "timeout").',
        ),
        (
            '{"command": "ls", "timeout": "soon"}',
            ToolErrorKind.INVALID_ARGUMENTS,
            'argument "timeout" must be a valid integer, unable to parse string as an integer, '
            'got "soon".',
        ),
        (
            '{"command": ["ls"]}',
            ToolErrorKind.INVALID_ARGUMENTS,
            'argument "command" must be a valid string, got ["ls"].',
        ),
        (
            '{"command": "ls"',
            ToolErrorKind.INVALID_JSON,
            "arguments are not valid JSON (Expecting ',' delimiter at line 1 column 17); "
            "send a JSON object.",
        ),
        ('["ls"]', ToolErrorKind.INVALID_JSON, "arguments must be a JSON object, got an array."),
        ('"ls"', ToolErrorKind.INVALID_JSON, "arguments must be a JSON object, got a string."),
    ],
)
async def test_bad_arguments_become_readable_errors(
    arguments: str, kind: ToolErrorKind, text: str
) -> None:
    result = await bash.run(call("bash", arguments))
    [message] = result.messages
    assert message.role == "tool"
    assert message.tool_call_id == "call-1"
    assert message.name == "bash"
    assert message.content == f'Error calling tool "bash": {text}'
    assert result.metrics == {f"tool_error/{kind}": 1.0}
    assert not result.should_stop


async def test_several_problems_are_reported_together_but_capped() -> None:
    @tool
    def f(a: int, b: int, c: int, d: int) -> None: ...

    result = await f.run(call("f", '{"a": "x"}'))
    assert result.messages[0].content == (
        'Error calling tool "f": argument "a" must be a valid integer, unable to parse string '
        'as an integer, got "x"; argument "b" is required (integer); argument "c" is required '
        "(integer); and 1 more problem."
    )


async def test_nested_locations_are_named() -> None:
    @tool
    def plot(points: list[Point], style: Literal["line", "dots"] = "line") -> None: ...

    result = await plot.run(call("plot", '{"points": [{"x": 1}, {"y": 2}], "style": "bars"}'))
    assert result.messages[0].content == (
        'Error calling tool "plot": argument "points[1].x" is required (integer); '
        "argument \"style\" must be 'line' or 'dots', got \"bars\"."
    )


async def test_constraint_errors_say_the_constraint() -> None:
    @tool
    def head(lines: Annotated[int, Field(gt=0)]) -> None: ...

    result = await head.run(call("head", '{"lines": -2}'))
    assert result.messages[0].content == (
        'Error calling tool "head": argument "lines" must be greater than 0, got -2.'
    )


class Span(BaseModel):
    start: int
    end: int

    @model_validator(mode="after")
    def ordered(self) -> Span:
        if self.end < self.start:
            raise ValueError("end must not be before start")
        return self


async def test_size_constraints_and_custom_validators_read_well() -> None:
    @tool
    def cut(
        span: Span,
        names: Annotated[list[str], Field(max_length=2)] = [],  # noqa: B006
        label: Annotated[str, Field(max_length=3)] = "",
    ) -> None: ...

    arguments = '{"span": {"start": 5, "end": 1}, "names": ["a", "b", "c"], "label": "long"}'
    result = await cut.run(call("cut", arguments))
    assert result.messages[0].content == (
        'Error calling tool "cut": argument "span" is invalid: end must not be before start, '
        'got {"start": 5, "end": 1}; argument "names" must have at most 2 items '
        'after validation, not 3, got ["a", "b", "c"]; argument "label" must have at most 3 '
        'characters, got "long".'
    )


async def test_a_value_that_fits_no_union_member_gets_one_sentence() -> None:
    @tool
    def get(key: int | str, n: int = 1) -> None: ...

    result = await get.run(call("get", '{"key": [1], "n": 2.5}'))
    assert result.messages[0].content == (
        'Error calling tool "get": argument "key" must be integer or string, got [1]; '
        'argument "n" must be a valid integer, got a number with a fractional part (2.5).'
    )


def positive(value: int) -> int:
    if value <= 0:
        raise ValueError("must be positive")
    return value


def even(value: int) -> int:
    if value % 2:  # what a failed `assert` raises (pytest rewrites asserts in this module)
        raise AssertionError("must be even")
    return value


async def test_validator_errors_read_without_pydantic_prefixes() -> None:
    @tool
    def f(k: Annotated[int, AfterValidator(positive)], e: Annotated[int, AfterValidator(even)]):
        return k

    result = await f.run(call("f", '{"k": 0, "e": 3}'))
    assert result.messages[0].content == (
        'Error calling tool "f": argument "k" is invalid: must be positive, got 0; '
        'argument "e" is invalid: must be even, got 3.'
    )


class Options(BaseModel):
    recursive: bool = False
    max_depth: int = 3


class Loose(BaseModel):
    """Sets its own rule for unknown keys: kept in `model_extra`."""

    model_config = ConfigDict(extra="allow")
    name: str


@pytest.mark.parametrize("strict", [False, True])
async def test_unknown_keys_in_nested_models_are_refused(strict: bool) -> None:
    @tool(strict=strict)
    def search(pattern: str, options: Options = Options(), points: list[Point] = []) -> str:  # noqa: B006, B008
        return "ran"

    typo = await search.run(call("search", '{"pattern": "x", "options": {"recursve": true}}'))
    assert typo.messages[0].content == (
        'Error calling tool "search": argument "options" has an unexpected key "recursve".'
    )
    deep = await search.run(call("search", '{"pattern": "x", "points": [{"x": 1, "z": 2}]}'))
    assert deep.messages[0].content == (
        'Error calling tool "search": argument "points[0]" has an unexpected key "z".'
    )


async def test_a_model_with_its_own_extra_setting_keeps_it() -> None:
    received = []

    @tool
    def greet(person: Loose) -> str:
        received.append(person)
        return "hi"

    result = await greet.run(call("greet", '{"person": {"name": "Ada", "title": "Countess"}}'))
    assert result.messages[0].content == "hi"
    assert received[0].model_extra == {"title": "Countess"}


class Exact(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


async def test_a_model_that_forbids_extra_itself_does_not_lift_the_rule_for_others() -> None:
    @tool
    def run(who: Exact, options: Options) -> str:
        return "ran"

    result = await run.run(call("run", '{"who": {"name": "a"}, "options": {"recursve": true}}'))
    assert result.messages[0].content == (
        'Error calling tool "run": argument "options" has an unexpected key "recursve".'
    )


async def test_strict_reaches_nested_models() -> None:
    @tool(strict=True)
    def place(at: Point) -> str:
        return "placed"

    result = await place.run(call("place", '{"at": {"x": "1"}}'))
    assert result.messages[0].content == (
        'Error calling tool "place": argument "at.x" must be a valid integer, got "1".'
    )
    assert (await place.run(call("place", '{"at": {"x": 1}}'))).messages[0].content == "placed"


async def test_default_none_accepts_the_null_it_advertises() -> None:
    @tool
    def head(path: str, lines: int = None) -> str:  # type: ignore[assignment]  # noqa: RUF013
        return f"{path} {lines}"

    result = await head.run(call("head", '{"path": "a", "lines": null}'))
    assert result.messages[0].content == "a None"
    assert (await head.run(call("head", '{"path": "a", "lines": 2}'))).messages[0].content == "a 2"


async def test_long_inputs_are_previewed_not_echoed() -> None:
    result = await bash.run(call("bash", json.dumps({"command": ["x" * 1000]})))
    preview = json.dumps(["x" * 1000])[:57] + "..."
    assert result.messages[0].content == (
        f'Error calling tool "bash": argument "command" must be a valid string, got {preview}'
    )


async def test_empty_arguments_mean_no_arguments() -> None:
    @tool
    def now() -> str:
        return "noon"

    assert (await now.run(call("now", ""))).messages[0].content == "noon"


async def test_strict_tool_refuses_coercion_lax_tool_accepts_it() -> None:
    lax = await lax_add.run(call("lax_add", '{"a": "3", "b": 4}'))
    assert lax.messages[0].content == "7"
    strict = await strict_add.run(call("strict_add", '{"a": "3", "b": 4}'))
    assert strict.messages[0].content == (
        'Error calling tool "strict_add": argument "a" must be a valid integer, got "3".'
    )
    assert strict.metrics == {"tool_error/invalid_arguments": 1.0}


# ---- values the function receives ---------------------------------------------------------


async def test_function_receives_models_enums_and_defaults() -> None:
    received = {}

    @tool
    def draw(at: Point, color: Color, points: list[Point], label: str | None = None) -> str:
        received.update(at=at, color=color, points=points, label=label)
        return "ok"

    arguments = '{"at": {"x": 1}, "color": "green", "points": [{"x": 2, "y": 3}]}'
    result = await draw.run(call("draw", arguments))
    assert result.messages[0].content == "ok"
    assert received == {
        "at": Point(x=1, y=0),
        "color": Color.GREEN,
        "points": [Point(x=2, y=3)],
        "label": None,
    }


async def test_positional_only_parameters_are_passed_positionally() -> None:
    @tool
    def div(a: int, b: int, /, *, exact: bool = False) -> float:
        return a // b if exact else a / b

    assert (await div.run(call("div", '{"a": 7, "b": 2}'))).messages[0].content == "3.5"
    result = await div.run(call("div", '{"b": 2, "a": 7, "exact": true}'))
    assert result.messages[0].content == "3"


# ---- return values ------------------------------------------------------------------------


@dataclass
class Listing:
    files: list[str]


@pytest.mark.parametrize(
    ("value", "content"),
    [
        ("plain text", "plain text"),
        (42, "42"),
        ({"ok": True, "path": "/tmp/é"}, '{"ok": true, "path": "/tmp/é"}'),
        ([1, "a"], '[1, "a"]'),
        (None, "null"),
        (Point(x=1), '{"x":1,"y":0}'),
        (Listing(files=["a.txt"]), '{"files": ["a.txt"]}'),
    ],
)
async def test_return_values_become_one_tool_message(value: object, content: str) -> None:
    @tool
    def give() -> object:
        return value

    result = await give.run(call("give", id="c9"))
    assert result.messages == [
        Message(role="tool", content=content, tool_call_id="c9", name="give")
    ]
    assert result.metrics == {}


async def test_returned_messages_and_results_are_addressed_to_the_call() -> None:
    @tool
    def look() -> list[Message]:
        return [Message(role="tool", content="a picture"), Message(role="user", content="note")]

    @tool
    async def submit(answer: str) -> ToolResult:
        return ToolResult(
            messages=[Message(role="tool", content=f"submitted {answer}")],
            should_stop=True,
            metrics={"submitted": 1.0},
        )

    looked = await look.run(call("look", id="c1"))
    assert looked.messages == [
        Message(role="tool", content="a picture", tool_call_id="c1", name="look"),
        Message(role="user", content="note"),
    ]
    submitted = await submit.run(call("submit", '{"answer": "42"}', id="c2"))
    assert submitted.should_stop
    assert submitted.metrics == {"submitted": 1.0}
    assert submitted.messages[0].tool_call_id == "c2"
    assert submitted.messages[0].name == "submit"


async def test_bytes_are_text_when_utf8_and_an_error_naming_the_tool_otherwise() -> None:
    @tool
    def utf8() -> bytes:
        return "line1\ncafé".encode()

    @tool
    def latin1() -> bytes:
        return "café".encode("latin-1")

    result = await utf8.run(call("utf8"))
    assert result.messages == [
        Message(role="tool", content="line1\ncafé", tool_call_id="call-1", name="utf8")
    ]
    with pytest.raises(ValueError, match=r"tool 'latin1' returned bytes that are not UTF-8"):
        await latin1.run(call("latin1"))


async def test_a_call_answered_only_by_other_messages_still_gets_a_tool_message() -> None:
    @tool
    def nudge() -> Message:
        return Message(role="user", content="Please continue.")

    result = await nudge.run(call("nudge", id="c3"))
    assert result.messages == [
        Message(role="tool", content="", tool_call_id="c3", name="nudge"),
        Message(role="user", content="Please continue."),
    ]


async def test_async_function_behind_a_plain_decorator_is_awaited() -> None:
    def logged(fn):  # type: ignore[no-untyped-def]
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            return fn(*args, **kwargs)  # the coroutine, not its result

        return wrapper

    @tool
    @logged
    async def fetch(url: str) -> str:
        return f"fetched {url}"

    result = await fetch.run(call("fetch", '{"url": "http://x"}'))
    assert result.messages[0].content == "fetched http://x"
    assert result.metrics == {}


async def test_unserialisable_return_value_raises_a_type_error_naming_the_tool() -> None:
    @tool
    def leak() -> object:
        return threading.Lock()

    with pytest.raises(
        TypeError, match=r"tool 'leak' returned an object of type lock, which is not JSON"
    ):
        await leak.run(call("leak"))


# ---- stateful tools: methods --------------------------------------------------------------


class Notebook:
    """Per-episode state; in real envs this would hold a sandbox."""

    def __init__(self) -> None:
        self.notes: dict[str, str] = {}

    @tool
    async def write(self, key: str, text: Annotated[str, "What to remember."]) -> str:
        """Store a note under a key."""
        self.notes[key] = text
        return f"stored {key}"

    @tool(name="read_note", timeout_s=5)
    def read(self, key: str) -> str:
        """Read a note back."""
        return self.notes.get(key, f"no note named {key!r}")

    @tool
    @classmethod
    def kind(cls, verbose: bool = False) -> str:
        """Say what this is."""
        return cls.__name__ + (" (a notebook)" if verbose else "")

    @tool
    @staticmethod
    def echo(text: str) -> str:
        return text


async def test_method_tools_are_bound_to_their_instance() -> None:
    first, second = Notebook(), Notebook()
    await first.write.run(call("write", '{"key": "k", "text": "first"}'))
    await second.write.run(call("write", '{"key": "k", "text": "second"}'))
    assert first.notes == {"k": "first"}
    assert second.notes == {"k": "second"}
    read = await first.read.run(call("read_note", '{"key": "k"}'))
    assert read.messages[0].content == "first"
    assert first.write is first.write  # bound once per instance, cached
    assert first.write is not second.write
    assert first.read.timeout_s == 5


@pytest.mark.parametrize("duplicate", [copy.copy, copy.deepcopy])
async def test_a_copied_instance_gets_its_own_bound_tool(duplicate) -> None:  # type: ignore[no-untyped-def]
    template = Notebook()
    template.read.timeout_s = 7  # a setting made on the bound tool travels with the copy
    episode = duplicate(template)
    episode.notes = {}
    await episode.write.run(call("write", '{"key": "k", "text": "episode"}'))
    assert episode.notes == {"k": "episode"}
    assert template.notes == {}
    assert episode.write is episode.write
    assert episode.read is not template.read
    assert episode.read.timeout_s == 7
    assert (await episode.read.run(call("read_note", '{"key": "k"}'))).messages[0].content == (
        "episode"
    )


async def test_method_schema_excludes_self_and_keeps_docs() -> None:
    assert Notebook.write.spec == {
        "name": "write",
        "description": "Store a note under a key.",
        "parameters": {
            "type": "object",
            "properties": {
                "key": {"type": "string"},
                "text": {"type": "string", "description": "What to remember."},
            },
            "required": ["key", "text"],
        },
    }
    assert Notebook().read.spec["name"] == "read_note"


async def test_method_tool_used_through_the_class_says_how_to_use_it() -> None:
    with pytest.raises(TypeError, match=r"tool 'write' is a method; use it through an instance"):
        await Notebook.write.run(call("write", '{"key": "k", "text": "t"}'))


async def test_classmethod_and_staticmethod_tools() -> None:
    assert Notebook.kind.spec["parameters"]["properties"] == {
        "verbose": {"type": "boolean", "default": False}
    }
    result = await Notebook().kind.run(call("kind", '{"verbose": true}'))
    assert result.messages[0].content == "Notebook (a notebook)"
    assert (await Notebook.echo.run(call("echo", '{"text": "hi"}'))).messages[0].content == "hi"


async def test_bound_method_tool_is_directly_callable() -> None:
    book = Notebook()
    assert await book.write("k", "v") == "stored k"
    assert book.read("k") == "v"


async def test_async_callable_object_is_awaited() -> None:
    class Counter:
        def __init__(self) -> None:
            self.count = 0

        async def __call__(self, step: int = 1) -> int:
            self.count += step
            return self.count

    counter = Counter()
    counting = tool(name="count")(counter)
    assert counting.is_async
    assert (await counting.run(call("count", '{"step": 2}'))).messages[0].content == "2"


# ---- sync tools never block the event loop -------------------------------------------------


async def test_sync_tool_runs_in_a_worker_thread_while_the_loop_makes_progress() -> None:
    """The sync tool blocks until a task *on the event loop* sets the flag. If the tool ran on
    the loop, that task could never run and the tool would report that it waited in vain."""
    flag = threading.Event()
    threads: list[int] = []

    @tool
    def wait_for_flag() -> str:
        threads.append(threading.get_ident())
        return "flag seen" if flag.wait(timeout=5) else "blocked: the loop never ran"

    async def set_flag() -> None:
        await anyio.sleep(0.01)
        flag.set()

    async with anyio.create_task_group() as group:
        group.start_soon(set_flag)
        result = await wait_for_flag.run(call("wait_for_flag"))
    assert result.messages[0].content == "flag seen"
    assert threads and threads[0] != threading.get_ident()


async def test_async_tool_runs_on_the_event_loop_thread() -> None:
    threads: list[int] = []

    @tool
    async def where() -> str:
        threads.append(threading.get_ident())
        return "here"

    await where.run(call("where"))
    assert threads == [threading.get_ident()]
