"""Harbor-identical grading through the ``Sandbox`` protocol.

What Harbor 0.24's verifier does, and what we do (``docs/harbor.md`` lists where we are
stricter):

0. Processes the agent left running are stopped (``stop_agent_processes``), so a background
   loop cannot undo steps 1 and 2: write its variables back into the saved shell state, or
   rewrite the reward file.
1. The shell state the sandbox keeps between commands (``cd``, ``export``) is reset to the
   sandbox's start state, so test.sh runs in the environment's own workdir and variables, as
   in Harbor (whose ``exec`` keeps no state), never with an agent's ``PATH`` or ``LD_PRELOAD``.
2. ``/logs/verifier`` and ``/tests`` are emptied (a symlink or file in their place is removed)
   and ``/logs/verifier`` is made world-writable. Harbor does this before every verifier pass
   in separate and multi-step mode; we do it in shared mode too, so a reward file the agent
   wrote itself can never be read as the verifier's.
3. ``tests/`` is uploaded (binary-safe) to ``/tests``; ``test.sh`` is made executable and run
   as ``(/tests/test.sh) > /logs/verifier/test-stdout.txt 2>&1`` with ``[verifier].env``,
   under ``[verifier].timeout_sec``. The exit code is ignored.
4. ``reward.json`` (a JSON object of finite numbers) wins over ``reward.txt`` (one float). A
   missing, empty, unparseable or non-finite reward, or a timeout, is a ``GradingError``: the
   episode is invalid and counted, never scored 0.

In separate verifier mode (``[verifier.environment]``, ``tests/Dockerfile``) the tests run in a
second sandbox built from Harbor's resolved verifier environment; ``/logs/artifacts`` and the
task's ``artifacts`` are copied over from the agent's sandbox first, as Harbor does.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import tempfile
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from harbor.models.task.config import ArtifactConfig, VerifierEnvironmentMode
from harbor.utils.env import resolve_env_vars

from envs.errors import GradingError
from envs.harbor.tasks import HarborTask
from sandboxes.errors import SandboxError
from sandboxes.shell import STATE_DIR
from sandboxes.types import ExecResult, Sandbox, SandboxFactory
from tool_use.errors import EnvironmentFailure

VERIFIER_DIR = "/logs/verifier"
TESTS_DIR = "/tests"
ARTIFACTS_DIR = "/logs/artifacts"
REWARD_TXT = f"{VERIFIER_DIR}/reward.txt"
REWARD_JSON = f"{VERIFIER_DIR}/reward.json"
TEST_STDOUT = f"{VERIFIER_DIR}/test-stdout.txt"

SETUP_TIMEOUT_S = 120.0
"""Budget of each housekeeping command (reset, probe, read-back); tests get their own."""


@dataclass(frozen=True)
class GradeResult:
    """A successful grading."""

    reward: float
    """The scalar used for RL and evaluation (see ``scalar_reward``)."""
    rewards: dict[str, float]
    """Everything the verifier reported (``{"reward": x}`` for ``reward.txt``)."""
    test_output: str = ""
    """The tail of ``/logs/verifier/test-stdout.txt``."""
    duration_s: float = 0.0


@dataclass
class HarborGrader:
    """Grades one task's episodes. ``await grader.grade(sandbox)`` after the agent is done.

    ``factory`` is needed only for tasks whose verifier runs in a separate environment."""

    task: HarborTask
    factory: SandboxFactory | None = None
    stop_agent_processes: bool = True
    """Kill processes started after the sandbox was created, before the tests run. Turn off for
    tasks whose tests check a service the agent was asked to leave running."""
    output_tail_chars: int = 4000
    _baseline: dict[int, frozenset[int]] = field(default_factory=dict, init=False, repr=False)

    async def record_baseline(self, sandbox: Sandbox) -> None:
        """Remember the processes a fresh sandbox runs (its init, services the image starts),
        so ``stop_agent_processes`` spares them. Call right after the sandbox is created:
        without a baseline no process is stopped."""
        if self.stop_agent_processes:
            listing = "for p in /proc/[0-9]*; do echo ${p#/proc/}; done"
            result = await _run(sandbox, listing, self.task)
            self._baseline[id(sandbox)] = frozenset(int(p) for p in result.stdout.split())

    def forget(self, sandbox: Sandbox) -> None:
        """Drop the baseline of a closed sandbox."""
        self._baseline.pop(id(sandbox), None)

    async def grade(self, sandbox: Sandbox) -> GradeResult:
        """Run the task's tests against the agent's ``sandbox``; raise ``GradingError`` (or
        ``EnvironmentFailure(kind="sandbox")`` when a sandbox breaks) instead of guessing."""
        start = time.monotonic()
        if self.task.verifier_mode == VerifierEnvironmentMode.SEPARATE:
            rewards, output = await self._grade_separately(sandbox)
        else:
            if self.stop_agent_processes:
                await self._stop_agent_processes(sandbox)
            # after the stop: a process of the agent's could otherwise write its state back
            await self._reset_session(sandbox)
            rewards, output = await self._verify(sandbox, upload_tests=True)
        return GradeResult(
            reward=scalar_reward(rewards, self.task.name, output),
            rewards=rewards,
            test_output=output,
            duration_s=time.monotonic() - start,
        )

    async def reward(self, sandbox: Sandbox) -> float:
        return (await self.grade(sandbox)).reward

    # ---- the verifier pass ----------------------------------------------------------------

    async def _verify(self, sandbox: Sandbox, *, upload_tests: bool) -> tuple[dict, str]:
        task = self.task
        dirs = [VERIFIER_DIR, TESTS_DIR] if upload_tests else [VERIFIER_DIR]
        reset = await _run(sandbox, _reset_dirs_command(dirs), task)
        if not reset.ok:
            raise GradingError(
                task.name,
                f"could not reset {' and '.join(dirs)} before the tests: {_describe(reset)}",
            )
        if upload_tests:
            await _guard(sandbox.upload_dir(task.tests_dir, TESTS_DIR), task, "uploading tests/")
        script = f"{TESTS_DIR}/test.sh"
        await _run(sandbox, f"chmod +x {script}", task)
        env = resolve_env_vars(task.config.verifier.env) if task.config.verifier.env else None
        result = await _guard(
            sandbox.exec(
                f"({script}) > {TEST_STDOUT} 2>&1",
                cwd=sandbox.spec.workdir,
                env=env,
                timeout=task.verifier_timeout_s,
            ),
            task,
            "running tests/test.sh",
        )
        output = await self._test_output(sandbox)
        if result.timed_out:
            raise GradingError(
                task.name,
                f"tests/test.sh timed out after {task.verifier_timeout_s:g} s "
                f"([verifier].timeout_sec){_output_tail(output)}",
                output,
            )
        return await self._read_rewards(sandbox, output), output

    async def _read_rewards(self, sandbox: Sandbox, output: str) -> dict[str, float]:
        task = self.task
        probe = await _run(
            sandbox,
            f"for f in {REWARD_JSON} {REWARD_TXT}; do "
            'if [ -f "$f" ]; then echo "file $f"; elif [ -e "$f" ]; then echo "other $f"; fi; '
            "done",
            task,
        )
        found: dict[str, str] = {}  # remote path -> "file" | "other"
        for line in probe.stdout.splitlines():
            kind, _, path = line.partition(" ")
            found[path] = kind
        if not found:
            raise GradingError(
                task.name,
                f"the tests wrote no reward: neither {REWARD_JSON} nor {REWARD_TXT} exists"
                f"{_output_tail(output)}",
                output,
            )
        path = REWARD_JSON if REWARD_JSON in found else REWARD_TXT
        if found[path] != "file":
            raise GradingError(task.name, f"{path} is not a regular file", output)
        with tempfile.TemporaryDirectory(prefix="apprentice-reward-") as tmp:
            local = Path(tmp) / PurePosixPath(path).name
            await _guard(sandbox.download_file(path, local), task, f"reading {path}")
            data = local.read_bytes()
        try:
            return parse_reward_json(data) if path == REWARD_JSON else parse_reward_text(data)
        except ValueError as exc:
            raise GradingError(task.name, f"{path}: {exc}", output) from None

    async def _test_output(self, sandbox: Sandbox) -> str:
        command = f"tail -c {self.output_tail_chars} {TEST_STDOUT} 2>/dev/null || true"
        return (await _run(sandbox, command, self.task)).stdout

    # ---- separate verifier environment ----------------------------------------------------

    async def _grade_separately(self, agent_sandbox: Sandbox) -> tuple[dict, str]:
        from sandboxes.factory import spec_from_harbor_config

        task = self.task
        definition = task.verifier_environment()
        if definition is None:  # pragma: no cover - verifier_mode said separate
            raise GradingError(task.name, "separate verifier mode without an environment")
        if self.factory is None:
            raise GradingError(
                task.name,
                "the verifier runs in a separate environment but the grader has no sandbox "
                "factory to build it",
            )
        try:
            spec = spec_from_harbor_config(
                f"{task.name}-verifier", definition.directory, definition.config
            )
            verifier_sandbox = await self.factory.create(spec)
        except SandboxError as exc:  # an image that does not build, a daemon that is gone
            raise EnvironmentFailure(
                f"task {task.name!r}: could not create the verifier environment from "
                f"{definition.directory}: {exc}",
                kind="sandbox",
            ) from exc
        try:
            await self._copy_artifacts(agent_sandbox, verifier_sandbox)
            return await self._verify(verifier_sandbox, upload_tests=not definition.bundled_tests)
        finally:
            await verifier_sandbox.close()

    async def _copy_artifacts(self, source: Sandbox, target: Sandbox) -> None:
        """Harbor's artifact hand-over: the convention dir and ``artifacts`` entries are
        re-created at their original paths. Missing sources are skipped (Harbor logs them)."""
        task = self.task
        entries = [ARTIFACTS_DIR] + [
            entry.source if isinstance(entry, ArtifactConfig) else entry
            for entry in task.config.artifacts
        ]
        with tempfile.TemporaryDirectory(prefix="apprentice-artifacts-") as tmp:
            for index, remote in enumerate(entries):
                kind = await _run(
                    source,
                    f"if [ -d {shlex.quote(remote)} ]; then echo dir; "
                    f"elif [ -f {shlex.quote(remote)} ]; then echo file; fi",
                    task,
                )
                local = Path(tmp) / str(index)
                parent = shlex.quote(str(PurePosixPath(remote).parent))
                if kind.stdout.strip() == "dir":
                    await _guard(source.download_dir(remote, local), task, f"copying {remote}")
                    await _run(target, f"mkdir -p {shlex.quote(remote)}", task)
                    await _guard(target.upload_dir(local, remote), task, f"copying {remote}")
                elif kind.stdout.strip() == "file":
                    await _guard(source.download_file(remote, local), task, f"copying {remote}")
                    await _run(target, f"mkdir -p {parent}", task)
                    await _guard(target.upload_file(local, remote), task, f"copying {remote}")

    # ---- the agent's leftovers -------------------------------------------------------------

    async def _reset_session(self, sandbox: Sandbox) -> None:
        """Forget the shell state the agent's commands left (``cd``, ``export``): the sandbox
        carries it from command to command, but Harbor runs the tests in the environment's
        own working directory and variables. An agent's ``export PATH=/tmp/fake:$PATH`` or
        ``LD_PRELOAD`` must not reach test.sh."""
        script = _RESET_SESSION.format(
            state=shlex.quote(STATE_DIR), workdir=shlex.quote(sandbox.spec.workdir)
        )
        result = await _run(sandbox, script, self.task)
        if not result.ok:
            raise GradingError(
                self.task.name, f"could not reset the shell state: {_describe(result)}"
            )

    # ---- stray processes ------------------------------------------------------------------

    async def _stop_agent_processes(self, sandbox: Sandbox) -> None:
        """SIGKILL every process that is neither in the sandbox's baseline nor an ancestor of
        this command. Skipped when the sandbox shares our PID namespace (its /proc would show
        the host's processes) or no baseline was recorded."""
        baseline = self._baseline.get(id(sandbox))
        if baseline is None:
            return
        keep = " ".join(str(pid) for pid in sorted(baseline | {1}))
        script = _STOP_PROCESSES.format(keep=keep, host_ns=shlex.quote(_host_pid_namespace()))
        result = await _run(sandbox, script, self.task)
        if not result.ok:
            raise GradingError(
                self.task.name, f"could not stop the agent's processes: {_describe(result)}"
            )


_RESET_SESSION = """\
trap - EXIT
if [ -d {state} ]; then
  mapfile -d '' start < /proc/$BASHPID/environ
  for kv in "${{start[@]}}"; do
    key=${{kv%%=*}}
    if [[ $key =~ ^[A-Za-z_][A-Za-z0-9_]*$ && $key != APPRENTICE_EXEC ]]; then
      printf 'declare -x %s=%q\\n' "$key" "${{kv#*=}}"
    fi
  done > {state}/env
  printf '%s' {workdir} > {state}/cwd
fi
exit 0
"""
"""Builtins only (the agent's PATH and LD_PRELOAD are still in force while it runs). Rewrites
the saved environment as the one this shell was started with (``/proc/$BASHPID/environ`` is fixed at
exec time: the launcher's environment, before the saved state was sourced) and never saves this
shell's own state on exit."""


_STOP_PROCESSES = """\
[ "$(readlink /proc/self/ns/pid)" = {host_ns} ] && exit 0
keep=" {keep} $BASHPID "
pid=$BASHPID
while [ "$pid" -gt 1 ]; do
  ppid=""
  while read -r key value _; do
    if [ "$key" = PPid: ]; then ppid=$value; fi
  done < /proc/$pid/status
  [ -n "$ppid" ] || break
  keep="$keep$ppid "
  pid=$ppid
done
for round in 1 2 3; do
  for dir in /proc/[0-9]*; do
    pid=${{dir#/proc/}}
    case "$keep" in *" $pid "*) continue ;; esac
    kill -9 "$pid" 2>/dev/null
  done
done
exit 0
"""


def _host_pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return "unknown"


def _reset_dirs_command(dirs: list[str]) -> str:
    """Harbor's ``empty_dirs`` plus a check that it worked (a reward file the agent made
    undeletable must not survive into grading)."""
    lines = []
    for path in dirs:
        q = shlex.quote(path)
        lines += [
            f"if [ -L {q} ] || {{ [ -e {q} ] && [ ! -d {q} ]; }}; then rm -rf {q}; fi",
            f"mkdir -p {q}",
            f"find {q} -mindepth 1 -maxdepth 1 -exec rm -rf -- {{}} +",
            f'if [ -L {q} ] || [ ! -d {q} ] || [ -n "$(ls -A {q})" ]; then '
            f"echo '{path} is not an empty directory after the reset' >&2; exit 1; fi",
        ]
    lines.append(f"chmod 777 {shlex.quote(VERIFIER_DIR)}")
    return "\n".join(lines)


# ---- reward files: Harbor's parsing, as pure functions --------------------------------------


def parse_reward_text(data: bytes) -> dict[str, float]:
    """``reward.txt``: one float (surrounding whitespace allowed). ``{"reward": value}``."""
    if not data:
        raise ValueError("the reward file is empty")
    try:
        value = float(data.decode())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"not a number: {_preview(data)}") from None
    if not math.isfinite(value):
        raise ValueError(f"non-finite reward {value!r}")
    return {"reward": value}


def parse_reward_json(data: bytes) -> dict[str, float]:
    """``reward.json``: a JSON object whose values are finite numbers."""
    if not data:
        raise ValueError("the reward file is empty")
    try:
        rewards = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"not valid JSON: {_preview(data)}") from None
    if not isinstance(rewards, dict):
        raise ValueError(
            f"expected a JSON object of numbers, got {type(rewards).__name__}: {_preview(data)}"
        )
    out: dict[str, float] = {}
    for key, value in rewards.items():
        if not isinstance(value, int | float):
            raise ValueError(f"non-numeric reward {key!r}: {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"non-finite reward {key!r}: {value!r}")
        out[key] = float(value)
    return out


def scalar_reward(rewards: Mapping[str, float], task: str = "?", output: str = "") -> float:
    """The scalar of a rewards dict: its ``reward`` key, else its only value, else the mean of
    its values (Harbor keeps the dict; training needs one number). An empty dict is an error."""
    if not rewards:
        raise GradingError(task, f"{REWARD_JSON} is an empty object: no reward", output)
    if "reward" in rewards:
        return float(rewards["reward"])
    values = list(rewards.values())
    return float(sum(values) / len(values))


def _output_tail(output: str, lines: int = 5, limit: int = 500) -> str:
    """The end of test.sh's output for an error message (what it printed before failing, e.g.
    a syntax error), or nothing when it printed nothing."""
    kept = [line.rstrip() for line in output.strip().splitlines() if line.strip()][-lines:]
    text = " | ".join(kept)
    if not text:
        return ""
    if len(text) > limit:
        text = "..." + text[-limit:]
    return f"; test.sh output ends with: {text}"


def _preview(data: bytes, limit: int = 80) -> str:
    text = data[:limit].decode(errors="replace")
    return repr(text) + ("..." if len(data) > limit else "")


# ---- sandbox calls ------------------------------------------------------------------------


async def _run(sandbox: Sandbox, command: str, task: HarborTask) -> ExecResult:
    return await _guard(sandbox.exec(command, timeout=SETUP_TIMEOUT_S), task, "grading")


async def _guard[T](awaitable: Awaitable[T], task: HarborTask, what: str) -> T:
    """Sandbox infrastructure errors become ``EnvironmentFailure(kind="sandbox")``."""
    from sandboxes.errors import SandboxError

    try:
        return await awaitable
    except SandboxError as exc:
        raise EnvironmentFailure(
            f"task {task.name!r}: the sandbox failed while {what}: {exc}", kind="sandbox"
        ) from exc


def _describe(result: ExecResult) -> str:
    text = (result.stderr or result.stdout).strip()
    status = "timed out" if result.timed_out else f"exit code {result.exit_code}"
    return f"{status}: {text[-500:]}" if text else status
