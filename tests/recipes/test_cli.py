"""The key=value config machinery: parsing by type, nested keys, imports, help, errors with
suggestions, config files, the JSON dump round trip, excluded inherited keys, and the CLI's exit
codes."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import pytest
from pydantic import BaseModel, Field, ValidationError, model_validator

from recipes.cli import (
    ConfigError,
    Importable,
    RecipeConfig,
    dump_config,
    format_help,
    import_object,
    parse_cli,
    run_cli,
)

REPO = Path(__file__).resolve().parents[2]


class Loss(StrEnum):
    """Which loss."""

    SAMPLED_REVERSE_KL = "sampled_reverse_kl"
    """On-policy distillation."""
    JSD = "jsd"
    """Generalized JSD."""


class TeacherConfig(BaseModel):
    model_name: str = "small"
    """The teacher model."""
    temperature: float = Field(1.0, description="Teacher softmax temperature.")


class LoraConfig(RecipeConfig):
    rank: int
    """LoRA rank (required when LoRA is configured)."""
    alpha: float | None = None


class Config(RecipeConfig):
    """A test recipe.

    Not shown: the help keeps the first paragraph."""

    model_name: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """The student: a Hugging Face id or a local folder."""
    learning_rate: float = Field(1e-4, description="Adam learning rate.")
    lora_rank: int = 8
    max_steps: int | None = None
    resume: bool = False
    loss: Loss = Loss.SAMPLED_REVERSE_KL
    backend: Literal["local", "docker"] = "local"
    """Where sandboxes run."""
    tasks: list[str] = Field(default_factory=list)
    seeds: tuple[int, ...] = (1, 2)
    weights: dict[str, float] = Field(default_factory=dict)
    log_path: Path = Path("/tmp/run")
    teacher: TeacherConfig = TeacherConfig(model_name="big")
    """The frozen teacher."""
    lora: LoraConfig | None = None
    reward_fn: Callable[..., float] | None = None
    """A reward function, as module:attr."""
    sandbox_factory: Annotated[Any, Importable()] = None


class Required(RecipeConfig):
    tasks: Path
    """Harbor task folder."""
    group_size: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _check(self) -> Required:
        if self.group_size == 3:
            raise ValueError("group_size 3 is unlucky")
        return self


def test_defaults():
    config = parse_cli(Config, [])
    assert config == Config()
    assert config.teacher.model_name == "big"


def test_values_are_parsed_by_field_type():
    config = parse_cli(
        Config,
        [
            "learning_rate=3e-5",
            "lora_rank=16",
            "max_steps=null",
            "resume=yes",
            "loss=jsd",
            "backend=docker",
            "tasks=a, b,c",
            "seeds=[3, 4]",
            'weights={"x": 0.5}',
            "log_path=runs/one",
            "model_name=Qwen/Qwen3-8B",
        ],
    )
    assert config.learning_rate == 3e-5 and config.lora_rank == 16 and config.max_steps is None
    assert config.resume is True and config.loss is Loss.JSD and config.backend == "docker"
    assert config.tasks == ["a", "b", "c"] and config.seeds == (3, 4)
    assert config.weights == {"x": 0.5} and config.log_path == Path("runs/one")
    assert config.model_name == "Qwen/Qwen3-8B"
    assert parse_cli(Config, ["tasks=", "seeds=5,6"]).tasks == []
    assert parse_cli(Config, ["seeds=5,6"]).seeds == (5, 6)
    assert parse_cli(Config, ['tasks=["x,y"]']).tasks == ["x,y"]
    assert parse_cli(Config, ["max_steps=NONE"]).max_steps is None
    assert parse_cli(Config, ["max_steps=7"]).max_steps == 7


@pytest.mark.parametrize(
    "raw,expected",
    [("true", True), ("False", False), ("1", True), ("0", False), ("yes", True), ("NO", False)],
)
def test_bools(raw, expected):
    assert parse_cli(Config, [f"resume={raw}"]).resume is expected


def test_nested_keys_keep_the_default_instance():
    config = parse_cli(Config, ["teacher.temperature=0.5"])
    assert config.teacher == TeacherConfig(model_name="big", temperature=0.5)
    config = parse_cli(Config, ['teacher={"model_name": "x"}', "teacher.temperature=2"])
    assert config.teacher == TeacherConfig(model_name="x", temperature=2.0)
    config = parse_cli(Config, ["lora.rank=4"])
    assert config.lora == LoraConfig(rank=4)
    with pytest.raises(ConfigError, match=r"missing required key 'lora\.rank' \(int\): LoRA rank"):
        parse_cli(Config, ["lora.alpha=2"])


def test_module_attr_imports_callables_and_marked_fields():
    config = parse_cli(Config, ["reward_fn=math:fsum", "sandbox_factory=pathlib:Path.cwd"])
    assert config.reward_fn is math.fsum
    assert config.sandbox_factory == Path.cwd
    assert parse_cli(Config, ["reward_fn=null"]).reward_fn is None
    with pytest.raises(ConfigError, match=r"reward_fn='math:nope': cannot import .*no attribute"):
        parse_cli(Config, ["reward_fn=math:nope"])
    with pytest.raises(ConfigError, match=r"reward_fn='no_such_module:f': cannot import"):
        parse_cli(Config, ["reward_fn=no_such_module:f"])
    with pytest.raises(ConfigError, match="expected 'module:attr'"):
        parse_cli(Config, ["sandbox_factory=math.fsum"])
    assert import_object("os.path:join") is os.path.join


def test_unknown_keys_suggest_the_closest():
    with pytest.raises(ConfigError) as error:
        parse_cli(Config, ["lerning_rate=1"])
    assert str(error.value) == "unknown key 'lerning_rate'; did you mean 'learning_rate'?"
    with pytest.raises(ConfigError, match=r"did you mean 'teacher\.temperature'"):
        parse_cli(Config, ["temperature=0.3"])
    with pytest.raises(ConfigError, match=r"unknown key 'zzz' \(run with --help"):
        parse_cli(Config, ["zzz=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rate\.x'"):
        parse_cli(Config, ["learning_rate.x=1"])


def test_bad_values_name_key_value_and_expectation():
    cases = {
        "lora_rank=abc": "lora_rank='abc': Input should be a valid integer",
        "learning_rate=fast": "learning_rate='fast': Input should be a valid number",
        "resume=maybe": "resume='maybe': Input should be a valid boolean",
        "backend=cloud": "backend='cloud': Input should be 'local' or 'docker'",
        "loss=mse": "loss='mse': Input should be 'sampled_reverse_kl' or 'jsd'",
        "seeds=1,x": "seeds='1,x' (at 1): Input should be a valid integer",
        "weights=[1]": "weights='[1]': Input should be a valid dictionary",
        'weights={"x":': "weights='{\"x\":': expected an object as JSON",
    }
    for arg, message in cases.items():
        with pytest.raises(ConfigError) as error:
            parse_cli(Config, [arg])
        assert message in str(error.value), (arg, str(error.value))


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as error:
        parse_cli(
            Config,
            [
                "lora_rank",
                "lerning_rate=1",
                'weights={"x":',
                "reward_fn=math:nope",
                "backend=cloud",
                "resume=maybe",
            ],
        )
    lines = str(error.value).splitlines()
    assert lines[0] == "expected key=value, got 'lora_rank'"
    assert "did you mean 'learning_rate'" in lines[1]
    assert lines[2].startswith("weights='{\"x\":': expected an object as JSON")
    assert lines[3].startswith("reward_fn='math:nope': cannot import")
    # then the validation errors, in field order
    assert lines[4].startswith("resume='maybe': Input should be a valid boolean")
    assert lines[5].startswith("backend='cloud': Input should be 'local' or 'docker'")
    assert len(lines) == 6  # nothing reported twice
    with pytest.raises(ConfigError) as error:
        parse_cli(Required, ["taks=x"])
    assert str(error.value).splitlines() == [
        "unknown key 'taks'; did you mean 'tasks'?",
        "missing required key 'tasks' (path): Harbor task folder.",
    ]


def test_required_keys_and_model_validators():
    with pytest.raises(ConfigError, match=r"missing required key 'tasks' \(path\): Harbor task"):
        parse_cli(Required, [])
    with pytest.raises(ConfigError, match="group_size='0': Input should be greater than or equal"):
        parse_cli(Required, ["tasks=t", "group_size=0"])
    # the validator's own message, without pydantic's "Value error, " or its internals
    with pytest.raises(ConfigError) as error:
        parse_cli(Required, ["tasks=t", "group_size=3"])
    assert str(error.value) == "config: group_size 3 is unlucky"


def test_help_lists_every_key_with_type_default_and_description(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_cli(Config, ["lora_rank=1", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out == format_help(Config)
    assert "A test recipe." in out and "Not shown" not in out
    expected_lines = [
        "  model_name: str = HuggingFaceTB/SmolLM2-135M-Instruct",
        "      The student: a Hugging Face id or a local folder.",
        "  learning_rate: float = 0.0001",
        "      Adam learning rate.",
        "  max_steps: int | null = null",
        "  resume: bool = false",
        "  loss: {sampled_reverse_kl, jsd} = sampled_reverse_kl",
        "  backend: {local, docker} = local",
        "  tasks: list[str] = []",
        "  seeds: tuple[int, ...] = [1, 2]",
        "  log_path: path = /tmp/run",
        "  teacher.*  The frozen teacher.",
        "  teacher.model_name: str = big",
        "  teacher.temperature: float = 1.0",
        "      Teacher softmax temperature.",
        "  lora.rank: int (required)",
        "  reward_fn: module:attr | null = null",
        "  sandbox_factory: module:attr = null",
    ]
    lines = out.splitlines()
    for line in expected_lines:
        assert line in lines, line
    assert all(f"  {name}" in out for name in Config.model_fields)


def test_config_files_are_a_base_that_arguments_override(tmp_path):
    (tmp_path / "base.json").write_text(
        json.dumps({"lora_rank": 2, "teacher": {"temperature": 0.25}, "reward_fn": "math:fsum"})
    )
    (tmp_path / "base.toml").write_text('lora_rank = 3\n[teacher]\nmodel_name = "toml"\n')
    (tmp_path / "base.yaml").write_text("lora_rank: 5\nresume: true\n")
    config = parse_cli(Config, ["lora_rank=9", f"config={tmp_path / 'base.json'}"])
    assert config.lora_rank == 9  # the argument wins, whatever the order
    assert config.teacher == TeacherConfig(model_name="big", temperature=0.25)
    assert config.reward_fn is math.fsum
    config = parse_cli(Config, [f"config={tmp_path / 'base.toml'}"])
    assert config.lora_rank == 3 and config.teacher.model_name == "toml"
    config = parse_cli(Config, [f"config={tmp_path / 'base.yaml'}"])
    assert config.lora_rank == 5 and config.resume is True


def test_config_file_errors_name_the_file(tmp_path):
    bad_key = tmp_path / "bad.json"
    bad_key.write_text(json.dumps({"teacher": {"temprature": 1}}))
    with pytest.raises(
        ConfigError, match=rf"{re.escape(str(bad_key))}: unknown key 'teacher\.temprature'; did"
    ):
        parse_cli(Config, [f"config={bad_key}"])
    with pytest.raises(ConfigError, match=r"config file not found: .*missing\.json"):
        parse_cli(Config, [f"config={tmp_path / 'missing.json'}"])
    broken = tmp_path / "broken.toml"
    broken.write_text("lora_rank = = 3")
    with pytest.raises(ConfigError, match=f"{re.escape(str(broken))}: cannot parse"):
        parse_cli(Config, [f"config={broken}"])
    listing = tmp_path / "list.json"
    listing.write_text("[1]")
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_cli(Config, [f"config={listing}"])
    with pytest.raises(ConfigError, match=r"unknown config format '\.ini'"):
        (tmp_path / "x.ini").write_text("")
        parse_cli(Config, [f"config={tmp_path / 'x.ini'}"])
    typed = tmp_path / "typed.json"
    typed.write_text(json.dumps({"lora_rank": "many"}))
    with pytest.raises(ConfigError, match="lora_rank=many: Input should be a valid integer"):
        parse_cli(Config, [f"config={typed}"])


def test_dump_round_trips_through_a_config_file(tmp_path):
    config = parse_cli(
        Config,
        [
            "loss=jsd",
            "teacher.temperature=0.5",
            "reward_fn=math:fsum",
            "lora.rank=4",
            "sandbox_factory=pathlib:Path.cwd",
            "log_path=x/y",
        ],
    )
    dumped = dump_config(config)
    assert dumped["reward_fn"] == "math:fsum" and dumped["sandbox_factory"] == "pathlib:Path.cwd"
    assert dumped["loss"] == "jsd" and dumped["log_path"] == "x/y"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dumped))
    assert parse_cli(Config, [f"config={path}"]) == config


def test_reserved_config_key():
    class Clash(BaseModel):
        config: str = "x"

    with pytest.raises(ConfigError, match="reserved"):
        parse_cli(Clash, [])


def test_run_cli_calls_main_and_exits_2_on_errors(capsys):
    assert run_cli(lambda c: c.lora_rank * 2, Config, ["lora_rank=21"]) == 42

    async def async_main(config: Config) -> int:
        return config.lora_rank

    assert run_cli(async_main, Config, ["lora_rank=5"]) == 5
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda c: None, Config, ["lerning_rate=1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown key 'lerning_rate'; did you mean 'learning_rate'?")

    def main_finds_a_problem(config: Config) -> None:
        raise ConfigError(f"backend={config.backend}: no docker daemon answers")

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main_finds_a_problem, Config, ["backend=docker"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: backend=docker: no docker daemon answers")


def test_as_a_real_command(tmp_path):
    recipe = tmp_path / "toy_recipe.py"
    recipe.write_text(
        textwrap.dedent(
            """
            from recipes.cli import RecipeConfig, dump_config, run_cli
            import json

            class Config(RecipeConfig):
                \"\"\"Toy recipe.\"\"\"
                steps: int = 1
                \"\"\"How many steps.\"\"\"

            def main(config: Config) -> None:
                print(json.dumps(dump_config(config)))

            if __name__ == "__main__":
                run_cli(main, Config)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "toy_recipe", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )

    ok = run("steps=3")
    assert ok.returncode == 0 and json.loads(ok.stdout) == {"steps": 3}
    bad = run("steps=x")
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: steps='x': Input should be a valid integer")
    helped = run("--help")
    assert helped.returncode == 0
    assert helped.stdout.startswith("usage: python -m toy_recipe [key=value ...]")
    assert "  steps: int = 1\n      How many steps.\n" in helped.stdout


class NoAlpha(LoraConfig):
    excluded_keys: ClassVar[dict[str, str]] = {"alpha": "this adapter scales by its rank alone"}


class Narrow(Config):
    """A recipe without a teacher: the inherited teacher keys mean nothing in it."""

    excluded_keys: ClassVar[dict[str, str]] = {
        "teacher": "there is no teacher, the reward is the signal",
        "loss": "the loss is always the policy gradient",
    }
    lora: NoAlpha | None = NoAlpha(rank=4)


def test_excluded_keys_are_errors_giving_the_reason(tmp_path):
    with pytest.raises(ConfigError) as error:
        parse_cli(Narrow, ["loss=jsd", "teacher.model_name=x", "lora.alpha=2", "teacher={}"])
    lines = str(error.value).splitlines()
    assert lines == [
        "key 'loss' does not apply to this recipe: the loss is always the policy gradient",
        "key 'teacher' does not apply to this recipe: there is no teacher, the reward is the "
        "signal",
        "key 'lora.alpha' does not apply to this recipe: this adapter scales by its rank alone",
        "key 'teacher' does not apply to this recipe: there is no teacher, the reward is the "
        "signal",
    ]
    # a typo is not steered toward an excluded key
    with pytest.raises(ConfigError, match="unknown key 'los'") as error:
        parse_cli(Narrow, ["los=jsd"])
    assert "'loss'" not in str(error.value)
    # in a config file, with the file's name
    base = tmp_path / "base.toml"
    base.write_text("learning_rate = 0.1\n[lora]\nrank = 2\nalpha = 3.0\n")
    with pytest.raises(ConfigError) as error:
        parse_cli(Narrow, [f"config={base}"])
    assert str(error.value) == (
        f"{base}: key 'lora.alpha' does not apply to this recipe: this adapter scales by its "
        "rank alone"
    )
    # and from Python
    with pytest.raises(ValidationError, match="key 'loss' does not apply to this recipe"):
        Narrow(loss=Loss.JSD)
    with pytest.raises(ValidationError, match="key 'alpha' does not apply to this recipe"):
        NoAlpha(rank=2, alpha=1.0)


def test_excluded_keys_keep_their_defaults_and_leave_help_and_dump(tmp_path):
    config = parse_cli(Narrow, ["learning_rate=0.5", "lora.rank=2"])
    assert config.loss is Loss.SAMPLED_REVERSE_KL and config.teacher.model_name == "big"
    assert config.lora == NoAlpha(rank=2) and config.lora.alpha is None

    text = format_help(Narrow, prog="narrow")
    assert "\n  learning_rate: float = 0.0001" in text and "\n  lora.rank: int = 4" in text
    for hidden in ("loss", "teacher", "lora.alpha"):
        assert f"\n  {hidden}" not in text, hidden
    assert "\n  loss" in format_help(Config, prog="x")  # the base config still has them

    dumped = dump_config(config)
    assert "loss" not in dumped and "teacher" not in dumped and dumped["lora"] == {"rank": 2}
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(dumped))
    assert parse_cli(Narrow, [f"config={saved}"]) == config


def test_excluded_keys_must_name_fields():
    with pytest.raises(
        TypeError, match=re.escape("Typo.excluded_keys names no field: lerning_rate")
    ):

        class Typo(Config):
            excluded_keys: ClassVar[dict[str, str]] = {"lerning_rate": "no optimizer"}


def test_a_config_file_lists_every_problem_at_once(tmp_path):
    """Unknown keys (also in a group) do not hide the file's bad values or the command line's."""
    base = tmp_path / "base.toml"
    base.write_text('lerning_rate = 1e-4\nlora_rank = "four"\n[teacher]\ntemprature = 2\n')
    with pytest.raises(ConfigError) as error:
        parse_cli(Config, [f"config={base}", "resume=maybe"])
    assert str(error.value).splitlines() == [
        f"{base}: unknown key 'lerning_rate'; did you mean 'learning_rate'?",
        f"{base}: unknown key 'teacher.temprature'; did you mean 'teacher.temperature'?",
        "lora_rank=four: Input should be a valid integer, unable to parse string as an integer",
        "resume='maybe': Input should be a valid boolean, unable to interpret input",
    ]


def test_ctrl_c_prints_one_line_and_exits_130(capsys):
    """What the interrupted code noted on the way out (a training run: where it stopped, how to
    resume) is the line; the cancellation asyncio turned into KeyboardInterrupt carries it."""

    def interrupted(config: Config) -> None:
        stop = KeyboardInterrupt()
        stop.add_note("during step 2 of 3; last checkpoint: none (save_every=10)")
        raise stop

    with pytest.raises(SystemExit) as exit_info:
        run_cli(interrupted, Config, [])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == (
        "interrupted during step 2 of 3; last checkpoint: none (save_every=10)\n"
    )

    def cancelled_by_ctrl_c(config: Config) -> None:
        cancelled = asyncio.CancelledError()
        cancelled.add_note("during step 1 of 1")
        try:
            raise cancelled
        except asyncio.CancelledError:
            raise KeyboardInterrupt  # noqa: B904 - what asyncio.Runner raises after Ctrl-C

    with pytest.raises(SystemExit) as exit_info:
        run_cli(cancelled_by_ctrl_c, Config, [])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "interrupted during step 1 of 1\n"

    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda config: (_ for _ in ()).throw(KeyboardInterrupt), Config, [])
    assert exit_info.value.code == 130 and capsys.readouterr().err == "interrupted (Ctrl-C)\n"
