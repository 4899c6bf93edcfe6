"""Start-up check that a teacher can score the student's token ids.

The teacher scores the student's sampled ids verbatim, so every id the student can emit must
mean the same string to the teacher. Checked, with an error naming both models:

- every token in the student's vocabulary (special and added tokens included) has the same id
  in the teacher's (the teacher may have extra tokens, e.g. Qwen3 over Qwen2.5);
- probe texts (prose, code, unicode, chat markup) encode to the same ids, which also catches
  different normalisers or merge rules behind equal vocabularies;
- the teacher model's embedding rows cover the student's vocabulary (models often pad the
  embedding matrix beyond the tokenizer's size; padding itself is fine).
"""

from __future__ import annotations

from training.errors import VocabularyMismatchError

PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "def main(argv: list[str]) -> int:\n    return len(argv) * 2  # ok\n",
    '{"name": "bash", "arguments": {"command": "ls -la /app && cat README.md"}}',
    "Ünïcödé, 中文, emoji 🚀, tabs\tand   spaces\n\n",
    "<|im_start|>user\nHi<|im_end|>\n<tool_call>\n</tool_call><|endoftext|>",
    "   leading spaces, 1234567890, 3.14159, -42, $HOME ~/path/to/file.txt",
)


def check_same_vocabulary(
    student_tokenizer,
    teacher_tokenizer,
    *,
    student_name: str = "student",
    teacher_name: str = "teacher",
    teacher_vocab_size: int | None = None,
    max_examples: int = 5,
) -> None:
    """Raise ``VocabularyMismatchError`` unless the teacher can score the student's ids.

    ``teacher_vocab_size`` is the teacher model's embedding size (``config.vocab_size``)."""
    problems: list[str] = []
    student_vocab = student_tokenizer.get_vocab()
    teacher_vocab = teacher_tokenizer.get_vocab()
    differ = sorted(
        (sid, token, teacher_vocab.get(token))
        for token, sid in student_vocab.items()
        if teacher_vocab.get(token) != sid
    )
    if differ:
        shown = ", ".join(
            f"{token!r}: {sid} vs {'missing' if tid is None else tid}"
            for sid, token, tid in differ[:max_examples]
        )
        problems.append(
            f"{len(differ)} of the student's {len(student_vocab)} tokens have another id or "
            f"none in the teacher (student vs teacher: {shown})"
        )
    for text in PROBE_TEXTS:
        ids_s = student_tokenizer.encode(text, add_special_tokens=False)
        ids_t = teacher_tokenizer.encode(text, add_special_tokens=False)
        if ids_s != ids_t:
            problems.append(f"{text[:40]!r}... encodes to {ids_s[:8]}... vs {ids_t[:8]}...")
            break
    needed = max(student_vocab.values(), default=-1) + 1
    if teacher_vocab_size is not None and teacher_vocab_size < needed:
        problems.append(
            f"the teacher model has {teacher_vocab_size} embedding rows, fewer than the "
            f"{needed} ids the student can emit"
        )
    if problems:
        raise VocabularyMismatchError(
            f"teacher {teacher_name!r} cannot score student {student_name!r}: they must share "
            "a tokenizer (the teacher scores the student's token ids verbatim). "
            + "; ".join(problems)
        )
