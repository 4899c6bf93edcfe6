"""The README's examples are true: the tool example gives the spec it shows, the CLI example's
keys exist, and the custom environment trains through the real trainer (tiny random models)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import anyio
import torch

from tool_use.renderers import get_renderer
from training import models
from training.metrics import read_metrics
from training.samplers import HFSampler
from training.teachers import LocalTeacher
from training.trainer import Trainer, TrainerConfig

README = (Path(__file__).parents[1] / "README.md").read_text()
PYTHON = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
BASH = re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)


def run_example(code: str) -> dict:
    namespace: dict = {"__name__": "readme_example"}
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


class ReadmeDataset:
    def __init__(self, group_cls) -> None:
        self.group_cls = group_cls

    def __len__(self) -> int:
        return 2

    def get_batch(self, index: int):
        return [self.group_cls(f"What is {index} + 7?", group_size=2)]


def test_the_custom_environment_trains(smollm2_tokenizer, make_tiny_model, tmp_path):
    (example,) = [code for code in PYTHON if "class CalculatorGroup" in code]
    group_cls = run_example(example)["CalculatorGroup"]

    torch.manual_seed(0)
    student = models.add_lora(make_tiny_model(seed=1).requires_grad_(True), models.LoraSettings())
    renderer = get_renderer(None, smollm2_tokenizer)
    trainer = Trainer(
        TrainerConfig(max_steps=2, max_tokens=8, eval_every=0, save_every=0, progress=False),
        model=student,
        tokenizer=smollm2_tokenizer,
        renderer=renderer,
        sampler=HFSampler(student, smollm2_tokenizer, batch_window_s=60.0),
        teacher=LocalTeacher(make_tiny_model(seed=2), smollm2_tokenizer),
        teacher_renderer=renderer,
        dataset=ReadmeDataset(group_cls),
        log_path=tmp_path,
    )
    result = anyio.run(trainer.train)

    assert result.steps == 2
    steps = [r for r in read_metrics(tmp_path) if "teacher_kl" in r]
    assert len(steps) == 2
    assert all(r["episodes/valid"] == 2 and r["tokens/student"] > 0 for r in steps)
