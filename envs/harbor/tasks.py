"""Loading Harbor task directories, dataset folders and local registries, and splitting them.

A *task source* is one of:

- a task directory (``instruction.md``, ``task.toml``, ``environment/``, ``tests/test.sh``);
- a dataset folder: every sub-directory that looks like a task (has ``task.toml``,
  ``instruction.md``, ``tests/`` or ``environment/``) is loaded, and a broken one is an error;
- a local Harbor ``registry.json`` (``PATH.json`` or ``PATH.json:DATASET[@VERSION]``);
- ``bundled``, ``bundled:train`` or ``bundled:test``: the suite shipped in ``envs/harbor/suite``.

Parsing and validation are Harbor's own (``harbor.models.task.task.Task``); on top of that a
task must be something our episodes can run: single-step, Linux, an environment that can be
built, a non-empty instruction. Every problem is reported at load time with the path.
"""

from __future__ import annotations

import fnmatch
import random
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from harbor.models.registry import Registry
from harbor.models.task.config import TaskConfig, TaskOS
from harbor.models.task.task import Task
from harbor.models.task.verifier_mode import (
    VerifierEnvironmentDefinition,
    VerifierEnvironmentMode,
    resolve_task_verifier_mode,
    resolve_verifier_environment_definition,
)
from pydantic import ValidationError

from envs.errors import TaskLoadError, TaskSplitError
from sandboxes.errors import SandboxError
from sandboxes.factory import spec_from_harbor_config
from sandboxes.types import SandboxSpec

SUITE_DIR = Path(__file__).parent / "suite"
"""The bundled task suite (ships with the package)."""

SPLIT_FILE = "split.toml"
"""The bundled suite's train/test split: ``train = [...]`` and ``test = [...]`` task names."""

BUNDLED = "bundled"

_TASK_MARKERS = ("task.toml", "instruction.md", "tests", "environment")


@dataclass(frozen=True, eq=False)
class HarborTask:
    """One loaded Harbor task: Harbor's own ``Task`` plus what episodes need from it."""

    harbor: Task
    """Harbor's parsed task (config, paths, instruction)."""

    @property
    def name(self) -> str:
        return self.harbor.name

    @property
    def path(self) -> Path:
        return self.harbor.task_dir

    @property
    def instruction(self) -> str:
        return self.harbor.instruction

    @property
    def config(self) -> TaskConfig:
        return self.harbor.config

    @property
    def environment_dir(self) -> Path:
        return self.harbor.paths.environment_dir

    @property
    def tests_dir(self) -> Path:
        return self.harbor.paths.tests_dir

    @property
    def solution_dir(self) -> Path:
        return self.harbor.paths.solution_dir

    @property
    def solve_script(self) -> Path | None:
        """``solution/solve.sh`` when the task ships a reference solution."""
        return self.harbor.paths.discovered_solve_path_for(TaskOS.LINUX)

    @cached_property
    def reference_solution(self) -> str | None:
        """The text of ``solution/solve.sh`` (for the privileged teacher view)."""
        script = self.solve_script
        return script.read_text(errors="replace") if script is not None else None

    @cached_property
    def sandbox_spec(self) -> SandboxSpec:
        """The sandbox ``[environment]`` asks for, worked out once (the Dockerfile's WORKDIR,
        the host's ``${VAR}`` values): the load-time check, every episode and ``check`` share
        it. ``SandboxError`` for what no backend here gives (GPUs, an allowlist)."""
        return spec_from_harbor_config(self.name, self.environment_dir, self.config.environment)

    @property
    def agent_timeout_s(self) -> float | None:
        """``[agent].timeout_sec``: the whole agent phase's budget (None: unlimited)."""
        return self.config.agent.timeout_sec

    @property
    def verifier_timeout_s(self) -> float:
        """``[verifier].timeout_sec``."""
        return self.config.verifier.timeout_sec

    @property
    def verifier_mode(self) -> VerifierEnvironmentMode:
        """``shared`` (tests run in the agent's sandbox) or ``separate`` (a fresh sandbox)."""
        return resolve_task_verifier_mode(self.config)

    def verifier_environment(self) -> VerifierEnvironmentDefinition | None:
        """Where a separate verifier runs (Harbor's resolution), None in shared mode."""
        return resolve_verifier_environment_definition(self.config, self.harbor.paths)

    def __repr__(self) -> str:
        return f"HarborTask({self.name!r}, {str(self.path)!r})"


# ---- loading -----------------------------------------------------------------------------


def load_task(path: str | Path) -> HarborTask:
    """Load one task directory; raise ``TaskLoadError`` naming the path and the problem."""
    path = Path(path).expanduser().resolve()
    problem = _task_problem(path)
    if isinstance(problem, str):
        raise TaskLoadError({path: problem})
    return problem


def load_tasks(*sources: str | Path) -> list[HarborTask]:
    """Load every task of every source (see the module docstring), in a stable order.

    All broken tasks are reported together; two tasks with the same name are an error, and a
    task directory that several sources reach (``bundled bundled:train``) is loaded once, so
    it does not weigh double in training."""
    if not sources:
        raise TaskLoadError({Path.cwd(): "no task source given"})
    tasks: dict[Path, HarborTask] = {}
    for source in sources:
        for task in _load_source(source):
            tasks.setdefault(task.path, task)
    _check_unique_names(tasks.values())
    return list(tasks.values())


def load_registry(path: str | Path, dataset: str | None = None) -> list[HarborTask]:
    """Load the tasks of a local Harbor ``registry.json``.

    ``dataset`` is ``NAME`` or ``NAME@VERSION``; without it every dataset in the file is loaded.
    Relative task paths are resolved against the registry file's folder (Harbor resolves them
    against the working directory; ours makes a registry portable). Git-hosted tasks must be
    downloaded first (``harbor download``): there is no network here."""
    path = Path(path).expanduser().resolve()
    try:
        registry = Registry.from_path(path)
    except FileNotFoundError:
        raise TaskLoadError({path: "registry file does not exist"}) from None
    except (ValueError, ValidationError) as exc:
        raise TaskLoadError({path: f"not a valid Harbor registry.json: {_one_line(exc)}"}) from exc
    specs = registry.datasets
    if dataset is not None:
        name, _, version = dataset.partition("@")
        specs = [s for s in specs if s.name == name and (not version or s.version == version)]
        if not specs:
            known = ", ".join(sorted({f"{s.name}@{s.version}" for s in registry.datasets}))
            raise TaskLoadError({path: f"no dataset {dataset!r} in the registry (has: {known})"})
    problems: dict[Path, str] = {}
    tasks: list[HarborTask] = []
    for spec in specs:
        for entry in spec.tasks:
            if entry.git_url is not None:  # one line per task, all under the registry file
                hosted = (
                    f"task {entry.name!r} of dataset {spec.name!r} is hosted at {entry.git_url}; "
                    "download it first (harbor download) and load the local folder"
                )
                problems[path] = f"{problems[path]}; {hosted}" if path in problems else hosted
                continue
            task_dir = entry.path if entry.path.is_absolute() else path.parent / entry.path
            result = _task_problem(task_dir.resolve())
            if isinstance(result, str):
                problems[task_dir.resolve()] = f"(registry task {entry.name!r}) {result}"
            else:
                tasks.append(result)
    if problems:
        raise TaskLoadError(problems)
    if not tasks:
        raise TaskLoadError({path: "the registry lists no tasks"})
    return tasks


def load_dataset(folder: str | Path) -> list[HarborTask]:
    """Load every task directory directly inside ``folder`` (sorted by folder name)."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise TaskLoadError({folder: "is not a directory"})
    candidates = [
        child
        for child in sorted(folder.iterdir())
        if child.is_dir()
        and not child.name.startswith((".", "_"))
        and any((child / marker).exists() for marker in _TASK_MARKERS)
    ]
    if not candidates:
        raise TaskLoadError(
            {folder: "contains no Harbor task directories (sub-folders with task.toml)"}
        )
    problems: dict[Path, str] = {}
    tasks: list[HarborTask] = []
    for child in candidates:
        result = _task_problem(child)
        if isinstance(result, str):
            problems[child] = result
        else:
            tasks.append(result)
    if problems:
        raise TaskLoadError(problems)
    return tasks


def bundled_split() -> TaskSplit:
    """The bundled suite, split as its ``split.toml`` declares."""
    tasks = load_dataset(SUITE_DIR)
    split_path = SUITE_DIR / SPLIT_FILE
    try:
        declared = tomllib.loads(split_path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TaskLoadError({split_path: _one_line(exc)}) from exc
    by_name = {task.name: task for task in tasks}
    train, test = declared.get("train", []), declared.get("test", [])
    unknown = sorted(set(train + test) - set(by_name))
    both = sorted(set(train) & set(test))
    missing = sorted(set(by_name) - set(train) - set(test))
    if unknown or both or missing:
        raise TaskLoadError(
            {
                split_path: "; ".join(
                    part
                    for part in (
                        unknown and f"names tasks that do not exist: {unknown}",
                        both and f"puts tasks in both train and test: {both}",
                        missing and f"leaves tasks out of both lists: {missing}",
                    )
                    if part
                )
            }
        )
    return TaskSplit(train=[by_name[n] for n in train], test=[by_name[n] for n in test])


def _load_source(source: str | Path) -> list[HarborTask]:
    text = str(source)
    if text == BUNDLED:
        return load_dataset(SUITE_DIR)
    if text.startswith(BUNDLED + ":"):
        part = text.split(":", 1)[1]
        split = bundled_split()
        if part == "train":
            return split.train
        if part == "test":
            return split.test
        hint = "use bundled, bundled:train or bundled:test"
        raise TaskLoadError({SUITE_DIR: f"unknown bundled split {part!r}: {hint}"})
    registry, sep, dataset = text.rpartition(":")
    if sep and registry.endswith(".json"):
        return load_registry(registry, dataset or None)
    path = Path(text).expanduser().resolve()
    if path.suffix == ".json":
        return load_registry(path)
    if not path.exists():
        raise TaskLoadError(
            {
                path: "does not exist (expected a task directory, a dataset "
                "folder, a registry.json or 'bundled')"
            }
        )
    if any((path / marker).exists() for marker in ("task.toml", "instruction.md")):
        return [load_task(path)]
    return load_dataset(path)


def _task_problem(path: Path) -> HarborTask | str:
    """The loaded task, or a one-line description of what is wrong with the directory."""
    if not path.is_dir():
        return "does not exist" if not path.exists() else "is not a directory"
    if not (path / "task.toml").is_file():
        return "missing task.toml"
    try:
        task = Task(path)
    except tomllib.TOMLDecodeError as exc:
        return f"task.toml is not valid TOML: {exc}"
    except ValidationError as exc:
        return "task.toml: " + "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
            for err in exc.errors()
        )
    except FileNotFoundError as exc:
        return _missing_file_problem(path, exc)
    except (OSError, ValueError, RuntimeError) as exc:
        return _one_line(exc)
    config = task.config
    if config.steps:
        return "multi-step tasks ([[steps]] in task.toml) are not supported"
    if config.environment.os != TaskOS.LINUX:
        return f"[environment].os = {config.environment.os.value!r}: only linux tasks can run"
    if not task.instruction.strip():
        return "instruction.md is empty"
    env_dir = task.paths.environment_dir
    buildable = config.environment.docker_image or any(
        (env_dir / name).is_file() for name in ("Dockerfile", "docker-compose.yaml")
    )
    if not buildable:
        return (
            "no environment: expected environment/Dockerfile, environment/docker-compose.yaml "
            "or [environment].docker_image in task.toml"
        )
    loaded = HarborTask(task)
    try:  # what no sandbox here can give (GPUs, a network allowlist): now, not hours in
        _ = loaded.sandbox_spec
    except SandboxError as exc:
        return str(exc).removeprefix(f"task {task.name!r}").lstrip(": ")
    except ValueError as exc:  # ${VAR} with no default and no such host variable
        return f"[environment].env: {_one_line(exc)}"
    return loaded


def _missing_file_problem(path: Path, exc: FileNotFoundError) -> str:
    if not (path / "instruction.md").is_file():
        return "missing instruction.md"
    if not (path / "tests" / "test.sh").is_file():
        return "missing tests/test.sh"
    return _one_line(exc)


def _check_unique_names(tasks: Iterable[HarborTask]) -> None:
    seen: dict[str, Path] = {}
    problems: dict[Path, str] = {}
    for task in tasks:
        if task.name in seen and seen[task.name] != task.path:
            problems[task.path] = f"task name {task.name!r} is also used by {seen[task.name]}"
        seen.setdefault(task.name, task.path)
    if problems:
        raise TaskLoadError(problems)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ---- splitting ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSplit:
    """Disjoint train and test task lists."""

    train: list[HarborTask]
    test: list[HarborTask]


def split_tasks(
    tasks: Sequence[HarborTask],
    *,
    train: Sequence[str] | None = None,
    test: Sequence[str] | None = None,
    test_fraction: float | None = None,
    seed: int = 0,
) -> TaskSplit:
    """Split ``tasks`` by names or globs (``train``/``test``) or a seeded ``test_fraction``.

    Patterns are task names or ``fnmatch`` globs; each must match at least one task. With only
    ``test`` (or only ``train``) the other side is the rest. ``test_fraction`` picks
    ``round(fraction * n)`` test tasks (at least one) with ``random.Random(seed)``; it cannot be
    combined with patterns. Both sides must end up non-empty and disjoint."""
    if test_fraction is not None and (train or test):
        raise TaskSplitError("give either train/test name patterns or test_fraction, not both")
    if not tasks:
        raise TaskSplitError("cannot split an empty task list")
    if test_fraction is not None:
        if not 0.0 < test_fraction < 1.0:
            raise TaskSplitError(f"test_fraction must be in (0, 1), got {test_fraction}")
        count = min(max(1, round(test_fraction * len(tasks))), len(tasks) - 1)
        order = sorted(tasks, key=lambda t: t.name)
        picked = {t.name for t in random.Random(seed).sample(order, count)}
        return _checked_split(
            [t for t in tasks if t.name not in picked], [t for t in tasks if t.name in picked]
        )
    if not train and not test:
        raise TaskSplitError("no split given: pass train or test name patterns, or test_fraction")
    train_names = _match(tasks, train, "train") if train else None
    test_names = _match(tasks, test, "test") if test else None
    if train_names is None:
        train_names = {t.name for t in tasks} - (test_names or set())
    if test_names is None:
        test_names = {t.name for t in tasks} - train_names
    overlap = sorted(train_names & test_names)
    if overlap:
        raise TaskSplitError(f"tasks are in both train and test: {overlap}")
    return _checked_split(
        [t for t in tasks if t.name in train_names], [t for t in tasks if t.name in test_names]
    )


def _match(tasks: Sequence[HarborTask], patterns: Sequence[str], side: str) -> set[str]:
    names = [t.name for t in tasks]
    matched: set[str] = set()
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            raise TaskSplitError(f"{side} pattern {pattern!r} matches no task (tasks: {shown})")
        matched.update(hits)
    return matched


def _checked_split(train: list[HarborTask], test: list[HarborTask]) -> TaskSplit:
    if not train:
        raise TaskSplitError("the split leaves no train tasks")
    if not test:
        raise TaskSplitError("the split leaves no test tasks")
    return TaskSplit(train=train, test=test)
