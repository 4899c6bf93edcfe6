"""The README's examples are true: the tool example gives the spec it shows, the CLI example's
keys exist, and the custom environment example runs as written, as a script and through the
on_policy recipe's command line (tiny random models)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import torch

from training.metrics import read_metrics

README = (Path(__file__).parents[1] / "README.md").read_text()
PYTHON = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
BASH = re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)


def run_example(code: str, name: str = "readme_example") -> dict:
    namespace: dict = {"__name__": name}
    exec(compile(code, "README.md:example", "exec"), namespace)
    return namespace


def test_the_tool_example_gives_the_spec_it_shows():
    (example,) = [code for code in PYTHON if "def grep" in code]
    spec = run_example(example)["grep"].spec
    assert spec["name"] == "grep"
    assert spec["description"] == "Search files for a pattern."
    assert spec["parameters"]["required"] == ["pattern"]
    assert spec["parameters"]["properties"]["pattern"]["description"] == "A regular expression."


def test_the_cli_example_uses_only_real_keys():
    from recipes.distillation import harbor_multi_turn

    (command,) = [block for block in BASH if "harbor_multi_turn" in block]
    words = shlex.split(command.replace("\\\n", " "))
    pairs = dict(word.split("=", 1) for word in words if "=" in word)
    assert {"model_name", "teacher_model", "tasks", "backend", "lora_rank"} <= pairs.keys()
    keys = set(harbor_multi_turn.Config.model_fields)
    assert pairs.keys() <= keys, pairs.keys() - keys


def test_the_custom_environment_runs_as_written(tmp_path, monkeypatch):
    """Section 3's example, as ``python calculator_env.py``: it trains (tiny random models)."""
    (example,) = [code for code in PYTHON if "class CalculatorGroup" in code]
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    run_example(example, name="__main__")

    records = read_metrics(tmp_path / "runs" / "calculator")
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert record["episodes/valid"] == 8 and record["tokens/student"] > 0
        assert record["calculator/episodes"] == 8 and "calculator/teacher_kl" in record


def test_the_custom_environment_trains_from_the_command_line(tmp_path, monkeypatch, capsys):
    """Section 3's command, with its smoke-test models: the recipe imports the example's
    ``make_datasets`` by its ``module:attr`` name."""
    from recipes.common import cli
    from recipes.distillation import on_policy

    (example,) = [code for code in PYTHON if "class CalculatorGroup" in code]
    (command,) = [block for block in BASH if "dataset_builder=" in block]
    words = shlex.split(command.replace("\\\n", " "))
    assert "recipes.distillation.on_policy" in words
    pairs = dict(word.split("=", 1) for word in words if "=" in word)
    assert pairs["dataset_builder"] == "calculator_env:make_datasets"
    assert pairs.keys() <= set(on_policy.Config.model_fields), pairs.keys()

    (tmp_path / "calculator_env.py").write_text(example)
    monkeypatch.syspath_prepend(str(tmp_path))
    log = tmp_path / "run"
    smoke = {  # the smoke test the README names, short
        "model_name": "tiny-random",
        "teacher_model": "tiny-random:1",
        "max_steps": 1,
        "max_tokens": 16,
        "progress": "false",
        "log_path": log,
    }
    argv = [f"{k}={v}" for k, v in {**pairs, **smoke}.items()]
    assert cli(on_policy.main, on_policy.Config, argv) == 0, capsys.readouterr().err
    (record,) = read_metrics(log)
    assert record["calculator/episodes"] == 8 and record["episodes/valid"] == 8
    config = json.loads((log / "config.json").read_text())
    assert config["dataset_builder"] == "calculator_env:make_datasets"  # resume repeats it
