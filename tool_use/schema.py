"""A function's signature and docstring -> a clean JSON schema, and argument validation.

Pydantic does the real work: the parameters become a ``create_model`` model, whose JSON schema
is then cleaned of pydantic's noise (auto titles, ``$defs`` that can be inlined) and written the
way ``transformers.get_json_schema`` writes it, the convention chat templates were made for:
``Optional[X]`` is X's schema with ``nullable: true``, a union of simple types is a ``type``
list, a ``Literal`` (even of one value) is ``type`` + ``enum``. Validation errors become
one-line sentences a small model can act on.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import re
import textwrap
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import docstring_parser
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from tool_use.errors import ToolCallError, ToolDefinitionError
from tool_use.types import ToolErrorKind, ToolSpec

_SHOULD = re.compile(r"^\w+ should ")
_VALIDATOR_PREFIX = re.compile(r"^(Value error|Assertion failed), ")
"""What pydantic puts before the message of a ``ValueError``/``assert`` in a validator."""

MAX_REPORTED_ERRORS = 3
"""A bad call with many problems reports the first few; a small model fixes them in order."""


@dataclass(frozen=True)
class FunctionSchema:
    """The schema of one tool function and the means to validate calls against it."""

    name: str
    description: str
    parameters: dict[str, Any]
    """The cleaned JSON schema of the arguments object."""
    model: type[BaseModel]
    """The pydantic model that validates the arguments (fields aliased to parameter names)."""
    positional_only: tuple[str, ...] = ()
    """Parameters that must be passed positionally, in this order."""
    strict: bool = False
    """Validate in pydantic's strict mode, nested models included."""
    forbid_nested_extra: bool = True
    """Refuse unknown keys in nested models too (False when one of them allows or ignores
    them in its own config: pydantic's validation-time setting would override that)."""

    @property
    def spec(self) -> ToolSpec:
        """The OpenAI function spec: a fresh copy, so a caller cannot change the tool."""
        return copy.deepcopy(
            {"name": self.name, "description": self.description, "parameters": self.parameters}
        )

    def validate(self, arguments: str) -> tuple[list[Any], dict[str, Any]]:
        """Parse and validate raw JSON ``arguments`` into ``(args, kwargs)`` for the function.

        Raises ``ToolCallError`` (kind ``invalid_json`` or ``invalid_arguments``) with a short
        sentence that names the argument and what was expected.
        """
        text = arguments.strip() or "{}"
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ToolCallError(
                ToolErrorKind.INVALID_JSON,
                f"arguments are not valid JSON ({exc.msg} at line {exc.lineno} column "
                f"{exc.colno}); send a JSON object",
            ) from None
        if not isinstance(value, dict):
            raise ToolCallError(
                ToolErrorKind.INVALID_JSON,
                f"arguments must be a JSON object, got {_json_type(value)}",
            )
        try:
            validated = self.model.model_validate_json(
                text,
                strict=self.strict or None,
                extra="forbid" if self.forbid_nested_extra else None,
            )
        except ValidationError as exc:
            raise ToolCallError(
                ToolErrorKind.INVALID_ARGUMENTS, self._describe_errors(exc, value)
            ) from None
        values = {
            info.alias: getattr(validated, field) for field, info in self.model.model_fields.items()
        }
        args = [values.pop(name) for name in self.positional_only]
        return args, values

    def _describe_errors(self, exc: ValidationError, arguments: dict[str, Any]) -> str:
        errors = exc.errors(include_url=False)
        # A value that fits no member of a union fails once per member, at locations tagged
        # with the member (``key.int``, ``key.str``): say it once, naming the whole union.
        unions: dict[tuple[int | str, ...], int] = {}
        for error in errors:
            loc, _ = _resolve_location(self.parameters, error["loc"])
            if len(loc) < len(error["loc"]) and error["type"] != "extra_forbidden":
                unions[loc] = unions.get(loc, 0) + 1
        sentences: list[str] = []
        for error in errors:
            loc, schema = _resolve_location(self.parameters, error["loc"])
            if unions.get(loc, 0) > 1 and len(loc) < len(error["loc"]):
                where = f'argument "{_format_loc(loc)}"' if loc else "arguments"
                got = _preview(_value_at(arguments, loc))
                sentence = f"{where} must be {describe_type(schema)}, got {got}"
            else:
                sentence = self._describe_error(error)
            if sentence not in sentences:
                sentences.append(sentence)
        shown = sentences[:MAX_REPORTED_ERRORS]
        hidden = len(sentences) - len(shown)
        if hidden:
            shown.append(f"and {hidden} more problem{'s' * (hidden > 1)}")
        return "; ".join(shown)

    def _describe_error(self, error: Any) -> str:
        kind = error["type"]
        if kind == "extra_forbidden":
            parent, _ = _resolve_location(self.parameters, error["loc"][:-1])
            key = _preview(error["loc"][-1])
            if not parent:
                valid = ", ".join(f'"{name}"' for name in self.parameters["properties"])
                return f"unexpected argument {key} (valid arguments: {valid or 'none'})"
            return f'argument "{_format_loc(parent)}" has an unexpected key {key}'
        loc, schema = _resolve_location(self.parameters, error["loc"])
        where = f'argument "{_format_loc(loc)}"' if loc else "arguments"
        if kind == "missing":
            return f"{where} is required ({describe_type(schema)})"
        # pydantic says "Input should be ...", "List should have ...": make it "must ..."
        message, rewritten = _SHOULD.subn("must ", str(error["msg"]), count=1)
        if not rewritten:
            message = _VALIDATOR_PREFIX.sub("", message)
            message = "is invalid: " + message[:1].lower() + message[1:]
        got = _preview(error.get("input"))
        if ", got " in message:  # "must be a valid integer, got a number with a fractional part"
            return f"{where} {message} ({got})"
        return f"{where} {message}, got {got}"


def function_schema(
    fn: Callable[..., Any],
    *,
    name: str | None = None,
    description: str | None = None,
    strict: bool = False,
    skip_first: bool = False,
) -> FunctionSchema:
    """Build the schema of ``fn`` from its type hints and docstring.

    ``skip_first`` drops the first parameter (``self`` or ``cls`` of a method). ``strict``
    selects pydantic's strict mode (no ``"3" -> 3`` coercion) and declares
    ``additionalProperties: false``. Raises ``ToolDefinitionError`` for signatures a model
    cannot call: ``*args``, ``**kwargs``, parameters without a type annotation, types with no
    JSON schema.
    """
    target = underlying_function(fn)
    label = function_label(fn)
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise ToolDefinitionError(
            f"tool function {label}: cannot read its signature ({exc})"
        ) from None
    hints = _parameter_hints(target, label)

    doc = docstring_parser.parse(_docstring(target))
    param_docs = {p.arg_name: " ".join((p.description or "").split()) for p in doc.params}

    params = list(signature.parameters.values())
    if skip_first:
        params = params[1:]
    if isinstance(fn, functools.partial):  # arguments the partial fixes are not the model's
        params = [param for param in params if param.name not in fn.keywords]
    fields: dict[str, Any] = {}
    positional_only: list[str] = []
    for index, param in enumerate(params):
        where = f'tool function {label}, parameter "{param.name}"'
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            star = "*" if param.kind is param.VAR_POSITIONAL else "**"
            raise ToolDefinitionError(
                f"{where}: {star}{param.name} is not supported; a model calls tools with "
                "named arguments, so declare each one explicitly"
            )
        if param.name not in hints:
            if index == 0 and param.name == "cls":
                raise ToolDefinitionError(
                    f"{where}: looks like a classmethod; put @tool on top, above @classmethod "
                    "(@tool must be the outermost decorator)"
                )
            raise ToolDefinitionError(
                f"{where}: needs a type annotation (e.g. `{param.name}: str`) so the model "
                "knows what to send"
            )
        if param.kind is param.POSITIONAL_ONLY:
            positional_only.append(param.name)
        annotation, field = _field(hints[param.name], param, param_docs.get(param.name, ""))
        _check_json_schema(annotation, where)
        fields[f"p{index}"] = (annotation, field)

    model_name = "".join(part.title() for part in (name or function_name(fn)).split("_"))
    model = create_model(
        f"{model_name}Arguments",
        __config__=ConfigDict(extra="forbid", strict=strict),
        **fields,
    )
    try:
        raw_schema = model.model_json_schema()
    except Exception as exc:
        raise ToolDefinitionError(
            f"tool function {label}: cannot build a JSON schema ({type(exc).__name__}: {exc})"
        ) from None
    parameters = clean_json_schema(raw_schema)
    parameters.pop("additionalProperties", None)  # extra arguments are refused either way
    if strict:
        parameters["additionalProperties"] = False
    return FunctionSchema(
        name=name or function_name(fn),
        description=description if description is not None else summary(doc),
        parameters=parameters,
        model=model,
        positional_only=tuple(positional_only),
        strict=strict,
        forbid_nested_extra=all(
            _own_config(cls).get("extra", "forbid") == "forbid"
            for cls in _classes(model.__pydantic_core_schema__)
        ),
    )


def _classes(core_schema: Any) -> Iterator[type]:
    """The classes (models, dataclasses, TypedDicts) a pydantic core schema validates into."""
    if isinstance(core_schema, dict):
        if isinstance(core_schema.get("cls"), type):
            yield core_schema["cls"]
        for value in core_schema.values():
            yield from _classes(value)
    elif isinstance(core_schema, list):
        for value in core_schema:
            yield from _classes(value)


def _own_config(cls: type) -> dict[str, Any]:
    if issubclass(cls, BaseModel):
        return dict(cls.model_config)
    return dict(getattr(cls, "__pydantic_config__", None) or {})


def underlying_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The function whose hints, name and docstring describe ``fn`` (a partial's ``func``)."""
    return fn.func if isinstance(fn, functools.partial) else fn


def function_label(fn: Callable[..., Any]) -> str:
    """How errors name ``fn``: its qualified name."""
    target = underlying_function(fn)
    return getattr(target, "__qualname__", None) or type(target).__qualname__


def _parameter_hints(fn: Callable[..., Any], label: str) -> dict[str, Any]:
    """The resolved type hints of ``fn``'s parameters. The return annotation is never read: it
    plays no part in the schema, and may name a type imported only for type checkers."""
    # a callable object keeps its hints on __call__
    annotated = fn if inspect.isroutine(fn) else type(fn).__call__
    annotations = getattr(annotated, "__annotations__", None) or {}
    parameters = {key: value for key, value in annotations.items() if key != "return"}
    unwrapped = inspect.unwrap(annotated)
    try:
        return typing.get_type_hints(
            types.SimpleNamespace(__annotations__=parameters),
            globalns=getattr(unwrapped, "__globals__", {}),
            include_extras=True,
        )
    except Exception as exc:  # NameError for unresolvable forward references, and friends
        hint = ""
        if isinstance(exc, NameError):
            hint = "; types named in string annotations must be module-level names"
        raise ToolDefinitionError(
            f"tool function {label}: cannot resolve its type hints "
            f"({type(exc).__name__}: {exc}){hint}"
        ) from None


_SECTION = re.compile(r"^(Args|Arguments|Parameters|Params):[ \t]*$")


def _docstring(fn: Callable[..., Any]) -> str:
    """``fn``'s docstring, ready for docstring_parser, including one that has no summary and
    starts with its ``Args:`` section."""
    text = inspect.getdoc(fn) or ""
    header, _, body = text.partition("\n")
    if _SECTION.match(header) and body[:1] not in ("", " ", "\t"):
        # `"""Args:` on the quotes' line: cleandoc dedented the entries to the header's level
        body = textwrap.indent(body, "    ")
    # a blank first line, which getdoc strips, tells docstring_parser there is no summary
    return "\n" + (header + "\n" + body if body else header)


def summary(doc: docstring_parser.Docstring) -> str:
    """The first paragraph of a docstring, on one line."""
    text = doc.short_description or ""
    if doc.long_description and not doc.blank_after_short_description:
        text += "\n" + doc.long_description.split("\n\n", 1)[0]
    return " ".join(text.split())


def function_name(fn: Callable[..., Any]) -> str:
    """The tool name ``fn`` gets by default."""
    target = underlying_function(fn)
    return getattr(target, "__name__", None) or type(target).__name__


def _field(hint: Any, param: inspect.Parameter, doc_description: str) -> tuple[Any, FieldInfo]:
    """Split ``Annotated[T, "text", Field(...)]`` into a type pydantic understands and a Field
    that carries the default and the description (annotation text beats the docstring)."""
    annotation, description = hint, None
    if typing.get_origin(hint) is Annotated:
        base, *metadata = typing.get_args(hint)
        texts = [m for m in metadata if isinstance(m, str)]
        kept = [m for m in metadata if not isinstance(m, str)]
        annotation = Annotated[base, *kept] if kept else base
        described = [m.description for m in kept if isinstance(m, FieldInfo) and m.description]
        description = texts[-1] if texts else (described[-1] if described else None)
    extra: dict[str, Any] = {"alias": param.name}
    if description is None and doc_description:
        extra["description"] = doc_description
    elif description is not None:
        extra["description"] = description
    default = PydanticUndefined if param.default is param.empty else param.default
    if default is None and not _accepts_none(annotation):
        annotation = annotation | None  # `x: int = None` accepts the null it shows
    return annotation, Field(default, **extra)


def _accepts_none(annotation: Any) -> bool:
    if annotation in (None, type(None), Any, object):
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _accepts_none(args[0])
    if origin in (Union, types.UnionType):
        return any(_accepts_none(arg) for arg in args)
    return origin is Literal and None in args


def _check_json_schema(annotation: Any, where: str) -> None:
    try:
        TypeAdapter(annotation).json_schema()
    except Exception as exc:
        raise ToolDefinitionError(
            f"{where}: type {annotation!r} has no JSON schema ({type(exc).__name__}); use JSON "
            "types, Literal, Enum, lists, dicts or pydantic models"
        ) from None


# ---- schema cleaning ---------------------------------------------------------------------

_SCHEMA_MAPS = ("properties", "$defs", "patternProperties")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties", "not", "contains")


def clean_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Remove pydantic's noise from a JSON schema, and write it as chat templates expect.

    Drops auto-generated ``title``s and inlines every ``$defs`` entry that is not recursive
    (recursive models keep a minimal ``$defs``). Follows ``transformers.get_json_schema``,
    whose output chat templates were written for (many print ``type`` and ``enum`` of each
    parameter and nothing else): ``anyOf: [X, {type: null}]`` becomes X with ``nullable:
    true``, a union of plain types a ``type`` list, and ``const`` a one-value ``enum``.
    """
    defs = schema.get("$defs", {})
    recursive = {name for name in defs if _reaches(defs, name, name, set())}

    def clean(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        node = dict(node)
        target = node.get("$ref", "").removeprefix("#/$defs/")
        if target in defs and target not in recursive:
            del node["$ref"]
            return clean({**defs[target], **node})  # the field's own keys win (description)
        node.pop("title", None)
        for key in _SCHEMA_MAPS:
            if isinstance(node.get(key), dict):
                node[key] = {k: clean(v) for k, v in node[key].items()}
        for key in _SCHEMA_LISTS:
            if isinstance(node.get(key), list):
                node[key] = [clean(v) for v in node[key]]
        for key in _SCHEMA_VALUES:
            if isinstance(node.get(key), dict):
                node[key] = clean(node[key])
        return _type_first(_as_enum(_merge_union(node)))

    cleaned = clean({k: v for k, v in schema.items() if k != "$defs"})
    if recursive:
        cleaned["$defs"] = {name: clean(defs[name]) for name in sorted(recursive)}
    return cleaned


def _type_first(node: dict[str, Any]) -> dict[str, Any]:
    """``{"type", "description", ...}`` first: the order a reader (and a model) expects."""
    head = {key: node[key] for key in ("type", "description") if key in node}
    return {**head, **{k: v for k, v in node.items() if k not in head}}


def _reaches(defs: dict[str, Any], start: str, goal: str, seen: set[str]) -> bool:
    for ref in _refs(defs.get(start, {})):
        if ref == goal:
            return True
        if ref not in seen:
            seen.add(ref)
            if _reaches(defs, ref, goal, seen):
                return True
    return False


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            yield ref.removeprefix("#/$defs/")
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


_JSON_TYPES = {str: "string", bool: "boolean", int: "integer", float: "number", type(None): "null"}


def _merge_union(node: dict[str, Any]) -> dict[str, Any]:
    """``anyOf`` as ``get_json_schema`` writes a Union: ``{type: null}`` becomes ``nullable:
    true``; one remaining member is written in place (the node's own keys, such as its
    description, win); members that are all ``{type: T}`` become ``type: [T1, T2]``."""
    options = node.get("anyOf")
    if not isinstance(options, list):
        return node
    members = [option for option in options if option != {"type": "null"}]
    if not members:
        return node
    rest = {key: value for key, value in node.items() if key != "anyOf"}
    if len(members) == 1:
        merged = {**members[0], **rest}
    elif all(m.keys() == {"type"} and isinstance(m["type"], str) for m in members):
        names = list(dict.fromkeys(member["type"] for member in members))
        merged = {"type": names[0] if len(names) == 1 else names, **rest}
    else:
        merged = {**rest, "anyOf": members}
    if len(members) < len(options):
        merged["nullable"] = True
    return merged


def _as_enum(node: dict[str, Any]) -> dict[str, Any]:
    """``const: v`` (a one-value Literal) -> ``enum: [v]``, and an ``enum`` always has a
    ``type`` (a list when the values mix JSON types)."""
    if "const" in node:
        node = {**{k: v for k, v in node.items() if k != "const"}, "enum": [node["const"]]}
    values = node.get("enum")
    if "type" not in node and isinstance(values, list) and values:
        names = list(dict.fromkeys(_JSON_TYPES.get(type(value)) for value in values))
        if None not in names:
            node = {"type": names[0] if len(names) == 1 else names, **node}
    return node


# ---- readable errors ---------------------------------------------------------------------


def describe_type(schema: dict[str, Any] | None) -> str:
    """A short English name for what a schema accepts: ``string``, ``array of integer``,
    ``one of "a", "b"``."""
    if not schema:
        return "any value"
    if schema.get("nullable"):
        rest = {key: value for key, value in schema.items() if key != "nullable"}
        return f"{describe_type(rest)} or null"
    if "enum" in schema:
        return "one of " + ", ".join(json.dumps(v) for v in schema["enum"])
    if "const" in schema:
        return json.dumps(schema["const"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " or ".join(describe_type(option) for option in schema[key])
    kind = schema.get("type")
    if isinstance(kind, list):
        return " or ".join(describe_type({**schema, "type": k}) for k in kind)
    if kind == "array" and isinstance(schema.get("items"), dict):
        return f"array of {describe_type(schema['items'])}"
    if kind is None and "$ref" in schema:
        return "object"
    return str(kind) if kind else "any value"


def _resolve_location(
    schema: dict[str, Any], loc: Sequence[int | str]
) -> tuple[tuple[int | str, ...], dict[str, Any] | None]:
    """Follow a pydantic error location through the schema as far as it goes. Locations can
    carry union member tags (``int``, ``list[int]``) that are no keys; they end the walk."""
    defs = schema.get("$defs", {})
    path: list[int | str] = []
    node: dict[str, Any] | None = schema
    for part in loc:
        child = _child(node, part, defs)
        if child is None:
            break
        path.append(part)
        node = child
    return tuple(path), node


def _child(node: dict[str, Any] | None, part: int | str, defs: dict[str, Any]) -> Any:
    if node is None:
        return None
    if "$ref" in node:
        node = defs.get(node["$ref"].removeprefix("#/$defs/"), {})
    for option in node.get("anyOf", []):
        found = _child(option, part, defs)
        if found is not None:
            return found
    if isinstance(part, str):
        if part in node.get("properties", {}):
            return node["properties"][part]
        extra = node.get("additionalProperties")
        return extra if isinstance(extra, dict) else None
    if isinstance(node.get("items"), dict):
        return node["items"]
    prefix = node.get("prefixItems")
    if isinstance(prefix, list) and part < len(prefix):
        return prefix[part]
    return None


def _value_at(value: Any, loc: Sequence[int | str]) -> Any:
    """The part of the parsed arguments at ``loc`` (``None`` where there is none)."""
    for part in loc:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            return None
    return value


def _format_loc(loc: Sequence[int | str]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _preview(value: Any, limit: int = 60) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)
