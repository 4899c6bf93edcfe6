"""Reading a task's ``environment/Dockerfile`` into steps the local backend can replay.

The local backend has no image: the host's root (read-only) stands in for ``FROM``. What it
can honour is the part of a Dockerfile that configures a workspace on top of that root:

    WORKDIR        -> mkdir -p + the sandbox's persistent cwd
    ENV, ARG       -> exported variables (ARG only while building)
    COPY / ADD     -> files from the environment folder into writable directories
                      (ADD also unpacks local tar archives; ADD <url> is refused)
    RUN            -> run inside the sandbox at creation; failure refuses the Dockerfile
    USER root      -> nothing to do
    LABEL, EXPOSE, CMD, ENTRYPOINT, VOLUME, STOPSIGNAL, HEALTHCHECK, MAINTAINER, ONBUILD
                   -> metadata without effect on the filesystem: ignored

Anything else (multi-stage builds, ``COPY --from``, another ``USER``, ``SHELL``, heredocs,
unknown instructions or flags) raises ``UnsupportedDockerfileError`` naming the line and
pointing to the docker backend. Parsing never touches a sandbox, so a refused Dockerfile is
refused before anything is built.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sandboxes.errors import UnsupportedDockerfileError

METADATA = frozenset(
    {
        "LABEL",
        "EXPOSE",
        "CMD",
        "ENTRYPOINT",
        "VOLUME",
        "STOPSIGNAL",
        "HEALTHCHECK",
        "MAINTAINER",
        "ONBUILD",
    }
)
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


@dataclass(frozen=True)
class Workdir:
    line: int
    path: str


@dataclass(frozen=True)
class Env:
    line: int
    values: dict[str, str]


@dataclass(frozen=True)
class Copy:
    """Copy ``sources`` (files or folders of the environment folder) to ``dest``.

    Docker's rules: a folder's *contents* are copied; ``dest`` is a folder when it ends in
    ``/``, when there are several sources, or when it already is one in the sandbox."""

    line: int
    sources: tuple[Path, ...]
    dest: str
    dest_is_dir: bool
    chmod: int | None = None
    extract: bool = False
    """ADD of a local tar archive: unpack into ``dest``."""


@dataclass(frozen=True)
class Run:
    line: int
    command: str
    build_env: dict[str, str]
    """ARG values in effect (exported for this step only)."""


Step = Workdir | Env | Copy | Run


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str


def read_instructions(path: Path) -> list[Instruction]:
    """Split a Dockerfile into instructions (comments dropped, continuations joined)."""
    lines = path.read_text().splitlines()
    instructions: list[Instruction] = []
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(lines, start=1):
        stripped = raw.strip()
        if not buffer:
            if not stripped:
                continue
            if stripped.startswith("#"):
                directive = re.match(r"#\s*escape\s*=\s*(\S)", stripped)
                if directive and directive.group(1) != "\\" and not instructions:
                    raise UnsupportedDockerfileError(
                        path, number, f"escape character {directive.group(1)!r} is not supported"
                    )
                continue
            start = number
        elif stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1])
            continue
        buffer.append(stripped)
        text = " ".join(part.strip() for part in buffer).strip()
        buffer = []
        if not text:
            continue
        keyword, _, args = text.partition(" ")
        instructions.append(Instruction(start, keyword.upper(), args.strip()))
    if buffer:
        raise UnsupportedDockerfileError(path, start, "the last instruction ends with '\\'")
    return instructions


def parse(path: Path, context: Path, workdir: str = "/") -> list[Step]:
    """The steps the local backend replays for the Dockerfile at ``path``; refuses what it
    cannot honour. ``workdir`` is where relative paths start (the base image's WORKDIR)."""
    steps: list[Step] = []
    variables: dict[str, str] = {}  # ENV and ARG values, for substitution
    build_args: dict[str, str] = {}
    seen_from = False
    current = workdir

    def refuse(instruction: Instruction, reason: str) -> UnsupportedDockerfileError:
        return UnsupportedDockerfileError(path, instruction.line, reason)

    for ins in read_instructions(path):
        args = ins.args
        if not seen_from and ins.keyword not in ("FROM", "ARG"):
            raise refuse(ins, f"{ins.keyword} before FROM")
        if "<<" in args and re.search(r"<<-?\s*[\"']?[A-Za-z_]", args) and ins.keyword != "RUN":
            raise refuse(ins, f"{ins.keyword} with a heredoc is not supported")
        if ins.keyword == "FROM":
            if seen_from:
                raise refuse(ins, "multi-stage builds (a second FROM) are not supported")
            seen_from = True
        elif ins.keyword == "ARG":
            for name, value in _assignments(ins, args, refuse, allow_bare=True).items():
                value = variables.get(name, value) if value is None else value
                if value is not None:
                    variables[name] = build_args[name] = value
        elif ins.keyword == "ENV":
            # values refer to variables as they were before this instruction, like docker
            values = {
                k: _substitute(v or "", variables).replace(_DOLLAR, "$")
                for k, v in _assignments(ins, args.replace("\\$", _DOLLAR), refuse).items()
            }
            variables.update(values)
            steps.append(Env(ins.line, values))
        elif ins.keyword == "WORKDIR":
            target = _substitute(_unquote(args), variables)
            current = str(PurePosixPath(current, target))
            steps.append(Workdir(ins.line, current))
        elif ins.keyword in ("COPY", "ADD"):
            steps.append(_copy(ins, path, context, current, variables, refuse))
        elif ins.keyword == "RUN":
            if re.match(r"^\s*<<", args) or re.search(r"<<-?\s*[\"']?EOF", args):
                raise refuse(ins, "RUN with a heredoc (BuildKit syntax) is not supported")
            if args.startswith("--"):
                raise refuse(ins, f"RUN flags ({args.split()[0]}) are not supported")
            command = _exec_form(args)
            command = shlex.join(command) if command is not None else args
            steps.append(Run(ins.line, command, dict(build_args)))
        elif ins.keyword == "USER":
            if _unquote(args).split(":")[0] not in ("root", "0"):
                raise refuse(ins, f"USER {args} is not supported (commands run as root)")
        elif ins.keyword == "SHELL":
            raise refuse(ins, "SHELL is not supported (commands run with bash)")
        elif ins.keyword in METADATA:
            continue
        else:
            raise refuse(ins, f"unknown instruction {ins.keyword}")
    return steps


def _copy(ins, path, context, current, variables, refuse) -> Copy:
    words = _exec_form(ins.args)
    if words is None:
        words = shlex.split(ins.args)
    chmod: int | None = None
    while words and words[0].startswith("--"):
        flag, _, value = words.pop(0).partition("=")
        if flag == "--from":
            raise refuse(ins, "COPY --from (multi-stage builds) is not supported")
        if flag == "--chmod":
            try:
                chmod = int(value, 8)
            except ValueError:
                raise refuse(ins, f"--chmod={value} is not an octal mode") from None
        elif flag not in ("--chown", "--link"):
            raise refuse(ins, f"{ins.keyword} flag {flag} is not supported")
    if len(words) < 2:
        raise refuse(ins, f"{ins.keyword} needs at least a source and a destination")
    *raw_sources, raw_dest = (_substitute(w, variables) for w in words)
    root = context.resolve()
    sources: list[Path] = []
    for raw in raw_sources:
        if re.match(r"^[a-z]+://", raw) or raw.startswith("git@"):
            raise refuse(ins, f"{ins.keyword} from a URL ({raw}) is not supported (no network)")
        matches = sorted(root.glob(raw.lstrip("/"))) if any(c in raw for c in "*?[") else []
        candidates = matches or [root / raw.lstrip("/")]
        for candidate in candidates:
            resolved = candidate.resolve()
            if resolved != root and root not in resolved.parents:
                raise refuse(ins, f"source {raw} is outside the environment folder {context}")
            if not resolved.exists():
                raise refuse(ins, f"source {raw} does not exist in {context}")
            sources.append(resolved)
    dest = str(PurePosixPath(current, raw_dest))
    extract = (
        ins.keyword == "ADD" and len(sources) == 1 and sources[0].name.endswith(ARCHIVE_SUFFIXES)
    )
    dest_is_dir = raw_dest.endswith("/") or len(sources) > 1 or extract or sources[0].is_dir()
    return Copy(ins.line, tuple(sources), dest, dest_is_dir, chmod, extract)


def _exec_form(args: str) -> list[str] | None:
    if not args.startswith("["):
        return None
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    return [str(v) for v in value] if isinstance(value, list) else None


def _assignments(ins, args, refuse, allow_bare: bool = False) -> dict[str, str | None]:
    try:
        words = shlex.split(args)
    except ValueError as exc:
        raise refuse(ins, f"cannot parse {ins.keyword} arguments: {exc}") from None
    if not words:
        raise refuse(ins, f"{ins.keyword} without arguments")
    if "=" not in words[0]:
        if allow_bare:
            return {w: None for w in words}
        # legacy form: ENV KEY value with spaces
        return {words[0]: args.split(None, 1)[1] if len(words) > 1 else ""}
    values: dict[str, str | None] = {}
    for word in words:
        name, eq, value = word.partition("=")
        if not eq and not allow_bare:
            raise refuse(ins, f"expected NAME=VALUE, got {word!r}")
        values[name] = value if eq else None
    return values


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


_DOLLAR = "\x00dollar\x00"
"""Stands for an escaped ``\\$`` while quotes are parsed."""
_VARIABLE = re.compile(r"\\\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::([-+])([^}]*))?\}|\$([A-Za-z_]\w*)")


def _substitute(text: str, variables: dict[str, str]) -> str:
    """Docker's substitution: ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR:+alt}``."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "\\$":
            return "$"
        name = match.group(1) or match.group(4)
        value = variables.get(name, "")
        if match.group(2) == "-":
            return value or match.group(3)
        if match.group(2) == "+":
            return match.group(3) if value else ""
        return value

    return _VARIABLE.sub(replace, text)


def host_provides(command: str) -> bool:
    """True when ``command`` only installs Debian packages with apt and the host already has
    every one of them (then the step is satisfied without running it: the host root is the
    base image). Anything else returns False and the step runs as written."""
    segments = [s.strip() for s in re.split(r"&&|;|\n", command) if s.strip()]
    packages: list[str] = []
    for segment in segments:
        words = segment.split()
        if words[:2] == ["rm", "-rf"] and all(
            w.startswith("/var/lib/apt/lists") for w in words[2:]
        ):
            continue
        if words[0] in ("DEBIAN_FRONTEND=noninteractive",):
            words = words[1:]
        if not words or words[0] not in ("apt-get", "apt"):
            return False
        rest = [w for w in words[1:] if not w.startswith("-")]
        if not rest or rest[0] not in ("update", "install", "clean", "autoclean"):
            return False
        if rest[0] == "install":
            if any(not re.match(r"^[a-z0-9][a-z0-9+.-]*$", p) for p in rest[1:]):
                return False  # versions, globs, variables: not worth guessing
            packages.extend(rest[1:])
    if not packages:
        return False
    try:
        query = subprocess.run(
            ["dpkg-query", "-W", "-f=${db:Status-Status}\n", *packages],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:  # not a dpkg host: the step runs as written (and is refused if it fails)
        return False
    statuses = query.stdout.split()
    return (
        query.returncode == 0 and len(statuses) == len(packages) and set(statuses) == {"installed"}
    )
