"""The privileged teacher prompt: the reference solution for the teacher, never the student."""

from __future__ import annotations

import pytest

from envs.harbor.tasks import load_task, load_tasks
from envs.harbor.teacher_view import DEFAULT_TEMPLATE, TeacherView, solution_commands
from tool_use.types import Message

STUDENT = [
    Message(role="system", content="You are in a terminal."),
    Message(role="user", content="Count the lines."),
]


def test_default_view_keeps_the_system_prompt_and_adds_a_delimited_solution():
    task = next(t for t in load_tasks("bundled") if t.name == "count-lines")
    student = [STUDENT[0], Message(role="user", content=task.instruction.strip())]
    teacher = TeacherView().messages(task, student)
    assert teacher is not None
    assert [m.role for m in teacher] == ["system", "user"]
    assert teacher[0] == student[0]
    text = teacher[1].content
    assert text.startswith(task.instruction.strip())
    assert "wc -l < /app/data.txt > /app/count.txt" in text
    assert "REFERENCE SOLUTION" in text and "END OF REFERENCE SOLUTION" in text
    assert "the student does not see it" in text
    # The student's own messages are untouched.
    assert "wc -l" not in student[1].content


def test_custom_template_with_commands_field(make_task):
    task = load_task(make_task(solve_sh="#!/bin/bash\nset -euo pipefail\n# fix it\nmake fix\n"))
    view = TeacherView("{instruction}\nRun exactly: {commands}\n({task_name})")
    teacher = view.messages(task, STUDENT)
    assert teacher[1].content == "Do the thing.\nRun exactly: make fix\n(demo)"


def test_task_without_solution_gets_no_privileged_view(make_task):
    task = load_task(make_task(solve_sh=None))
    assert TeacherView().messages(task, STUDENT) is None


@pytest.mark.parametrize(
    ("template", "problem"),
    [("{instruction} {secret}", "unknown field {secret}"), ("{solution}", "must contain")],
)
def test_bad_templates_fail_when_configured(template, problem):
    with pytest.raises(ValueError, match=problem):
        TeacherView(template)


def test_solution_commands_strip_boilerplate():
    assert solution_commands("#!/bin/bash\nset -e\n\n# note\nls\n  cd /app\n") == "ls\n  cd /app"
    assert "{instruction}" in DEFAULT_TEMPLATE
