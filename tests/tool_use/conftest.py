from pathlib import Path

import pytest
from tokenizers import Regex, pre_tokenizers
from transformers import AutoTokenizer


@pytest.fixture
def anyio_backend() -> str:
    """Async tests in tests/tool_use run on asyncio through anyio's pytest plugin."""
    return "asyncio"


# ---- chat tokenizers for the renderer tests (tests/tool_use/test_renderers*.py, test_token_env) --

FIXTURES = Path(__file__).parent / "fixtures"

# The families' own pre-tokenizer patterns (from their tokenizer.json): unlike SmolLM2's GPT-2
# pattern they keep a run of newlines in one piece, which keeps "\n\n" + text tokenising the same
# whether or not the text follows in the same string.
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_FAMILY_TOKENS = {
    # Qwen2.5/Qwen3 have <|im_start|>/<|im_end|> as special tokens and the tool/think tags as
    # added (non-special) tokens; Llama 3 has its header/turn tokens as special tokens.
    "qwen2.5": {
        "special": [],
        "added": ["<tool_call>", "</tool_call>"],
        "eos": "<|im_end|>",
        "pattern": _QWEN2_PATTERN,
    },
    "qwen3": {
        "special": [],
        "added": [
            "<tool_call>",
            "</tool_call>",
            "<tool_response>",
            "</tool_response>",
            "<think>",
            "</think>",
        ],
        "eos": "<|im_end|>",
        "pattern": _QWEN2_PATTERN,
    },
    "llama3.1": {
        "special": [
            "<|begin_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|eom_id|>",
            "<|python_tag|>",
        ],
        "added": [],
        "eos": "<|eot_id|>",
        "bos": "<|begin_of_text|>",
        "pattern": _LLAMA3_PATTERN,
    },
}


def family_tokenizer(base_dir: Path, family: str):
    """The SmolLM2 vocabulary plus a family's special tokens and its official chat template
    (tests/tool_use/fixtures/<family>.jinja): a stand-in for the real tokenizer, which needs a
    model hub we do not have. Renderers only depend on the special tokens and the template."""
    spec = _FAMILY_TOKENS[family]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(spec["pattern"]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.add_special_tokens({"additional_special_tokens": spec["special"]})
    tokenizer.add_tokens(spec["added"])
    tokenizer.eos_token = spec["eos"]
    if "bos" in spec:
        tokenizer.bos_token = spec["bos"]
    tokenizer.chat_template = (FIXTURES / f"{family}.jinja").read_text()
    tokenizer.name_or_path = f"smollm2+{family}"
    return tokenizer


@pytest.fixture(scope="session")
def chat_tokenizers(embedded_model_dir) -> dict:
    """The real SmolLM2 tokenizer (``smollm2``) and the stand-ins ``qwen2.5``, ``qwen3``,
    ``llama3.1``."""
    tokenizers = {"smollm2": AutoTokenizer.from_pretrained(embedded_model_dir)}
    for family in _FAMILY_TOKENS:
        tokenizers[family] = family_tokenizer(Path(embedded_model_dir), family)
    return tokenizers
