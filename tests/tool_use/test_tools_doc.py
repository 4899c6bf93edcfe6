"""Every Python example in docs/tools.md runs and its assertions hold."""

import re
from pathlib import Path

import pytest

DOC = Path(__file__).parents[2] / "docs" / "tools.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def test_the_page_has_examples() -> None:
    assert len(EXAMPLES) >= 6


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_example_runs(code: str) -> None:
    exec(compile(code, f"{DOC}:example", "exec"), {"__name__": "docs_tools_example"})
