"""The ``key=value`` command line every recipe shares.

A recipe declares its knobs as a pydantic model and hands it to :func:`run_cli`::

    class Config(RecipeConfig):
        learning_rate: float = 1e-4
        \"\"\"Adam learning rate.\"\"\"
        teacher: TeacherConfig = TeacherConfig()     # nested model -> teacher.model_name=...

    if __name__ == "__main__":
        run_cli(main, Config)

    $ python -m recipes.x learning_rate=3e-5 teacher.model_name=Qwen/Qwen3-8B config=base.toml

Values are parsed by the field's type: numbers, bools (``true/false/1/0/yes/no``), ``null`` or
``none`` for None, lists as JSON or comma-separated, dicts and nested models as JSON,
Literals and Enums checked against their allowed values, and ``module:attr`` imported for
fields typed as callables or classes (or marked :class:`Importable`). ``config=FILE``
(.json, .toml, .yaml) loads a base config that the other arguments override. ``--help`` lists
every key with its type, default and description; an unknown key suggests the closest ones.
A config that inherits keys meaning nothing for its recipe lists them in ``excluded_keys``, each
with the reason: they leave ``--help``, and setting one is an error that gives the reason.
:func:`dump_config` writes the final config as JSON that ``config=`` reads back.
"""

from __future__ import annotations

import collections.abc
import difflib
import enum
import importlib
import inspect
import json
import sys
import textwrap
import tomllib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import anyio
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import core_schema

CONFIG_KEY = "config"
_NULLS = {"null", "none"}


class ConfigError(ValueError):
    """A bad command line or config file. The message names the key, the value and what was
    expected; the CLI prints it without a traceback and exits with status 2."""


class RecipeConfig(BaseModel):
    """Base for recipe configs: unknown fields are errors, and a string literal right under a
    field is its description (shown by ``--help``)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    excluded_keys: ClassVar[Mapping[str, str]] = {}
    """Inherited fields that mean nothing in this recipe, each with the reason (e.g. RL
    inherits the trainer's distillation knobs). ``--help`` leaves them out; setting one, on the
    command line, in a config file or from Python, is an error that gives the reason. They keep
    their defaults, which the shared code may read; ``dump_config`` leaves them out."""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        unknown = sorted(set(cls.excluded_keys) - set(cls.model_fields))
        if unknown:
            raise TypeError(f"{cls.__name__}.excluded_keys names no field: {', '.join(unknown)}")

    @model_validator(mode="before")
    @classmethod
    def _reject_excluded_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            given = [name for name in cls.excluded_keys if name in data]
            if given:
                raise ValueError(
                    "; ".join(_excluded_message(name, cls.excluded_keys[name]) for name in given)
                )
        return data


def _excluded_message(key: str, reason: str) -> str:
    return f"key {key!r} does not apply to this recipe: {reason}"


# ----------------------------------------------------------------------------- imports


def import_object(reference: str) -> Any:
    """``"package.module:attr.sub"`` -> the object."""
    module_name, sep, attr_path = reference.partition(":")
    if not sep or not module_name or not attr_path:
        raise ConfigError(f"expected 'module:attr', got {reference!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"cannot import {reference!r}: {error}") from error
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"cannot import {reference!r}: no attribute {part!r}") from None
    return obj


def object_reference(obj: Any) -> str:
    """The ``module:qualname`` that :func:`import_object` turns back into ``obj``."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or "<locals>" in qualname:
        raise TypeError(f"{obj!r} has no importable 'module:attr' reference")
    return f"{module}:{qualname}"


def _import_if_str(value: Any) -> Any:
    return import_object(value) if isinstance(value, str) else value


class Importable:
    """Marks a field whose value is any Python object named ``module:attr`` (a factory, a
    Protocol implementation), e.g. ``Annotated[SandboxFactory | None, Importable()]``. Strings
    are imported when validated; objects pass as they are; JSON dumps write the reference."""

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            _import_if_str,
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda v: v if v is None or isinstance(v, str) else object_reference(v),
                when_used="json",
            ),
        )


# ----------------------------------------------------------------------------- types


def _strip_annotated(annotation: Any) -> tuple[Any, tuple[Any, ...]]:
    if typing.get_origin(annotation) is typing.Annotated:
        base, *metadata = typing.get_args(annotation)
        inner, more = _strip_annotated(base)
        return inner, (*metadata, *more)
    return annotation, ()


def _union_members(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _union_members(arg)]
    return [annotation]


def _is_model(annotation: Any) -> bool:
    return inspect.isclass(annotation) and issubclass(annotation, BaseModel)


def _is_importable(annotation: Any, metadata: tuple[Any, ...] = ()) -> bool:
    if any(isinstance(m, Importable) for m in metadata):
        return True
    origin = typing.get_origin(annotation)
    return annotation in (collections.abc.Callable, typing.Callable, type) or origin in (
        collections.abc.Callable,
        type,
    )


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The model behind ``Model`` or ``Model | None``, whose fields become dotted keys."""
    members = [m for m in _union_members(_strip_annotated(annotation)[0]) if m is not type(None)]
    return members[0] if len(members) == 1 and _is_model(members[0]) else None


def _type_name(annotation: Any, metadata: tuple[Any, ...] = ()) -> str:
    annotation, more = _strip_annotated(annotation)
    metadata = (*metadata, *more)
    members = _union_members(annotation)
    if _is_importable(annotation, metadata):
        return "module:attr | null" if type(None) in members else "module:attr"
    if len(members) > 1:
        return " | ".join(_type_name(m) for m in members)
    if annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "{" + ", ".join(_show(v) for v in typing.get_args(annotation)) + "}"
    if inspect.isclass(annotation) and issubclass(annotation, enum.Enum):
        return "{" + ", ".join(_show(m.value) for m in annotation) + "}"
    if origin is not None:
        args = ", ".join(
            "..." if a is Ellipsis else _type_name(a) for a in typing.get_args(annotation)
        )
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is Path or (inspect.isclass(annotation) and issubclass(annotation, Path)):
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def _show(value: Any) -> str:
    """A value the way it is typed on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return _show(value.value)
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, BaseModel):
        return json.dumps(dump_config(value))
    if callable(value):
        try:
            return object_reference(value)
        except TypeError:
            return repr(value)
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return repr(value)


# ----------------------------------------------------------------------------- keys


_REQUIRED = object()


class _Key(typing.NamedTuple):
    name: str
    field: FieldInfo
    is_group: bool
    default: Any
    """The effective default (inside a nested default instance, that instance's value)."""


def _keys(model: type[BaseModel], prefix: str = "", parent: Any = None) -> dict[str, _Key]:
    """Every dotted key of a config model: nested models give both a group key (set as JSON)
    and the keys of their fields."""
    found: dict[str, _Key] = {}
    hidden = getattr(model, "excluded_keys", {})
    for name, field in model.model_fields.items():
        if name in hidden:
            continue
        key = prefix + name
        if isinstance(parent, BaseModel):
            default = getattr(parent, name)
        elif field.is_required():
            default = _REQUIRED
        else:
            default = field.get_default(call_default_factory=True)
        nested = _nested_model(field.annotation)
        found[key] = _Key(key, field, nested is not None, default)
        if nested is not None:
            found.update(_keys(nested, key + ".", default))
    return found


def _excluded(model: type[BaseModel], prefix: str = "") -> dict[str, str]:
    """Every dotted key the config (or a nested one) excludes -> why it does not apply."""
    found = {prefix + name: reason for name, reason in getattr(model, "excluded_keys", {}).items()}
    for name, field in model.model_fields.items():
        nested = _nested_model(field.annotation)
        if nested is not None and prefix + name not in found:
            found.update(_excluded(nested, f"{prefix}{name}."))
    return found


def _unknown_key(key: str, keys: dict[str, _Key], excluded: Mapping[str, str]) -> str:
    """Why ``key`` is not a key: it (or the group it is in) is excluded, or it is unknown."""
    parts = key.split(".")
    for end in range(1, len(parts) + 1):
        group = ".".join(parts[:end])
        if group in excluded:
            return _excluded_message(group, excluded[group])
    return _suggest(key, list(keys))


def _suggest(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    leaf = key.rsplit(".", 1)[-1]
    close += [k for k in known if k.rsplit(".", 1)[-1] == leaf and k not in close][:2]
    if close:
        return f"unknown key {key!r}; did you mean {' or '.join(repr(c) for c in close)}?"
    return f"unknown key {key!r} (run with --help to list the keys)"


# ----------------------------------------------------------------------------- values


def _parse_json(key: str, raw: str, what: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{key}={raw!r}: expected {what} as JSON ({error.msg})") from None


def _coerce(key: str, raw: str, field: FieldInfo) -> Any:
    """A command-line string -> the Python value pydantic should validate for ``field``."""
    annotation, metadata = _strip_annotated(field.annotation)
    metadata = (*metadata, *field.metadata)
    members = _union_members(annotation)
    allows_none = type(None) in members or annotation is Any
    if allows_none and raw.strip().lower() in _NULLS:
        return None
    members = [m for m in members if m is not type(None)]
    if _is_importable(annotation, metadata) or any(_is_importable(m) for m in members):
        try:
            return import_object(raw)
        except ConfigError as error:
            raise ConfigError(f"{key}={raw!r}: {error}") from None
    if len(members) != 1:
        return _parse_json(key, raw, "a value") if raw.lstrip()[:1] in "[{" and raw else raw
    target = members[0]
    origin = typing.get_origin(target) or target
    if origin in (list, tuple, set, frozenset, collections.abc.Sequence):
        if raw.lstrip().startswith("["):
            return _parse_json(key, raw, "a list")
        return [item.strip() for item in raw.split(",")] if raw.strip() else []
    if origin in (dict, collections.abc.Mapping) or _is_model(target):
        return _parse_json(key, raw, "an object")
    if target is bool:
        return raw.strip().lower()
    if origin is typing.Literal and not all(isinstance(v, str) for v in typing.get_args(target)):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        if not isinstance(data.get(part), dict):
            data[part] = {}
        data = data[part]
    data[leaf] = value


def _merge_defaults(model: type[BaseModel], data: dict[str, Any]) -> None:
    """A nested model given in part (``teacher.temperature=0.5``) keeps the other values of the
    field's default instance, not just its class defaults."""
    for name, field in model.model_fields.items():
        nested = _nested_model(field.annotation)
        if nested is None or not isinstance(data.get(name), dict):
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            data[name] = _deep_merge(default.model_dump(exclude_unset=True), data[name])
        _merge_defaults(nested, data[name])


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _resolve_imports(
    model: type[BaseModel],
    data: dict[str, Any],
    errors: list[str],
    failed: set[str],
    prefix: str = "",
) -> None:
    """Import the ``module:attr`` strings of callable-typed fields (a config file's too)."""
    for name, field in model.model_fields.items():
        if name not in data:
            continue
        annotation, _ = _strip_annotated(field.annotation)
        members = [m for m in _union_members(annotation) if m is not type(None)]
        if isinstance(data[name], str) and any(_is_importable(m) for m in members):
            try:
                data[name] = import_object(data[name])
            except ConfigError as error:
                errors.append(f"{prefix}{name}={data[name]!r}: {error}")
                failed.add(prefix + name)
        nested = _nested_model(field.annotation)
        if nested is not None and isinstance(data[name], dict):
            _resolve_imports(nested, data[name], errors, failed, f"{prefix}{name}.")


def _drop_unknown_file_keys(
    data: dict[str, Any],
    keys: dict[str, _Key],
    excluded: Mapping[str, str],
    source: Path,
    prefix: str = "",
) -> list[str]:
    """Remove the keys of a config file's ``data`` that are not keys (also inside groups) and
    say why each is not; the rest is validated, so every problem is listed at once."""
    errors = []
    for name, value in list(data.items()):
        dotted = prefix + name
        if dotted not in keys:
            errors.append(f"{source}: {_unknown_key(dotted, keys, excluded)}")
            del data[name]
        elif keys[dotted].is_group and isinstance(value, dict):
            errors.extend(_drop_unknown_file_keys(value, keys, excluded, source, dotted + "."))
    return errors


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A base config from ``.json``, ``.toml`` or ``.yaml``/``.yml`` (nested tables for
    nested models)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(path.read_text())
        elif suffix == ".toml":
            data = tomllib.loads(path.read_text())
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError(
                    f"{path}: YAML configs need PyYAML (pip install pyyaml)"
                ) from None
            data = yaml.safe_load(path.read_text())
        else:
            raise ConfigError(
                f"{path}: unknown config format {suffix!r}; use .json, .toml or .yaml"
            )
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError(f"{path}: cannot parse: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return data


# ----------------------------------------------------------------------------- entry points


def _program() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return f"python -m {spec.name.removesuffix('.__main__')}"
    return Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "recipe"


def format_help(config_cls: type[BaseModel], prog: str | None = None) -> str:
    """Usage, the config's docstring, and every key with its type, default and description."""
    lines = [
        f"usage: {prog or _program()} [key=value ...] [config=FILE.json|.toml|.yaml]",
        "",
    ]
    doc = inspect.getdoc(config_cls)
    if doc and doc != inspect.getdoc(RecipeConfig) and doc != inspect.getdoc(BaseModel):
        lines += [doc.split("\n\n")[0], ""]
    lines.append("keys (nested keys are dotted; values: null, true/false, JSON lists and objects):")
    section = ""
    for key in _keys(config_cls).values():
        field = key.field
        parent = key.name.rpartition(".")[0]
        if key.is_group:
            notes = [field.description or ""]
            if key.default is None:
                notes.append("(default null: off unless one of its keys is set)")
            lines += ["", "  ".join([f"  {key.name}.*", *filter(None, notes)])]
            section = key.name
            continue
        if parent != section:  # back out of a nested group
            lines.append("")
            section = parent
        default = "(required)" if key.default is _REQUIRED else "= " + _show(key.default)
        lines.append(
            f"  {key.name}: {_type_name(field.annotation, tuple(field.metadata))} {default}"
        )
        if field.description:
            lines += textwrap.wrap(
                " ".join(field.description.split()),
                width=100,
                initial_indent=" " * 6,
                subsequent_indent=" " * 6,
            )
    return "\n".join(lines) + "\n"


_PYDANTIC_PREFIXES = ("Value error, ", "Assertion failed, ")
"""What pydantic puts before the message of a ValueError or assert raised in a validator."""


def _describe_error(error: Mapping[str, Any], raw: Mapping[str, str], keys: dict[str, _Key]) -> str:
    """One pydantic error as ``key=value: message``: the message alone, without pydantic's
    prefixes (``Value error, ``), error type, input dump or documentation link."""
    key = ".".join(str(part) for part in error["loc"]) or CONFIG_KEY
    message = error["msg"]
    for prefix in _PYDANTIC_PREFIXES:
        message = message.removeprefix(prefix)
    if error["type"] == "missing":
        field = keys.get(key)
        expected = f" ({_type_name(field.field.annotation)})" if field else ""
        hint = f": {field.field.description}" if field and field.field.description else ""
        return f"missing required key {key!r}{expected}{hint}"
    loc = [str(part) for part in error["loc"]]
    for end in range(len(loc), 0, -1):  # the argument the error is in (seeds.1 -> seeds)
        given = ".".join(loc[:end])
        if given in raw:
            inside = f" (at {'.'.join(loc[end:])})" if end < len(loc) else ""
            return f"{given}={raw[given]!r}{inside}: {message}"
    if error["loc"]:
        return f"{key}={_show(error.get('input'))}: {message}"
    return f"{CONFIG_KEY}: {message}"


def parse_cli[M: BaseModel](config_cls: type[M], argv: Sequence[str] | None = None) -> M:
    """``key=value`` arguments (default ``sys.argv[1:]``) -> a validated ``config_cls``.

    Raises :class:`ConfigError` listing every problem; ``-h``/``--help`` prints the help and
    raises ``SystemExit(0)``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(format_help(config_cls), end="")
        raise SystemExit(0)
    keys = _keys(config_cls)
    excluded = _excluded(config_cls)
    if CONFIG_KEY in keys:
        raise ConfigError(
            f"{config_cls.__name__} has a field named {CONFIG_KEY!r}: the key is reserved"
        )
    errors: list[str] = []
    file_failed = False
    data: dict[str, Any] = {}
    raw: dict[str, str] = {}
    assignments: list[tuple[str, str]] = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            errors.append(f"expected key=value, got {arg!r}")
        elif key == CONFIG_KEY:
            try:
                data = load_config_file(value)
            except ConfigError as error:  # nothing to validate: report the rest and stop
                errors.append(str(error))
                file_failed = True
                continue
            errors.extend(_drop_unknown_file_keys(data, keys, excluded, Path(value)))
        else:
            assignments.append((key, value))
    failed: set[str] = set()  # keys already reported: their validation errors would repeat
    for key, value in assignments:  # after the file, whatever the order: they override it
        if key not in keys:
            errors.append(_unknown_key(key, keys, excluded))
            continue
        try:
            _set(data, key, _coerce(key, value, keys[key].field))
            raw[key] = value
        except ConfigError as error:
            errors.append(str(error))
            failed.add(key)
    if file_failed:
        raise ConfigError("\n".join(errors))
    _merge_defaults(config_cls, data)
    _resolve_imports(config_cls, data, errors, failed)
    try:
        config = config_cls.model_validate(data)
    except ValidationError as error:
        for detail in error.errors(include_url=False):
            key = ".".join(str(part) for part in detail["loc"])
            if not any(key == f or key.startswith(f + ".") for f in failed):
                errors.append(_describe_error(detail, raw, keys))
    if errors:
        raise ConfigError("\n".join(errors))
    return config


def dump_config(config: BaseModel) -> dict[str, Any]:
    """The config as JSON-compatible data (callables and classes as ``module:attr``), which
    ``config=`` and ``model_validate`` read back; excluded keys are left out."""
    return config.model_dump(mode="json", fallback=_json_fallback, exclude=_exclude_tree(config))


def _exclude_tree(config: BaseModel) -> dict[str, Any]:
    """``excluded_keys`` of the config and its nested configs, as ``model_dump``'s exclude."""
    tree: dict[str, Any] = dict.fromkeys(getattr(type(config), "excluded_keys", {}), True)
    for name in type(config).model_fields:
        value = getattr(config, name)
        if name not in tree and isinstance(value, BaseModel) and (nested := _exclude_tree(value)):
            tree[name] = nested
    return tree


def _json_fallback(value: Any) -> Any:
    if callable(value):
        return object_reference(value)
    raise TypeError(f"cannot write {value!r} to JSON")


INTERRUPTED_EXIT = 130
"""Exit status after Ctrl-C: 128 + SIGINT, what shells report for a process SIGINT stopped."""


def interrupted_message(stop: BaseException) -> str:
    """The one line Ctrl-C prints: ``interrupted``, then what the code that was running noted
    on its way out (``add_note`` on the ``KeyboardInterrupt``, or on the cancellation asyncio
    turned into it: a training run says where it stopped and how to resume)."""
    notes: list[str] = []
    error: BaseException | None = stop
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        notes += getattr(error, "__notes__", [])
        error = error.__context__
    return " ".join(["interrupted", *notes]) if notes else "interrupted (Ctrl-C)"


def run_cli[M: BaseModel](
    main: Callable[[M], Any], config_cls: type[M], argv: Sequence[str] | None = None
) -> Any:
    """Parse the command line into ``config_cls`` and call ``main(config)`` (awaited when it is
    async). A ``ConfigError`` — from the command line, or raised by ``main`` for a problem
    only found while building (a missing docker daemon for ``backend=docker``) — prints
    ``error: ...`` to stderr and exits with status 2, without a traceback. Ctrl-C prints
    :func:`interrupted_message` and exits with status 130, without a traceback (clean-up in
    ``finally`` blocks and cancellation handlers has run by then)."""
    try:
        config = parse_cli(config_cls, argv)
        if inspect.iscoroutinefunction(main):
            return anyio.run(main, config)
        return main(config)
    except ConfigError as error:
        print(f"error: {error}\n(run with --help to list every key)", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as stop:
        print(interrupted_message(stop), file=sys.stderr)
        raise SystemExit(INTERRUPTED_EXIT) from None
