"""``HarborBashTool``: the agent's one tool, a shell in the episode's sandbox.

The tool is stateful (one instance per episode, bound to that episode's sandbox): it enforces a
per-command timeout, the task's whole-episode command budget (``[agent].timeout_sec``, spent
only by time inside the sandbox, not by sampling), and an output cap. A broken sandbox is an
``EnvironmentFailure(kind="sandbox")``, never a message the model is trained to read.
"""

from __future__ import annotations

import time
from typing import Annotated

from sandboxes.errors import SandboxError
from sandboxes.types import ExecResult, Sandbox
from tool_use.errors import EnvironmentFailure
from tool_use.execution import truncation_marker
from tool_use.tool import tool
from tool_use.types import Message, ToolResult

DEFAULT_COMMAND_TIMEOUT_S = 30.0
DEFAULT_MAX_OUTPUT_CHARS = 4000

_LOOP_GRACE_S = 15.0
"""The episode loop's own timeout sits this far above ours, so the sandbox kills a runaway
command (and we report it) before the loop abandons the call."""


class HarborBashTool:
    """``bash(command)`` in one sandbox. Use ``HarborBashTool(sandbox, ...).bash`` as a Tool."""

    def __init__(
        self,
        sandbox: Sandbox,
        *,
        command_timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S,
        agent_timeout_s: float | None = None,
        max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
        cwd: str | None = None,
    ) -> None:
        if command_timeout_s <= 0:
            raise ValueError(
                f"HarborBashTool: command_timeout_s must be > 0, got {command_timeout_s}"
            )
        if max_output_chars < 100:
            raise ValueError(
                f"HarborBashTool: max_output_chars must be >= 100, got {max_output_chars}"
            )
        self.sandbox = sandbox
        self.command_timeout_s = command_timeout_s
        self.agent_timeout_s = agent_timeout_s
        self.max_output_chars = max_output_chars
        self.cwd = cwd
        self.time_used_s = 0.0
        """Seconds spent inside the sandbox so far (counts against ``agent_timeout_s``)."""
        bound = self.bash
        bound.timeout_s = command_timeout_s + _LOOP_GRACE_S
        # Room for our own header and markers, so the loop's cap never cuts a formatted result.
        bound.max_output_chars = max_output_chars + 500

    @tool
    async def bash(
        self, command: Annotated[str, "The bash command to run, e.g. `ls -la /app`."]
    ) -> ToolResult:
        """Run a bash command in the task's machine and return its exit code, stdout and
        stderr. `cd` and exported variables carry over to the next call."""
        remaining = self._remaining_budget()
        if remaining is not None and remaining <= 0:
            return self._budget_exhausted()
        timeout = (
            self.command_timeout_s if remaining is None else min(self.command_timeout_s, remaining)
        )
        start = time.monotonic()
        try:
            result = await self.sandbox.exec(command, cwd=self.cwd, timeout=timeout)
        except SandboxError as exc:
            raise EnvironmentFailure(
                f"sandbox {self.sandbox.spec.name!r} failed running a bash command: {exc}",
                kind="sandbox",
            ) from exc
        finally:
            self.time_used_s += time.monotonic() - start
        metrics = {"bash/commands": 1.0, "bash/seconds": result.duration_s}
        if result.timed_out:
            metrics["bash/timeouts"] = 1.0
        if result.exit_code not in (0, None):
            metrics["bash/nonzero_exit"] = 1.0
        return _text_result(format_exec_result(result, timeout, self.max_output_chars), metrics)

    def _remaining_budget(self) -> float | None:
        if self.agent_timeout_s is None:
            return None
        return self.agent_timeout_s - self.time_used_s

    def _budget_exhausted(self) -> ToolResult:
        result = _text_result(
            f"Not run: the task's time budget of {self.agent_timeout_s:g} seconds of commands "
            "is used up.",
            {"bash/budget_exhausted": 1.0},
        )
        result.should_stop = True
        return result


def _text_result(text: str, metrics: dict[str, float]) -> ToolResult:
    return ToolResult(messages=[Message(role="tool", content=text)], metrics=metrics)


def format_exec_result(result: ExecResult, timeout_s: float, max_chars: int) -> str:
    """``exit code: N`` then ``stdout:`` / ``stderr:`` sections (empty ones omitted); long
    output keeps its head and tail with a marker. The cap is shared: stderr (usually the
    error) gets at least a third of it when both are long."""
    if result.timed_out:
        status = f"exit code: none (timed out after {timeout_s:g} s; the command was killed)"
    elif result.exit_code is None:
        status = "exit code: none (the command was killed)"
    else:
        status = f"exit code: {result.exit_code}"
    stdout, stderr = result.stdout, result.stderr
    if len(stdout) + len(stderr) > max_chars:
        stderr_share = min(len(stderr), max(max_chars // 3, max_chars - len(stdout)))
        stdout, stderr = _cut(stdout, max_chars - stderr_share), _cut(stderr, stderr_share)
    parts = [status]
    if stdout:
        parts.append("stdout:\n" + stdout.rstrip("\n"))
    if stderr:
        parts.append("stderr:\n" + stderr.rstrip("\n"))
    if not stdout and not stderr:
        parts.append("(no output)")
    if result.truncated:
        parts.append("(the sandbox cut this output at its own limit)")
    return "\n".join(parts)


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    tail = limit // 2
    head = limit - tail
    return text[:head] + truncation_marker(len(text) - limit) + text[len(text) - tail :]
