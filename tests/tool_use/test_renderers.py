"""Renderers against the chat templates they reproduce (golden), incrementally and in parsing.

The Qwen2.5, Qwen3 and Llama 3.1 templates are the official ones (tests/tool_use/fixtures),
paired with stand-in tokenizers that carry the families' special tokens (see conftest); the
SmolLM2 tokenizer is the real embedded one.
"""

from __future__ import annotations

import json
import logging
import random

import pytest

from tool_use.renderers import (
    HermesRenderer,
    Llama3Renderer,
    Qwen3Renderer,
    RendererError,
    TemplateRenderer,
    detect_family,
    get_renderer,
)
from tool_use.renderers.base import to_hf
from tool_use.types import Message, ToolCall

BASH = {
    "name": "bash",
    "description": "Run a shell command.",
    "parameters": {
        "type": "object",
        "properties": {"command": {"type": "string", "description": "The command."}},
        "required": ["command"],
    },
}
SUBMIT = {"name": "submit", "description": "Finish.", "parameters": {"type": "object"}}
TOOLS = [BASH, SUBMIT]

FAMILY_RENDERER = {"qwen2.5": "qwen2.5", "qwen3": "qwen3", "llama3.1": "llama3"}


def call(command: str, index: int = 0) -> ToolCall:
    return ToolCall(id=f"call_{index}", name="bash", arguments=json.dumps({"command": command}))


def hf_tools(tools):
    return [{"type": "function", "function": t} for t in tools] or None


def template_ids(tokenizer, messages, tools, *, generation_prompt=True) -> list[int]:
    return tokenizer.apply_chat_template(
        to_hf(messages), tools=hf_tools(tools), add_generation_prompt=generation_prompt
    )["input_ids"]


def template_text(tokenizer, messages, tools, *, generation_prompt=True) -> str:
    return tokenizer.apply_chat_template(
        to_hf(messages),
        tools=hf_tools(tools),
        tokenize=False,
        add_generation_prompt=generation_prompt,
    )


def episode(family: str) -> tuple[list[Message], list[tuple[Message, list[Message]]]]:
    """A system + user prompt, then (assistant turn, env answer) pairs with tool calls, text
    before calls, two calls in one turn (not for Llama: its template allows one) and a final
    answer. Qwen3 turns carry reasoning."""
    think = family == "qwen3"

    def assistant(content="", calls=(), reasoning=None):
        return Message(
            role="assistant",
            content=content,
            tool_calls=list(calls),
            reasoning=reasoning if think else None,
        )

    def result(index: int, text: str) -> Message:
        return Message(role="tool", content=text, tool_call_id=f"call_{index}")

    prompt = [
        Message(role="system", content="You are a careful shell agent."),
        Message(role="user", content="How many lines does notes.txt have?"),
    ]
    turns = [
        (
            assistant(calls=[call("ls")], reasoning="List the directory first."),
            [result(0, "notes.txt\nrun.sh")],
        ),
        (
            assistant("Counting lines.", [call("wc -l notes.txt", 1)], reasoning="Use wc."),
            [result(1, "3 notes.txt")],
        ),
    ]
    if family != "llama3.1":
        turns.append(
            (
                assistant(
                    calls=[call("head -1 notes.txt", 2), call("tail -1 notes.txt", 3)],
                    reasoning="Check both ends.",
                ),
                [result(2, "first"), result(3, "last")],
            )
        )
    turns.append((assistant("It has 3 lines.", reasoning="Done."), []))
    return prompt, turns


def sampled_tokens(renderer, tokenizer, history, message, tools) -> list[int]:
    """The tokens a model would have sampled for ``message``: the template's own rendering of
    it, after the generation prompt and up to its end-of-turn token."""
    before = template_text(tokenizer, history, tools)
    after = template_text(tokenizer, [*history, message], tools, generation_prompt=False)
    assert after.startswith(before)
    turn = after[len(before) :]
    end = renderer.decode(renderer.stop_sequences[0])
    return renderer.encode(turn[: turn.rindex(end) + len(end)])


# ---- golden: whole prompts -------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3", "llama3.1"])
@pytest.mark.parametrize("with_tools", [False, True], ids=["no_tools", "tools"])
def test_prompt_matches_the_official_template(chat_tokenizers, family, with_tools):
    tokenizer = chat_tokenizers[family]
    renderer = get_renderer(FAMILY_RENDERER[family], tokenizer)
    tools = TOOLS if with_tools else []
    prompt, turns = episode(family)
    history = list(prompt)
    for message, answers in turns:
        history += [message, *answers]
    history.append(Message(role="user", content="Thanks. Now count words."))
    for messages in (prompt, prompt[1:], history):
        assert renderer.render_prompt(messages, tools) == template_ids(tokenizer, messages, tools)


def test_chatml_matches_smollm2_template(chat_tokenizers):
    tokenizer = chat_tokenizers["smollm2"]
    renderer = get_renderer("chatml", tokenizer)
    assert (
        renderer.default_system
        == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    )
    conversations = [
        [Message(role="user", content="Hi")],
        [
            Message(role="system", content="Be brief."),
            Message(role="user", content="Hi"),
            Message(role="assistant", content="Hello!"),
            Message(role="user", content="Bye"),
        ],
    ]
    for messages in conversations:
        assert renderer.render_prompt(messages) == template_ids(tokenizer, messages, [])


def test_chatml_tools_use_the_qwen25_layout(chat_tokenizers):
    """SmolLM2's own template ignores tools; ``chatml`` shows them the way Qwen2.5 does."""
    renderer = get_renderer("chatml", chat_tokenizers["smollm2"])
    prompt, turns = episode("qwen2.5")
    history = [*prompt, turns[0][0], *turns[0][1]]
    expected = template_text(chat_tokenizers["qwen2.5"], history, TOOLS)
    assert renderer.decode(renderer.render_prompt(history, TOOLS)) == expected


# ---- incremental rendering -------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3", "llama3.1"])
@pytest.mark.parametrize("name", ["family", "template"])
def test_incremental_pieces_equal_the_full_render(chat_tokenizers, family, name):
    """prompt + sampled turn + continuation + ... == apply_chat_template(whole history)."""
    tokenizer = chat_tokenizers[family]
    renderer = get_renderer(FAMILY_RENDERER[family] if name == "family" else "template", tokenizer)
    prompt, turns = episode(family)
    history = list(prompt)
    tokens = renderer.render_prompt(history, TOOLS)
    for message, answers in turns[:-1]:
        tokens += sampled_tokens(renderer, tokenizer, history, message, TOOLS)
        assert not renderer.rewrites_history([*history, message], answers, TOOLS)
        tokens += renderer.render_continuation([*history, message], answers, TOOLS)
        history += [message, *answers]
        assert tokens == template_ids(tokenizer, history, TOOLS)


def test_the_generic_renderer_renders_each_turn_once(chat_tokenizers, monkeypatch):
    """A token env asks rewrites_history, then render_continuation: three template renders of
    the whole history per turn, not six (each is quadratic in the episode)."""
    tokenizer = chat_tokenizers["qwen2.5"]
    renderer = get_renderer("template", tokenizer)
    prompt, turns = episode("qwen2.5")
    (message, answers), *_ = turns
    history = [*prompt, message]
    renders = []
    apply = renderer.apply
    monkeypatch.setattr(renderer, "apply", lambda *a, **k: renders.append(1) or apply(*a, **k))
    assert not renderer.rewrites_history(history, answers, TOOLS)
    continuation = renderer.render_continuation(history, answers, TOOLS)
    assert len(renders) == 3
    full = template_ids(tokenizer, [*history, *answers], TOOLS)
    assert full[-len(continuation) :] == continuation
    renderer.render_continuation(history, [*answers, *answers], TOOLS)  # others: rendered anew
    assert len(renders) == 6


def test_smollm2_chatml_incremental_equals_full(chat_tokenizers):
    """The embedded tokenizer's own pre-tokenizer: pieces split at <|im_end|> still agree."""
    tokenizer = chat_tokenizers["smollm2"]
    renderer = get_renderer("chatml", tokenizer)
    prompt, turns = episode("qwen2.5")
    history = list(prompt)
    tokens = renderer.render_prompt(history, TOOLS)
    for message, answers in turns[:-1]:
        text = renderer.prompt_text([*history, message, *answers], TOOLS)
        before = renderer.prompt_text(history, TOOLS)
        sampled = text[len(before) : text.index("<|im_end|>", len(before)) + len("<|im_end|>")]
        tokens += renderer.encode(sampled)
        tokens += renderer.render_continuation([*history, message], answers, TOOLS)
        history += [message, *answers]
        assert tokens == renderer.encode(renderer.prompt_text(history, TOOLS))


# ---- Qwen3 thinking and history rewrites -----------------------------------------------------


def test_qwen3_rewrites_history_when_a_new_query_arrives(chat_tokenizers):
    tokenizer = chat_tokenizers["qwen3"]
    for name in ("qwen3", "template"):
        renderer = get_renderer(name, tokenizer)
        prompt, turns = episode("qwen3")
        first, answers = turns[0]
        history = [*prompt, first]
        assert not renderer.rewrites_history(history, answers, TOOLS), name
        # A tool result plus a user hint: the hint is a new query, which drops the reasoning.
        hint = Message(role="user", content="Hint: use wc.")
        assert renderer.rewrites_history(history, [*answers, hint], TOOLS), name
        full = [*history, *answers, hint]
        rendered = renderer.render_prompt(full, TOOLS)
        assert rendered == template_ids(tokenizer, full, TOOLS)
        assert "List the directory first." not in renderer.decode(rendered)


def test_qwen3_new_query_after_a_final_answer_is_a_rewrite(chat_tokenizers):
    """The template check of the generic renderer sees the same rewrite as the family one."""
    tokenizer = chat_tokenizers["qwen3"]
    prompt, _ = episode("qwen3")
    answer = Message(role="assistant", content="Three.", reasoning="Counted them.")
    followup = [Message(role="user", content="And words?")]
    for name in ("qwen3", "template"):
        renderer = get_renderer(name, tokenizer)
        assert renderer.rewrites_history([*prompt, answer], followup, TOOLS), name


def test_qwen3_keeps_thinking_within_one_query(chat_tokenizers):
    renderer = get_renderer("qwen3", chat_tokenizers["qwen3"])
    prompt, turns = episode("qwen3")
    message, answers = turns[0]
    assert not renderer.rewrites_history([*prompt, message], answers, TOOLS)


def test_qwen3_parse_reads_thinking(chat_tokenizers):
    renderer = get_renderer("qwen3", chat_tokenizers["qwen3"])
    text = (
        "<think>\nI should look.\n</think>\n\nLooking.\n"
        '<tool_call>\n{"name": "bash", "arguments": {"command": "ls"}}\n</tool_call><|im_end|>'
    )
    parsed = renderer.parse(renderer.encode(text))
    assert parsed.parse_error is None
    assert parsed.message.reasoning == "I should look."
    assert parsed.message.content == "Looking."
    assert [(c.name, json.loads(c.arguments)) for c in parsed.message.tool_calls] == [
        ("bash", {"command": "ls"})
    ]


def test_qwen3_no_thinking_header(chat_tokenizers):
    tokenizer = chat_tokenizers["qwen3"]
    renderer = Qwen3Renderer(tokenizer, enable_thinking=False)
    prompt, _ = episode("qwen3")
    expected = tokenizer.apply_chat_template(
        to_hf(prompt), tools=hf_tools(TOOLS), add_generation_prompt=True, enable_thinking=False
    )["input_ids"]
    assert renderer.render_prompt(prompt, TOOLS) == expected


# ---- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["smollm2", "qwen2.5", "qwen3", "llama3.1"])
def test_round_trip_render_then_parse(chat_tokenizers, family):
    tokenizer = chat_tokenizers[family]
    renderer = get_renderer(None, tokenizer)
    prompt, turns = episode("qwen2.5" if family == "smollm2" else family)
    history = list(prompt)
    for message, answers in turns:
        if family == "smollm2":
            text = renderer.prompt_text([*history, message], TOOLS)
            start = len(renderer.prompt_text(history, TOOLS))
            tokens = renderer.encode(text[start : text.index("<|im_end|>", start) + 10])
        else:
            tokens = sampled_tokens(renderer, tokenizer, history, message, TOOLS)
        parsed = renderer.parse(tokens)
        assert parsed.parse_error is None
        got = parsed.message
        expected_content = "" if family == "llama3.1" and message.tool_calls else message.content
        assert got.content == expected_content
        assert [(c.name, json.loads(c.arguments)) for c in got.tool_calls] == [
            (c.name, json.loads(c.arguments)) for c in message.tool_calls
        ]
        assert got.reasoning == message.reasoning
        history += [message, *answers]


HERMES_BAD = {
    "bad_json": '<tool_call>\n{"name": "bash", "arguments": {"command": "ls"}\n</tool_call>',
    "unclosed": '<tool_call>\n{"name": "bash", "arguments": {"command": "ls"}}',
    "no_name": '<tool_call>\n{"tool": "bash", "arguments": {}}\n</tool_call>',
    "not_object": "<tool_call>\n[1, 2]\n</tool_call>",
}


@pytest.mark.parametrize("case", sorted(HERMES_BAD))
@pytest.mark.parametrize("family", ["smollm2", "qwen2.5", "qwen3"])
def test_hermes_malformed_calls_are_parse_errors(chat_tokenizers, family, case):
    renderer = get_renderer(None, chat_tokenizers[family])
    parsed = renderer.parse(renderer.encode("Let me look.\n" + HERMES_BAD[case] + "<|im_end|>"))
    assert parsed.parse_error
    assert parsed.message.tool_calls == []
    assert parsed.message.content == "Let me look."


def test_hermes_keeps_good_calls_next_to_a_bad_one(chat_tokenizers):
    renderer = get_renderer("chatml", chat_tokenizers["smollm2"])
    good = '<tool_call>\n{"name": "bash", "arguments": {"command":"ls"}}\n</tool_call>'
    parsed = renderer.parse(renderer.encode(good + "\n" + HERMES_BAD["bad_json"]))
    assert "not valid JSON" in parsed.parse_error
    assert [c.arguments for c in parsed.message.tool_calls] == ['{"command":"ls"}']


def test_arguments_are_kept_exactly_as_sampled(chat_tokenizers):
    renderer = get_renderer("chatml", chat_tokenizers["smollm2"])
    raw = '{ "command" :  "ls -la",\n "timeout": 5 }'
    text = f'<tool_call>\n{{"name": "bash", "arguments": {raw}}}\n</tool_call><|im_end|>'
    (found,) = renderer.parse(renderer.encode(text)).message.tool_calls
    assert found.arguments == raw


@pytest.mark.parametrize("family", ["smollm2", "qwen3", "llama3.1"])
def test_plain_text_has_no_tool_calls(chat_tokenizers, family):
    renderer = get_renderer(None, chat_tokenizers[family])
    stop = renderer.decode(renderer.stop_sequences[0])
    for text in ("The answer is 3.", '{"answer": 3}', "Use <b>bold</b> { braces"):
        parsed = renderer.parse(renderer.encode(text + stop))
        assert parsed.parse_error is None, text
        assert parsed.message.tool_calls == []
        assert parsed.message.content == text


LLAMA_BAD = {
    "bad_json": '{"name": "bash", "parameters": {"command": "ls"}',
    "no_name": '{"parameters": {"command": "ls"}}',
    "two_calls": '{"name": "bash", "parameters": {}}; {"name": "bash", "parameters": {}}',
    "tag_then_text": "<|python_tag|>let me think",
}


@pytest.mark.parametrize("case", sorted(LLAMA_BAD))
def test_llama_malformed_calls_are_parse_errors(chat_tokenizers, case):
    renderer = get_renderer("llama3", chat_tokenizers["llama3.1"])
    parsed = renderer.parse(renderer.encode(LLAMA_BAD[case] + "<|eot_id|>"))
    assert parsed.parse_error
    assert parsed.message.tool_calls == []


def test_llama_python_tag_call(chat_tokenizers):
    renderer = get_renderer("llama3", chat_tokenizers["llama3.1"])
    text = '<|python_tag|>{"name": "bash", "parameters": {"command": "ls"}}<|eom_id|>'
    parsed = renderer.parse(renderer.encode(text))
    assert parsed.parse_error is None
    assert [(c.name, c.arguments) for c in parsed.message.tool_calls] == [
        ("bash", '{"command": "ls"}')
    ]


@pytest.mark.parametrize("family", ["smollm2", "qwen3", "llama3.1"])
def test_parse_never_raises_on_random_tokens(chat_tokenizers, family):
    tokenizer = chat_tokenizers[family]
    renderer = get_renderer(None, tokenizer)
    rng = random.Random(0)
    pieces = renderer.encode('<tool_call>\n{"name": "</tool_call><think>"}</think>{"parameters"')
    for _ in range(200):
        tokens = [rng.choice([*pieces, rng.randrange(len(tokenizer))]) for _ in range(30)]
        parsed = renderer.parse(tokens)
        assert parsed.message.role == "assistant"


# ---- forced prefix, stops, selection ---------------------------------------------------------


@pytest.mark.parametrize("family", ["smollm2", "qwen2.5", "qwen3", "llama3.1"])
def test_tool_call_prefix_is_a_token_prefix_of_a_call(chat_tokenizers, family):
    """Forcing the prefix and sampling the rest gives the same tokens as the whole call."""
    renderer = get_renderer(None, chat_tokenizers[family])
    prefix = renderer.tool_call_prefix
    if family == "llama3.1":
        rest = 'bash", "parameters": {"command": "ls"}}<|eot_id|>'
    else:
        rest = 'bash", "arguments": {"command": "ls"}}\n</tool_call><|im_end|>'
    whole = renderer.encode(renderer.decode(prefix) + rest)
    assert whole[: len(prefix)] == prefix
    (found,) = renderer.parse(prefix + whole[len(prefix) :]).message.tool_calls
    assert (found.name, found.arguments) == ("bash", '{"command": "ls"}')


def test_stop_sequences(chat_tokenizers):
    smol = get_renderer(None, chat_tokenizers["smollm2"])
    assert smol.stop_sequences == [smol.encode("<|im_end|>")]
    llama = get_renderer(None, chat_tokenizers["llama3.1"])
    assert llama.stop_sequences == [llama.encode("<|eot_id|>"), llama.encode("<|eom_id|>")]
    template = get_renderer("template", chat_tokenizers["qwen2.5"])
    assert template.stop_sequences == [template.encode("<|im_end|>")]


def test_family_detection(chat_tokenizers):
    assert {name: detect_family(t.chat_template) for name, t in chat_tokenizers.items()} == {
        "smollm2": "chatml",
        "qwen2.5": "qwen2.5",
        "qwen3": "qwen3",
        "llama3.1": "llama3",
    }
    assert isinstance(get_renderer(None, chat_tokenizers["smollm2"]), HermesRenderer)
    assert isinstance(get_renderer(None, chat_tokenizers["qwen3"]), Qwen3Renderer)
    assert isinstance(get_renderer(None, chat_tokenizers["llama3.1"]), Llama3Renderer)


def test_unknown_renderer_name_is_named(chat_tokenizers):
    with pytest.raises(RendererError, match=r"unknown renderer 'mistral'.*chatml"):
        get_renderer("mistral", chat_tokenizers["smollm2"])


def test_variant_template_falls_back_to_the_generic_renderer(chat_tokenizers, caplog):
    """A template that looks like Qwen2.5 but differs is not silently mis-rendered."""
    tokenizer = chat_tokenizers["qwen2.5"]
    original = tokenizer.chat_template
    tokenizer.chat_template = original.replace("<tool_response>\\n", "<tool_response>")
    try:
        with caplog.at_level(logging.WARNING):
            renderer = get_renderer(None, tokenizer)
        assert isinstance(renderer, TemplateRenderer)
        assert "does not reproduce" in caplog.text
    finally:
        tokenizer.chat_template = original


def test_template_renderer_refuses_tools_its_template_ignores(chat_tokenizers):
    renderer = get_renderer("template", chat_tokenizers["smollm2"])
    with pytest.raises(RendererError, match="does not render tools"):
        renderer.render_prompt([Message(role="user", content="hi")], TOOLS)


def test_missing_special_token_is_reported(chat_tokenizers):
    with pytest.raises(RendererError, match=r"needs '<\|eot_id\|>' to be one token"):
        get_renderer("llama3", chat_tokenizers["smollm2"])
