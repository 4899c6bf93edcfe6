"""A function's signature and docstring -> a clean JSON schema, and argument validation.

Pydantic does the real work: the parameters become a ``create_model`` model, whose JSON schema
is then cleaned of pydantic's noise (auto titles, ``$defs`` that can be inlined, ``anyOf``
with ``null`` for optionals) so that the model sees a short, standard OpenAI function spec.
Validation errors become one-line sentences a small model can act on.
"""

from __future__ import annotations

import inspect
import json
import re
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import docstring_parser
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from tool_use.errors import ToolCallError, ToolDefinitionError
from tool_use.types import ToolErrorKind, ToolSpec

_SHOULD = re.compile(r"^\w+ should ")

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

    @property
    def spec(self) -> ToolSpec:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

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
            validated = self.model.model_validate_json(text)
        except ValidationError as exc:
            raise ToolCallError(
                ToolErrorKind.INVALID_ARGUMENTS, self._describe_errors(exc)
            ) from None
        values = {
            info.alias: getattr(validated, field) for field, info in self.model.model_fields.items()
        }
        args = [values.pop(name) for name in self.positional_only]
        return args, values

    def _describe_errors(self, exc: ValidationError) -> str:
        sentences: list[str] = []
        for error in exc.errors(include_url=False):
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
            message = "is invalid: " + message[:1].lower() + message[1:]
        return f"{where} {message}, got {_preview(error.get('input'))}"


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
    label = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise ToolDefinitionError(
            f"tool function {label}: cannot read its signature ({exc})"
        ) from None
    # a callable object keeps its hints on __call__
    annotated = fn if inspect.isroutine(fn) else type(fn).__call__
    try:
        hints = typing.get_type_hints(annotated, include_extras=True)
    except Exception as exc:  # NameError for unresolvable forward references, and friends
        hint = ""
        if isinstance(exc, NameError):
            hint = "; types named in string annotations must be module-level names"
        raise ToolDefinitionError(
            f"tool function {label}: cannot resolve its type hints "
            f"({type(exc).__name__}: {exc}){hint}"
        ) from None

    doc = docstring_parser.parse(inspect.getdoc(fn) or "")
    param_docs = {p.arg_name: (p.description or "").strip() for p in doc.params}

    params = list(signature.parameters.values())
    if skip_first:
        params = params[1:]
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
            raise ToolDefinitionError(
                f"{where}: needs a type annotation (e.g. `{param.name}: str`) so the model "
                "knows what to send"
            )
        if param.kind is param.POSITIONAL_ONLY:
            positional_only.append(param.name)
        annotation, field = _field(hints[param.name], param, param_docs.get(param.name, ""))
        _check_json_schema(annotation, where)
        fields[f"p{index}"] = (annotation, field)

    model_name = "".join(part.title() for part in (name or _function_name(fn)).split("_"))
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
        name=name or _function_name(fn),
        description=description if description is not None else summary(doc),
        parameters=parameters,
        model=model,
        positional_only=tuple(positional_only),
    )


def summary(doc: docstring_parser.Docstring) -> str:
    """The first paragraph of a docstring, on one line."""
    text = doc.short_description or ""
    if doc.long_description and not doc.blank_after_short_description:
        text += "\n" + doc.long_description.split("\n\n", 1)[0]
    return " ".join(text.split())


def _function_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


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
    return annotation, Field(default, **extra)


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
    """Remove pydantic's noise from a JSON schema.

    Drops auto-generated ``title``s, inlines every ``$defs`` entry that is not recursive
    (recursive models keep a minimal ``$defs``), and writes ``anyOf: [{type: T}, {type:
    null}]`` as ``type: [T, "null"]``.
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
        return _type_first(_collapse_nullable(node))

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


def _collapse_nullable(node: dict[str, Any]) -> dict[str, Any]:
    """``anyOf: [{type: T, ...}, {type: null}]`` -> ``type: [T, "null"], ...`` where that
    means the same (no enum or const on T, no clashing keys)."""
    options = node.get("anyOf")
    if not isinstance(options, list) or len(options) != 2 or {"type": "null"} not in options:
        return node
    other = options[0] if options[1] == {"type": "null"} else options[1]
    if not isinstance(other.get("type"), str) or "enum" in other or "const" in other:
        return node
    merged = {k: v for k, v in node.items() if k != "anyOf"}
    if set(merged) & set(other):
        return node
    return {**other, **merged, "type": [other["type"], "null"]}


# ---- readable errors ---------------------------------------------------------------------


def describe_type(schema: dict[str, Any] | None) -> str:
    """A short English name for what a schema accepts: ``string``, ``array of integer``,
    ``one of "a", "b"``."""
    if not schema:
        return "any value"
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
