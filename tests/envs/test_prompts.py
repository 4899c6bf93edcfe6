"""Single-turn JSONL prompt datasets: validation errors name file, line and field; rows split
into prompt and reference response; exact-match normalisation; seeded batching over epochs; each
row is a one-turn message env with no tools."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from envs.prompts import (
    PromptDataset,
    PromptDatasetBuilder,
    PromptDatasetConfig,
    PromptDatasetError,
    PromptRow,
    exact_match,
    load_prompt_rows,
    normalize_answer,
    prompt_env,
)
from tool_use.types import Message, ParsedResponse, StopReason

DATA = Path(__file__).resolve().parents[2] / "recipes" / "data"


def write_rows(path: Path, *rows: object) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def test_every_bundled_example_loads():
    for path in sorted(DATA.glob("*.jsonl")):
        rows = load_prompt_rows(path)
        assert rows, path


def test_bad_rows_are_reported_with_file_line_and_field(tmp_path):
    path = write_rows(
        tmp_path / "bad.jsonl",
        {"messages": [user("fine")]},
        "{not json",
        {"messages": [{"role": "robot", "content": "x"}]},
        "",
        {"messages": [user("x")], "expected": "5"},
        {"teacher": "math"},
        [1, 2],
        {"messages": [{"role": "assistant", "content": "only an answer"}]},
        {"messages": [user("q")], "teacher_messages": [user("q"), {"role": "assistant"}]},
    )
    with pytest.raises(PromptDatasetError) as caught:
        load_prompt_rows(path)
    problems = caught.value.problems
    text = str(caught.value)
    assert f"{path}:2: not valid JSON" in text
    assert any(p.startswith(f"{path}:3: field 'messages.0.role'") for p in problems)
    assert any(p.startswith(f"{path}:5: unknown field 'expected'") for p in problems)
    assert f"{path}:6: missing required field 'messages'" in problems
    assert f"{path}:7: expected a JSON object, got list" in problems
    assert any(p.startswith(f"{path}:8:") and "no user message" in p for p in problems)
    assert any(p.startswith(f"{path}:9:") and "teacher_messages" in p for p in problems)
    assert not any(p.startswith((f"{path}:1:", f"{path}:4:")) for p in problems)
    assert len(problems) == 7


def test_missing_and_empty_files_are_errors(tmp_path):
    with pytest.raises(PromptDatasetError, match=r"nope\.jsonl: no such file"):
        load_prompt_rows(tmp_path / "nope.jsonl")
    with pytest.raises(PromptDatasetError, match="has no rows"):
        load_prompt_rows(write_rows(tmp_path / "empty.jsonl", ""))


def test_trailing_assistant_messages_are_the_reference_response():
    row = PromptRow(
        messages=[
            Message(role="system", content="Be brief."),
            Message(role="user", content="2+2?"),
            Message(role="assistant", content="4"),
        ]
    )
    assert [m.role for m in row.prompt] == ["system", "user"]
    assert [m.content for m in row.response] == ["4"]
    assert PromptRow(messages=[Message(role="user", content="hi")]).response == []


@pytest.mark.parametrize(
    ("response", "expected", "match"),
    [
        ("12", "12", True),
        ("  12.\n", "12", True),
        ("Paris", "paris", True),
        ("The  answer\tis   Paris!", "the answer is paris", True),
        ("So the result is \\boxed{42}.", "42", True),
        ("\\boxed{1} then \\boxed{7}", "7", True),
        ("１２", "12", True),  # NFKC: full-width digits
        ("18 + 40 = 58.", "58", True),  # the final word
        ("The capital of France is Paris!", "Paris", True),
        ("I think it is New  York.", "new york", True),  # as many final words as expected
        ("12 apples", "12", False),
        ("121", "12", False),
        ("5 + 7 = 12", "7 = 12", True),
        ("\\boxed{11} so maybe 12", "12", False),  # a boxed answer is the answer
        ("", "0", False),
        ("anything", "", False),
    ],
)
def test_exact_match_normalisation(response, expected, match):
    assert exact_match(response, expected) is match


def test_normalize_answer_strips_edges_only():
    assert normalize_answer(' "$3.50". ') == "3.50"
    assert normalize_answer("New   York") == "new york"


def test_batches_are_seeded_per_epoch_and_cover_every_row(tmp_path):
    rows = [PromptRow(messages=[Message(role="user", content=f"q{i}")]) for i in range(10)]
    one = PromptDataset(rows, group_size=2, groups_per_batch=4, epochs=2, seed=3)
    again = PromptDataset(rows, group_size=2, groups_per_batch=4, epochs=2, seed=3)
    other = PromptDataset(rows, group_size=2, groups_per_batch=4, epochs=2, seed=4)
    assert len(one) == 5  # 20 groups, 4 per batch
    seen = [b.index for i in range(len(one)) for b in one.get_batch(i)]
    assert seen == [b.index for i in range(len(again)) for b in again.get_batch(i)]
    assert seen != [b.index for i in range(len(other)) for b in other.get_batch(i)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]  # each epoch is a fresh permutation
    fixed = PromptDataset(rows, group_size=1, groups_per_batch=3, shuffle=False)
    assert [b.index for b in fixed.get_batch(3)] == [9]  # only the last batch is short
    with pytest.raises(IndexError, match="4 batches"):
        fixed.get_batch(4)


def test_builder_makes_train_and_validation_sets():
    config = PromptDatasetConfig(
        dataset=DATA / "arithmetic.jsonl",
        validation_dataset=DATA / "arithmetic_val.jsonl",
        group_size=3,
        groups_per_batch=8,
        eval_group_size=1,
    )
    train, validation = PromptDatasetBuilder(config)()
    assert len(train) == 6 and validation is not None and len(validation) == 2
    assert train.get_batch(0)[0].group_size == 3
    assert validation.get_batch(0)[0].group_size == 1
    assert PromptDatasetBuilder(config.model_copy(update={"validation_dataset": None}))()[1] is None


@pytest.mark.anyio
async def test_a_row_is_a_one_turn_env_without_tools_graded_by_exact_match():
    row = PromptRow(
        messages=[Message(role="user", content="What is 2 + 3?")],
        teacher="math",
        teacher_messages=[Message(role="user", content="What is 2 + 3? It is 5.")],
        expected_answer="5",
    )
    env = prompt_env(row, source="x.jsonl", index=4)
    assert env.tools == [] and env.max_turns == 1
    assert env.metadata == {
        "source": "x.jsonl",
        "row": 4,
        "graded": True,
        "teacher": "math",
        "expected_answer": "5",
    }
    assert [m.content for m in env.teacher_messages] == ["What is 2 + 3? It is 5."]
    right = await env.step(ParsedResponse(Message(role="assistant", content="5.")))
    assert right.done and right.reward == 1.0 and right.stop_reason is StopReason.NO_TOOL_CALL
    wrong = prompt_env(row)
    assert (await wrong.step(ParsedResponse(Message(role="assistant", content="6")))).reward == 0.0
    ungraded = prompt_env(PromptRow(messages=[Message(role="user", content="hi")]))
    assert ungraded.metadata["graded"] is False and "teacher" not in ungraded.metadata
    assert (await ungraded.step(ParsedResponse(Message(role="assistant", content="hi")))).done
