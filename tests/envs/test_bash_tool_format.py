"""How a command's result reads to the model (pure formatting; the tool in a real sandbox is
tested in test_episode.py)."""

from __future__ import annotations

from envs.harbor.bash_tool import format_exec_result
from sandboxes.types import ExecResult


def test_exit_code_then_non_empty_sections():
    text = format_exec_result(ExecResult("a\nb\n", "", 0), 30, 1000)
    assert text == "exit code: 0\nstdout:\na\nb"
    text = format_exec_result(ExecResult("", "ls: no such file\n", 2), 30, 1000)
    assert text == "exit code: 2\nstderr:\nls: no such file"
    assert format_exec_result(ExecResult("", "", 0), 30, 1000) == "exit code: 0\n(no output)"


def test_timeout_and_kill_are_spelled_out():
    text = format_exec_result(ExecResult("partial\n", "", None, timed_out=True), 5, 1000)
    assert text.startswith("exit code: none (timed out after 5 s; the command was killed)")
    assert "partial" in text
    killed = format_exec_result(ExecResult("", "", None), 5, 1000)
    assert killed.startswith("exit code: none (the command was killed)")


def test_long_output_keeps_head_tail_and_stderr():
    stdout = "".join(f"line {i}\n" for i in range(2000))
    stderr = "fatal: the real problem\n"
    text = format_exec_result(ExecResult(stdout, stderr, 1), 30, 600)
    assert "line 0\n" in text and "line 1999" in text
    assert "characters truncated" in text
    assert "fatal: the real problem" in text
    assert len(text) < 600 + 200


def test_both_streams_long_share_the_cap():
    text = format_exec_result(ExecResult("o" * 5000, "e" * 5000, 1), 30, 900)
    assert text.count("o") >= 300 and text.count("e") >= 300
    assert len(text) < 900 + 200


def test_sandbox_side_truncation_is_mentioned():
    text = format_exec_result(ExecResult("x", "", 0, truncated=True), 30, 1000)
    assert "cut this output" in text
