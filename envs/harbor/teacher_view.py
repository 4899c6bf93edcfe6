"""The privileged teacher view: the teacher is prompted with the task's reference solution.

In on-policy distillation the teacher only scores the student's tokens, so it may see more
than the student: here, ``solution/solve.sh``. The student's prompt is the system prompt and
the instruction; the teacher's is the same system prompt and the instruction rendered through a
template that adds the reference solution, clearly delimited and marked as hidden from the
student. The result becomes the env's ``teacher_messages``.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from envs.harbor.tasks import HarborTask
from tool_use.types import Message

DEFAULT_TEMPLATE = """\
{instruction}

=== REFERENCE SOLUTION (visible to you only; the student does not see it) ===
A known-good way to solve this task, as a bash script:
```bash
{solution}
```
Act as if you had worked this out yourself: use the bash tool to run the commands that solve \
the task, then reply briefly without calling a tool.
=== END OF REFERENCE SOLUTION ==="""

FIELDS = {
    "instruction": "the task's instruction (what the student sees)",
    "solution": "solution/solve.sh as written",
    "commands": "solve.sh without its shebang, `set -e` lines and comments",
    "task_name": "the task's name",
}


@dataclass(frozen=True)
class TeacherView:
    """Renders a task's privileged prompt. ``template`` may use the fields in ``FIELDS``."""

    template: str = DEFAULT_TEMPLATE

    def __post_init__(self) -> None:
        used = {name for _, name, _, _ in string.Formatter().parse(self.template) if name}
        unknown = sorted(used - set(FIELDS))
        if unknown:
            raise ValueError(
                f"teacher view template: unknown field {{{unknown[0]}}}; known fields: "
                + ", ".join(f"{{{name}}}" for name in FIELDS)
            )
        if "instruction" not in used:
            raise ValueError("teacher view template must contain {instruction}")

    def messages(self, task: HarborTask, student: list[Message]) -> list[Message] | None:
        """The teacher's initial messages for ``task``, built from the student's (the system
        prompt is kept, the first user message is rendered through the template). None when
        the task has no reference solution: the teacher then sees what the student sees."""
        solution = task.reference_solution
        if solution is None:
            return None
        text = self.template.format(
            instruction=task.instruction.strip(),
            solution=solution.strip(),
            commands=solution_commands(solution),
            task_name=task.name,
        )
        out: list[Message] = []
        replaced = False
        for message in student:
            if message.role == "user" and not replaced:
                out.append(message.model_copy(update={"content": text}))
                replaced = True
            else:
                out.append(message)
        if not replaced:
            out.append(Message(role="user", content=text))
        return out


def solution_commands(script: str) -> str:
    """The lines of a solve script that do the work (no shebang, ``set -e``, comments)."""
    lines = []
    for line in script.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("set -"):
            continue
        lines.append(line)
    return "\n".join(lines)
