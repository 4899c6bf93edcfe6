"""Tool specs from signatures: golden schemas, docstrings, overrides, refused signatures."""

from __future__ import annotations

import functools
import re
from enum import Enum, IntEnum
from typing import Annotated, Any, Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from tool_use import FunctionTool, ToolCall, ToolDefinitionError, tool


class Color(Enum):
    RED = "red"
    GREEN = "green"


class Level(IntEnum):
    LOW = 1
    HIGH = 2


class Point(BaseModel):
    """A point on the grid."""

    x: int
    y: int = 0


class Box(BaseModel):
    corner: Point
    label: str | None = None


class Tree(BaseModel):
    value: int
    children: list[Tree] = []


POINT = {
    "type": "object",
    "description": "A point on the grid.",
    "properties": {"x": {"type": "integer"}, "y": {"type": "integer", "default": 0}},
    "required": ["x"],
}


def primitives(a: str, b: int, c: float, d: bool) -> None: ...


def defaults_and_optionals(
    count: int = 3, name: str | None = None, tags: list[str] | None = None
) -> None: ...


def annotated(
    path: Annotated[str, "File to read."],
    limit: Annotated[int, Field(ge=1, le=100, description="Max lines.")] = 10,
) -> None: ...


def choices(mode: Literal["fast", "slow"], color: Color = Color.RED) -> None: ...


def optional_int_enum(level: Level | None = None) -> None: ...


def containers(
    xs: list[list[int]],
    env: dict[str, str],
    pair: tuple[int, str],
    ids: set[int] = set(),  # noqa: B006 (never mutated; shows a default in the schema)
) -> None: ...


def models(origin: Point, boxes: list[Box], extra: Point | None = None) -> None: ...


def recursive(tree: Tree) -> None: ...


def no_parameters() -> None: ...


def title_named(title: str) -> None: ...


GOLDEN: list[tuple[Any, dict[str, Any]]] = [
    (
        primitives,
        {
            "type": "object",
            "properties": {
                "a": {"type": "string"},
                "b": {"type": "integer"},
                "c": {"type": "number"},
                "d": {"type": "boolean"},
            },
            "required": ["a", "b", "c", "d"],
        },
    ),
    (
        defaults_and_optionals,
        {
            "type": "object",
            "properties": {
                "count": {"type": "integer", "default": 3},
                "name": {"type": "string", "nullable": True, "default": None},
                "tags": {
                    "type": "array",
                    "items": {"type": "string"},
                    "nullable": True,
                    "default": None,
                },
            },
        },
    ),
    (
        annotated,
        {
            "type": "object",
            "properties": {
                "path": {"type": "string", "description": "File to read."},
                "limit": {
                    "type": "integer",
                    "description": "Max lines.",
                    "default": 10,
                    "maximum": 100,
                    "minimum": 1,
                },
            },
            "required": ["path"],
        },
    ),
    (
        choices,
        {
            "type": "object",
            "properties": {
                "mode": {"type": "string", "enum": ["fast", "slow"]},
                "color": {"type": "string", "enum": ["red", "green"], "default": "red"},
            },
            "required": ["mode"],
        },
    ),
    (
        optional_int_enum,
        {
            "type": "object",
            "properties": {
                "level": {"type": "integer", "enum": [1, 2], "nullable": True, "default": None}
            },
        },
    ),
    (
        containers,
        {
            "type": "object",
            "properties": {
                "xs": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
                "env": {"type": "object", "additionalProperties": {"type": "string"}},
                "pair": {
                    "type": "array",
                    "maxItems": 2,
                    "minItems": 2,
                    "prefixItems": [{"type": "integer"}, {"type": "string"}],
                },
                "ids": {
                    "type": "array",
                    "default": [],
                    "items": {"type": "integer"},
                    "uniqueItems": True,
                },
            },
            "required": ["xs", "env", "pair"],
        },
    ),
    (
        models,
        {
            "type": "object",
            "properties": {
                "origin": POINT,
                "boxes": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "corner": POINT,
                            "label": {"type": "string", "nullable": True, "default": None},
                        },
                        "required": ["corner"],
                    },
                },
                "extra": {**POINT, "nullable": True, "default": None},
            },
            "required": ["origin", "boxes"],
        },
    ),
    (
        recursive,
        {
            "type": "object",
            "properties": {"tree": {"$ref": "#/$defs/Tree"}},
            "required": ["tree"],
            "$defs": {
                "Tree": {
                    "type": "object",
                    "properties": {
                        "value": {"type": "integer"},
                        "children": {
                            "type": "array",
                            "default": [],
                            "items": {"$ref": "#/$defs/Tree"},
                        },
                    },
                    "required": ["value"],
                }
            },
        },
    ),
    (no_parameters, {"type": "object", "properties": {}}),
    (
        title_named,  # a parameter called "title" is not pydantic noise
        {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]},
    ),
]


@pytest.mark.parametrize(("fn", "expected"), GOLDEN, ids=[fn.__name__ for fn, _ in GOLDEN])
def test_golden_parameters_schema(fn: Any, expected: dict[str, Any]) -> None:
    parameters = tool(fn).spec["parameters"]
    assert parameters == expected
    jsonschema.Draft202012Validator.check_schema(parameters)
    assert '"title"' not in str(expected) or fn is title_named


@pytest.mark.parametrize(
    ("fn", "good", "bad"),
    [
        (defaults_and_optionals, {"name": None, "tags": ["a"]}, {"tags": "a"}),
        (models, {"origin": {"x": 1}, "boxes": [{"corner": {"x": 2}}]}, {"origin": {"y": 1}}),
        (recursive, {"tree": {"value": 1, "children": [{"value": 2}]}}, {"tree": {"value": "x"}}),
        (
            containers,
            {"xs": [[1]], "env": {}, "pair": [1, "a"]},
            {"xs": [], "env": {}, "pair": [1]},
        ),
    ],
)
def test_cleaned_schema_still_means_the_same(fn: Any, good: dict, bad: dict) -> None:
    """Inlining $defs and writing unions as templates expect must not change what the schema
    accepts (``nullable`` read as OpenAPI and transformers mean it)."""
    validator = jsonschema.Draft202012Validator(_with_null(tool(fn).spec["parameters"]))
    assert validator.is_valid(good)
    assert not validator.is_valid(bad)


def _with_null(node: Any) -> Any:
    """``{..., "nullable": true}`` -> ``{"anyOf": [{...}, {"type": "null"}]}`` (plain JSON
    Schema has no ``nullable``)."""
    if isinstance(node, list):
        return [_with_null(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _with_null(value) for key, value in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


def _template_cases(
    mode: Literal["fast", "slow"],
    only: Literal["yes"],
    limit: int | None,
    key: int | str,
    pick: Literal["x", "y"] | None,
    color: Color | None,
    size: int | str | None,
    flag: bool = False,
) -> None:
    """Parameters whose schemas chat templates render badly unless written as
    ``transformers.get_json_schema`` writes them.

    Args:
        mode: How fast.
        only: Must be yes.
        limit: At most this many.
        key: A key.
        pick: A choice.
        color: A color.
        size: A size.
        flag: A flag.
    """


def test_schemas_are_written_as_transformers_get_json_schema_writes_them() -> None:
    """Templates print `type` and `enum` of each parameter (Qwen3-Coder's XML tool format):
    both must be there, with `type` a string or a list of strings, never lost in `anyOf`."""
    from transformers.utils import get_json_schema

    ours = tool(_template_cases).spec["parameters"]["properties"]
    theirs = get_json_schema(_template_cases)["function"]["parameters"]["properties"]
    for name, expected in theirs.items():
        assert {key: ours[name][key] for key in expected} == expected, name
    assert ours["only"] == {"type": "string", "description": "Must be yes.", "enum": ["yes"]}
    assert ours["limit"] == {
        "type": "integer",
        "description": "At most this many.",
        "nullable": True,
    }
    assert ours["size"] == {
        "type": ["integer", "string"],
        "description": "A size.",
        "nullable": True,
    }


def test_unions_of_structured_types_keep_any_of() -> None:
    @tool
    def f(target: Point | list[int], maybe: Point | list[int] | None = None) -> None: ...

    props = f.spec["parameters"]["properties"]
    assert props["target"] == {"anyOf": [POINT, {"type": "array", "items": {"type": "integer"}}]}
    assert props["maybe"] == {**props["target"], "nullable": True, "default": None}


def test_default_none_makes_the_parameter_nullable() -> None:
    @tool
    def head(path: str, lines: int = None) -> str:  # type: ignore[assignment]  # noqa: RUF013
        return path

    assert head.spec["parameters"]["properties"]["lines"] == {
        "type": "integer",
        "nullable": True,
        "default": None,
    }


def test_unresolvable_return_annotation_does_not_matter() -> None:
    # this module uses `from __future__ import annotations`: the return hint is never evaluated
    @tool
    def total(a: int, b: int) -> OnlyForTypeCheckers:  # type: ignore[name-defined]  # noqa: F821
        """Add two integers."""
        return a + b

    assert total.spec["parameters"]["required"] == ["a", "b"]
    assert total(1, 2) == 3


def test_spec_is_a_copy_the_caller_may_change() -> None:
    @tool
    def f(x: int) -> int:
        return x

    spec = f.spec
    spec["parameters"]["properties"]["x"]["type"] = "string"
    spec["parameters"]["required"].clear()
    assert f.spec["parameters"] == {
        "type": "object",
        "properties": {"x": {"type": "integer"}},
        "required": ["x"],
    }


def test_spec_is_a_clean_openai_function_spec() -> None:
    @tool
    def read_file(path: str, max_lines: int = 100) -> str:
        """Read a text file.

        Returns the first lines only.
        """
        return ""

    assert read_file.spec == {
        "name": "read_file",
        "description": "Read a text file.",
        "parameters": {
            "type": "object",
            "properties": {
                "path": {"type": "string"},
                "max_lines": {"type": "integer", "default": 100},
            },
            "required": ["path"],
        },
    }


def test_google_style_docstring_describes_parameters() -> None:
    @tool
    def search(query: str, limit: int = 5) -> list[str]:
        """Search the notes for a phrase.

        Matching is case-insensitive.

        Args:
            query: The phrase to look for,
                possibly several words.
            limit (int): How many hits to return.

        Returns:
            The matching lines.
        """
        return []

    props = search.spec["parameters"]["properties"]
    assert search.description == "Search the notes for a phrase."
    assert props["query"]["description"] == "The phrase to look for, possibly several words."
    assert props["limit"]["description"] == "How many hits to return."


def test_numpy_style_docstring_describes_parameters() -> None:
    @tool
    def resize(width: int, height: int = 0) -> str:
        """Resize the image
        to a new shape.

        Parameters
        ----------
        width : int
            New width in pixels.
        height : int, optional
            New height; 0 keeps the aspect ratio.
        """
        return ""

    props = resize.spec["parameters"]["properties"]
    assert resize.description == "Resize the image to a new shape."
    assert props["width"]["description"] == "New width in pixels."
    assert props["height"]["description"] == "New height; 0 keeps the aspect ratio."


def test_docstring_that_starts_with_its_args_section() -> None:
    @tool
    def add(a: int, b: int) -> int:
        """
        Args:
            a: First addend.
            b: Second addend.
        """
        return a + b

    @tool
    def neg(x: int) -> int:
        """Args:
        x: The number.
        """
        return -x

    assert add.description == ""
    assert add.spec["parameters"]["properties"]["a"]["description"] == "First addend."
    assert add.spec["parameters"]["properties"]["b"]["description"] == "Second addend."
    assert neg.description == ""
    assert neg.spec["parameters"]["properties"]["x"]["description"] == "The number."


def test_annotated_description_wins_over_docstring() -> None:
    @tool
    def f(a: Annotated[str, "From the annotation."], b: str) -> None:
        """Do it.

        Args:
            a: From the docstring.
            b: Only in the docstring.
        """

    props = f.spec["parameters"]["properties"]
    assert props["a"]["description"] == "From the annotation."
    assert props["b"]["description"] == "Only in the docstring."


def test_name_and_description_overrides() -> None:
    @tool(name="run_shell", description="Run a command in the sandbox.")
    def bash(command: str) -> str:
        """Internal docstring the model should not see."""
        return command

    assert bash.name == "run_shell"
    assert bash.spec["name"] == "run_shell"
    assert bash.spec["description"] == "Run a command in the sandbox."


def test_function_without_docstring_has_empty_description() -> None:
    @tool
    def f(a: int) -> int:
        return a

    assert f.spec["description"] == ""


def test_strict_tool_declares_no_additional_properties() -> None:
    @tool(strict=True)
    def f(n: int) -> int:
        return n

    assert f.spec["parameters"] == {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }


def test_string_annotations_resolve() -> None:
    # this module uses `from __future__ import annotations`: every hint is a string
    assert tool(models).spec["parameters"]["properties"]["origin"] == POINT


def test_parameter_names_that_shadow_pydantic_attributes_work() -> None:
    @tool
    def f(json: str, schema: int, model_config: str = "x") -> None: ...

    assert list(f.spec["parameters"]["properties"]) == ["json", "schema", "model_config"]


def _vararg(*names: str) -> None: ...
def _kwarg(**options: str) -> None: ...
def _unannotated(command, timeout: int = 3) -> None: ...  # type: ignore[no-untyped-def]
def _unresolvable(x: NoSuchType) -> None: ...  # type: ignore[name-defined]  # noqa: F821


class _Opaque:
    pass


def _classmethod_over_tool(cls, x: int) -> None: ...  # type: ignore[no-untyped-def]


def _no_json_schema(handle: _Opaque) -> None: ...


async def _generator(n: int):  # type: ignore[no-untyped-def]
    yield n


@pytest.mark.parametrize(
    ("fn", "kwargs", "pattern"),
    [
        (_vararg, {}, r'_vararg, parameter "names": \*names is not supported'),
        (_kwarg, {}, r'_kwarg, parameter "options": \*\*options is not supported'),
        (_unannotated, {}, r'_unannotated, parameter "command": needs a type annotation'),
        (_unresolvable, {}, r"_unresolvable: cannot resolve its type hints \(NameError"),
        (_no_json_schema, {}, r'_no_json_schema, parameter "handle": type .*_Opaque.* no JSON'),
        (_generator, {}, r"_generator: generators are not supported"),
        (
            _classmethod_over_tool,
            {},
            r'parameter "cls": looks like a classmethod; put @tool on top, above @classmethod',
        ),
        (primitives, {"name": "has space"}, r"name 'has space' must be 1-64 letters"),
        (primitives, {"timeout_s": 0}, r"timeout_s must be > 0"),
        (primitives, {"max_output_chars": 0}, r"max_output_chars must be >= 1"),
    ],
)
def test_unsupported_definitions_are_refused_at_decoration(
    fn: Any, kwargs: dict[str, Any], pattern: str
) -> None:
    with pytest.raises(ToolDefinitionError, match=pattern):
        tool(**kwargs)(fn)


def test_classmethod_over_tool_says_to_put_tool_on_top() -> None:
    with pytest.raises(ToolDefinitionError, match=r"put @tool on top, above @classmethod"):

        class Registry:
            @classmethod  # the wrong order: @tool must be the outermost decorator
            @tool
            def kinds(cls) -> list[str]:
                return []


def _search(root: str, pattern: str, limit: int = 10) -> str:
    """Search a tree.

    Args:
        root: Where to start.
        pattern: What to find.
        limit: At most this many hits.
    """
    return f"{root} {pattern} {limit}"


@pytest.mark.anyio
async def test_partial_shows_only_the_arguments_left_to_fill() -> None:
    search = tool(functools.partial(_search, "/srv", limit=3))
    assert search.spec == {
        "name": "_search",
        "description": "Search a tree.",
        "parameters": {
            "type": "object",
            "properties": {"pattern": {"type": "string", "description": "What to find."}},
            "required": ["pattern"],
        },
    }
    result = await search.run(ToolCall(id="1", name="_search", arguments='{"pattern": "x"}'))
    assert result.messages[0].content == "/srv x 3"
    refused = await search.run(
        ToolCall(id="2", name="_search", arguments='{"pattern": "x", "limit": 99}')
    )
    assert refused.messages[0].content.startswith(
        'Error calling tool "_search": unexpected argument "limit"'
    )


def test_decorator_keeps_the_function_usable() -> None:
    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    assert isinstance(add, FunctionTool)
    assert add(2, 3) == 5
    assert add.__name__ == "add"
    assert add.__doc__ == "Add two integers."
    assert re.fullmatch(r"<tool 'add'>", repr(add))
