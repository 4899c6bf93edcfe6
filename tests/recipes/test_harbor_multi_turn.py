"""The multi-turn Harbor distillation recipe end to end on tiny random models, real bundled
Harbor tasks in real bubblewrap sandboxes; its reference demonstrations solve the tasks; lmbda
mixes in seeded off-policy steps (reference solutions or teacher-written turns); every key is in
--help; bad configs, bad task folders, a run folder that holds a run and resume problems exit
with status 2 and a message that names the problem, before the models load; the summary counts
eval episodes that could not be graded; Ctrl-C says where the run stopped and how to resume."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import anyio
import pytest
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tok_models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from envs.harbor.builders import HarborDatasetBuilder, HarborEnvConfig
from envs.harbor.tasks import SUITE_DIR, load_tasks
from envs.harbor.teacher_view import solution_commands
from recipes.cli import run_cli
from recipes.common import interruption
from recipes.distillation.harbor_multi_turn import Config, check_backend, main, reference_script
from tool_use.renderers import get_renderer
from tool_use.trajectory import read_jsonl
from training.eval import evaluate
from training.metrics import read_metrics
from training.off_policy import LmbdaMix
from training.rollouts import RolloutSettings, ScriptedPolicy

REPO = Path(__file__).resolve().parents[2]
EVAL_TASKS = ["chmod-secret", "count-words"]
MIX_TASKS = ["hello-file", "count-lines"]

pytestmark = pytest.mark.bwrap


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, make_tiny_model, smollm2_tokenizer) -> tuple[Path, Path]:
    """Two tiny random models (student, teacher) saved as folders with SmolLM2's tokenizer."""
    out = []
    for seed in (1, 2):
        folder = tmp_path_factory.mktemp(f"tiny{seed}")
        make_tiny_model(seed=seed).save_pretrained(folder)
        smollm2_tokenizer.save_pretrained(folder)
        out.append(folder)
    return out[0], out[1]


def tiny_config(tiny_dirs, log_path: Path, **overrides) -> Config:
    student, teacher = tiny_dirs
    options = dict(
        model_name=str(student),
        teacher_model=str(teacher),
        tasks=["bundled:train"],
        eval_tasks=[str(SUITE_DIR / name) for name in EVAL_TASKS],
        max_steps=2,
        sft_warmup_steps=1,
        groups_per_batch=2,
        group_size=2,
        max_turns=2,
        max_tokens=48,
        max_trajectory_tokens=1000,
        lora_rank=4,
        dtype="fp32",
        log_path=str(log_path),
        progress=False,
        eval_every=0,
        save_every=1,
        export_merged=True,
    )
    return Config(**{**options, **overrides})


def test_end_to_end_on_tiny_models_and_bundled_tasks(tiny_dirs, tmp_path, capsys):
    result = anyio.run(main, tiny_config(tiny_dirs, tmp_path))

    before, warmup, opd = read_metrics(tmp_path)
    assert before["step"] == 0 and before["eval/episodes"] == 2
    assert before["eval/episodes/invalid"] == 0 and "eval/success_rate" in before
    assert warmup["phase/sft_warmup"] == 1.0 and warmup["loss/nll"] > 0
    assert warmup["episodes/valid"] == 4 and warmup["env/tool_calls"] == 1.0
    assert opd["phase/sft_warmup"] == 0.0 and opd["episodes/valid"] == 4
    assert opd["teacher_kl"] == opd["teacher_kl"]  # a number, not NaN
    assert "eval/success_rate" in opd  # the final evaluation

    # the warmup replayed each task's reference solution as a real bash call in its sandbox
    demos = list(read_jsonl(tmp_path / "rollouts" / "step_0001.jsonl"))
    for demo in demos:
        (call,) = demo.messages[2].tool_calls
        assert call.name == "bash" and demo.messages[3].content.startswith("exit code: 0")
        assert demo.teacher_messages is not None
        assert "REFERENCE SOLUTION" in demo.teacher_messages[1].content

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_name"] == str(tiny_dirs[0]) and config["log_path"] == str(tmp_path)
    assert result.checkpoint == tmp_path / "checkpoints" / "step_000002"
    assert (result.exported["adapter"] / "adapter_config.json").is_file()
    merged = LlamaForCausalLM.from_pretrained(result.exported["merged"])
    assert merged.config.vocab_size == 49152
    # the reports: the KL plot, and the viewer with episodes of both steps
    assert (tmp_path / "report.png").read_bytes().startswith(b"\x89PNG")
    viewer = (tmp_path / "rollouts.html").read_text()
    assert "<h2>step_0001.jsonl" in viewer and "<h2>step_0002.jsonl" in viewer

    out = capsys.readouterr().out
    assert "teacher KL" in out and "after   0 steps: " in out and str(tmp_path) in out


def test_the_eval_summary_counts_ungradeable_episodes_and_warns_of_trained_tasks(
    tiny_dirs, tmp_path, capsys, caplog
):
    """An eval task that is also trained on is named at start-up (its success is not
    held-out); an eval episode that could not be graded is counted in the summary and written
    with reward null, its failure quoting what test.sh printed."""
    broken = tmp_path / "tasks" / "no-reward"
    shutil.copytree(SUITE_DIR / "hello-file", broken)
    (broken / "tests" / "test.sh").write_text("#!/bin/bash\nif then fi (\necho 1 > x\n")
    trained = str(SUITE_DIR / "hello-file")
    config = tiny_config(
        tiny_dirs,
        tmp_path / "run",
        tasks=[trained],
        eval_tasks=[trained, str(broken)],
        max_steps=1,
        sft_warmup_steps=0,
        group_size=1,
        groups_per_batch=1,
        max_turns=1,
        max_tokens=8,
        eval_before=False,
        save_every=0,
        export_merged=False,
    )
    with caplog.at_level(logging.WARNING):
        anyio.run(main, config)

    out = capsys.readouterr().out
    assert "eval: 2 tasks, 1 of them also trained on (not held-out)" in out
    assert "eval_tasks overlap tasks" in caplog.text and "(hello-file)" in caplog.text
    assert "held-out" not in out.split("Done:")[1]
    assert "\nDone: 1 step.\n" in out
    assert re.search(r"after   1 step: \d\.\d{3}   \(1 graded, 1 could not be graded\)", out), out
    lines = (tmp_path / "run" / "rollouts" / "eval_0001.jsonl").read_text().splitlines()
    episodes = {record["metadata"]["task"]: record for record in map(json.loads, lines)}
    assert episodes["no-reward"]["reward"] is None
    assert "syntax error near unexpected token" in episodes["no-reward"]["failure"]
    assert episodes["hello-file"]["reward"] in (0.0, 1.0)  # graded: a number, even a 0
    read_back = {
        t.metadata["task"]: t for t in read_jsonl(tmp_path / "run/rollouts/eval_0001.jsonl")
    }
    assert not read_back["no-reward"].valid and read_back["no-reward"].reward == 0.0


def test_reference_demonstrations_solve_their_tasks(smollm2_tokenizer):
    """The SFT warmup's demonstrations are real solutions: replayed through the bash tool and
    graded by each task's own tests, they score 1."""
    names = ["hello-file", "count-lines", "sort-names", "make-dirs"]
    tasks = load_tasks(*(SUITE_DIR / name for name in names))
    config = HarborEnvConfig(
        tasks=[str(t.path) for t in tasks],
        eval_tasks=[str(t.path) for t in tasks],
        groups_per_batch=4,
    )
    _, eval_set = HarborDatasetBuilder(config, check_backend("local"))()
    renderer = get_renderer(None, smollm2_tokenizer)
    policy = ScriptedPolicy(reference_script(tasks), renderer)
    metrics, trajectories = anyio.run(
        evaluate, eval_set, policy, renderer, RolloutSettings(max_tokens=512)
    )
    assert metrics["eval/episodes/invalid"] == 0
    assert metrics["eval/success_rate"] == 1.0, [t.messages[-2:] for t in trajectories]


def mix_config(tiny_dirs, log_path: Path, **overrides) -> Config:
    """Small lmbda runs: two tasks, one episode each, no evaluation, no warm start."""
    options = dict(
        tasks=[str(SUITE_DIR / name) for name in MIX_TASKS],
        eval_tasks=[],
        max_steps=3,
        sft_warmup_steps=0,
        group_size=1,
        max_tokens=96,  # the reference commands fit
        save_every=0,
        export_merged=False,
        seed=1,
    )
    return tiny_config(tiny_dirs, log_path, **{**options, **overrides})


def test_lmbda_mixes_reference_solution_steps_into_distillation(tiny_dirs, tmp_path):
    anyio.run(main, mix_config(tiny_dirs, tmp_path, lmbda=0.5))

    records = read_metrics(tmp_path)
    choices = LmbdaMix(0.5, policy=None, objective=None, seed=1)  # type: ignore[arg-type]
    expected = [0.0 if choices.on_policy(step) else 1.0 for step in range(3)]
    assert expected == [0.0, 1.0, 0.0], "seed 1 gives on-, off-, on-policy steps"
    assert [r["phase/off_policy"] for r in records] == expected
    solutions = {
        t.name: t.reference_solution for t in load_tasks(*(SUITE_DIR / n for n in MIX_TASKS))
    }
    for record, off in zip(records, expected, strict=True):
        episodes = list(read_jsonl(tmp_path / "rollouts" / f"step_{record['step']:04d}.jsonl"))
        assert len(episodes) == 2
        if off:  # SFT on the reference solutions, replayed as real bash calls; no teacher KL
            assert record["loss/nll"] > 0 and "teacher_kl" not in record
            assert record["env/tool_calls"] == 1.0
            for episode in episodes:
                (call,) = episode.messages[2].tool_calls
                command = json.loads(call.arguments)["command"]
                assert command == solution_commands(solutions[episode.metadata["task"]])
                assert episode.messages[3].content.startswith("exit code: 0")
        else:  # the student's own samples, scored by the teacher
            assert math.isfinite(record["teacher_kl"]) and "loss/nll" not in record


def test_lmbda_1_makes_every_step_on_policy(tiny_dirs, tmp_path, capsys):
    anyio.run(main, mix_config(tiny_dirs, tmp_path, lmbda=1.0))

    out = capsys.readouterr().out  # no eval tasks: said at the start and in the summary
    assert out.startswith("eval: none (no eval tasks; set eval_tasks=")
    assert "\n  eval:        none (no eval tasks; set eval_tasks=" in out
    assert "\nDone: 3 steps.\n" in out

    records = read_metrics(tmp_path)
    assert len(records) == 3
    for record in records:  # no mix at all: every step samples the student
        assert record.get("phase/off_policy", 0.0) == 0.0 and "loss/nll" not in record
        assert math.isfinite(record["teacher_kl"])


def test_lmbda_with_teacher_written_turns(tiny_dirs, tmp_path):
    anyio.run(
        main,
        mix_config(
            tiny_dirs, tmp_path, lmbda=0.0, off_policy_source="teacher", loss="jsd", max_steps=1
        ),
    )

    (record,) = read_metrics(tmp_path)
    assert record["phase/off_policy"] == 1.0 and "teacher_kl" not in record
    assert record["loss/divergence"] > 0 and record["episodes/valid"] == 2


def test_lmbda_needs_reference_solutions_and_a_teacher_at_start_up(tiny_dirs, tmp_path, capsys):
    student, teacher = tiny_dirs
    models = [f"model_name={student}", f"teacher_model={teacher}"]
    code, err = run(
        [
            *models,
            "lmbda=0.5",
            "off_policy_source=teacher",
            "sft_warmup_steps=1",
            "teacher_from_warmup=true",
            f"log_path={tmp_path / 'a'}",
        ],
        capsys,
    )
    assert code == 2 and "off_policy_source=teacher with teacher_from_warmup=true" in err

    unsolved = tmp_path / "unsolved"
    shutil.copytree(SUITE_DIR / "hello-file", unsolved)
    shutil.rmtree(unsolved / "solution")
    code, err = run(
        [*models, f"tasks={unsolved}", "lmbda=0.5", f"log_path={tmp_path / 'b'}"], capsys
    )
    assert code == 2 and "off_policy_source=dataset replays each task's reference solution" in err
    assert "unsolved" in err and not (tmp_path / "b").exists()


def run(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, Config, argv)
    return exit_info.value.code, capsys.readouterr().err


def test_help_lists_every_key():
    out = subprocess.run(
        [sys.executable, "-m", "recipes.distillation.harbor_multi_turn", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert out.returncode == 0
    for key in Config.model_fields:
        assert f"\n  {key}: " in out.stdout, key


def test_demo_help_shows_the_measured_defaults():
    out = subprocess.run(
        [sys.executable, "-m", "recipes.demo", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert out.returncode == 0
    for line in (
        "sft_warmup_steps: int = 5",
        "teacher_from_warmup: bool = true",
        "lr_schedule: {constant, linear, cosine} = cosine",
    ):
        assert line in out.stdout, line


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["lerning_rate=1e-4"], "did you mean 'learning_rate'"),
        (["loss=kl"], "loss='kl'"),
        (["group_size=0"], "group_size='0'"),
        (["resume=true"], "resume=true continues the run in log_path"),
        (["backend=no_such_module:Factory"], "backend='no_such_module:Factory': sandbox backend"),
        (["backend=harbor:nosuch"], "unknown Harbor environment type 'nosuch'; expected one of"),
        (["tasks="], "tasks='': give at least one task source"),
        (["teacher_template={nosuch}"], "teacher view template: unknown field {nosuch}"),
        (["model_name=/nowhere/model"], "model_name='/nowhere/model': local folder /nowhere/model"),
        (["teacher_model=./no-such-teacher"], "local folder ./no-such-teacher does not exist"),
        (["lora_alpha=-1"], "lora_alpha='-1': Input should be greater than 0"),
    ],
)
def test_bad_config_exits_2_naming_the_key(argv, expected, capsys):
    code, err = run(argv, capsys)
    assert code == 2 and expected in err and "Traceback" not in err
    for internal in ("Value error, ", "[type=", "input_value", "errors.pydantic.dev"):
        assert internal not in err, err


def test_a_backend_module_that_fails_on_import_is_a_config_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken_backend.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, err = run(["backend=broken_backend:Factory"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "cannot import it: RuntimeError: boom at import" in err


def test_every_command_line_problem_is_listed_at_once(capsys):
    code, err = run(["lerning_rate=1e-4", "group_size=four", "backend=cloud"], capsys)
    assert code == 2
    assert err.splitlines()[:3] == [
        "error: unknown key 'lerning_rate'; did you mean 'learning_rate'?",
        "backend='cloud': unknown sandbox backend 'cloud'; expected one of local, docker, "
        "harbor:<type>, module:attr",
        "group_size='four': Input should be a valid integer, unable to parse string as an integer",
    ]


# A model that cannot load: a start-up check that names the run folder must come first.
UNLOADABLE = "model_name=nobody-here/no-such-model"


def test_a_new_run_in_a_folder_holding_a_run_is_refused_before_models_load(tmp_path, capsys):
    old = tmp_path / "old-run"
    (old / "rollouts").mkdir(parents=True)
    (old / "metrics.jsonl").write_text('{"step": 1}\n')
    (old / "rollouts" / "step_0001.jsonl").write_text("")
    code, err = run([UNLOADABLE, f"log_path={old}"], capsys)
    assert code == 2 and "Traceback" not in err
    assert f"log_path={old} already holds a run (metrics.jsonl, rollouts/)" in err
    assert "resume=true" in err and "new or empty log_path" in err
    assert (old / "metrics.jsonl").read_text() == '{"step": 1}\n'  # untouched
    assert sorted(p.name for p in old.iterdir()) == ["metrics.jsonl", "rollouts"]


def test_resume_problems_exit_2_before_anything_is_written(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    code, err = run([UNLOADABLE, f"resume={missing}"], capsys)
    assert code == 2 and f"error: resume={missing}: no checkpoint at {missing}" in err
    assert not missing.exists()  # no stub folder

    interrupted = tmp_path / "interrupted"  # metrics of step 1, no checkpoint yet
    interrupted.mkdir()
    (interrupted / "metrics.jsonl").write_text('{"step": 1}\n')
    code, err = run([UNLOADABLE, f"log_path={interrupted}", "resume=true"], capsys)
    assert code == 2 and "Traceback" not in err
    assert f"resume=true: no checkpoint in {interrupted / 'checkpoints'}" in err
    assert sorted(p.name for p in interrupted.iterdir()) == ["metrics.jsonl"]


def test_resuming_an_older_checkpoint_into_its_own_run_is_refused(tmp_path, capsys):
    """Its later checkpoints would stay beside the new ones (resume=true would pick them)."""
    run_dir = tmp_path / "run"
    for step in (2, 4, 6):
        folder = run_dir / "checkpoints" / f"step_{step:06d}"
        folder.mkdir(parents=True)
        (folder / "state.json").write_text("{}")
    older = run_dir / "checkpoints" / "step_000002"
    code, err = run([UNLOADABLE, f"resume={older}"], capsys)
    assert code == 2 and "Traceback" not in err
    assert f"is not the newest checkpoint of the run in {run_dir} (later: step_000004, " in err
    assert "log_path=NEW_FOLDER" in err
    code, err = run([UNLOADABLE, f"resume={older}", f"log_path={tmp_path / 'branch'}"], capsys)
    assert code == 2 and "nobody-here/no-such-model" in err  # the branch passes the check
    code, err = run([UNLOADABLE, f"resume={run_dir}"], capsys)  # the newest: step_000006
    assert code == 2 and "nobody-here/no-such-model" in err


def test_a_log_path_that_cannot_be_a_folder_exits_2(tmp_path, capsys):
    a_file = tmp_path / "a-file.txt"
    a_file.write_text("")
    code, err = run([UNLOADABLE, f"log_path={a_file}"], capsys)
    assert code == 2 and f"log_path={a_file}: is a file, not a folder" in err
    code, err = run([UNLOADABLE, f"log_path={a_file / 'run'}"], capsys)
    assert code == 2 and f"log_path={a_file / 'run'}: cannot be created (Not a directory" in err
    assert "Traceback" not in err and a_file.is_file()


def test_bad_task_folders_exit_2_naming_the_path(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code, err = run([f"tasks={missing}"], capsys)
    assert code == 2 and str(missing) in err

    broken = tmp_path / "broken-task"
    shutil.copytree(SUITE_DIR / "hello-file", broken)
    (broken / "instruction.md").unlink()
    code, err = run([f"tasks={broken}"], capsys)
    assert code == 2 and str(broken) in err and "instruction.md" in err


def test_forced_prefix_larger_than_the_budget_exits_2(tiny_dirs, tmp_path, capsys):
    student, teacher = tiny_dirs
    argv = [
        f"model_name={student}",
        f"teacher_model={teacher}",
        "tool_choice=required",
        "max_tokens=4",
        f"log_path={tmp_path}",
    ]
    code, err = run(argv, capsys)
    assert code == 2 and "max_tokens=4" in err and "forced tool-call prefix" in err


def test_a_teacher_with_another_vocabulary_exits_2(tiny_dirs, tmp_path, capsys):
    words = ["<unk>", "<|im_start|>", "<|im_end|>", "hello", "world"]
    backend = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)}, "<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    other = tmp_path / "other-teacher"
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(other)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(words),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    ).save_pretrained(other)
    code, err = run(
        [f"model_name={tiny_dirs[0]}", f"teacher_model={other}", f"log_path={tmp_path / 'run'}"],
        capsys,
    )
    assert code == 2 and "cannot score student" in err and str(other) in err


def test_wandb_without_the_package_exits_2(tiny_dirs, tmp_path, capsys):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here; the test is about the message when it is not")
    student, teacher = tiny_dirs
    argv = [
        f"model_name={student}",
        f"teacher_model={teacher}",
        "wandb_project=demo",
        f"log_path={tmp_path}",
    ]
    code, err = run(argv, capsys)
    assert code == 2 and "wandb_project='demo' needs the wandb package" in err


def test_env_timeout_must_leave_room_for_harbors_own_limits(tmp_path):
    from envs.harbor.builders import bundled_split
    from envs.harbor.tasks import load_task
    from recipes.cli import ConfigError
    from recipes.common import HARBOR_SLACK_S, check_env_timeout

    split = bundled_split()
    tasks = [*split.train, *split.test]
    check_env_timeout(Config().env_timeout_s, tasks, command_timeout_s=30.0)  # the defaults fit
    check_env_timeout(None, tasks, command_timeout_s=30.0)

    # the last step runs every bash call the agent timeout allows, then the verifier
    slow = tmp_path / "slow-agent"
    shutil.copytree(SUITE_DIR / "hello-file", slow)
    toml = (slow / "task.toml").read_text()
    (slow / "task.toml").write_text(toml.replace("timeout_sec = 120.0", "timeout_sec = 3000.0"))
    task = load_task(slow)
    step = 3000.0 + task.verifier_timeout_s
    with pytest.raises(ConfigError) as caught:
        check_env_timeout(3600.0, [*tasks, task], command_timeout_s=30.0)
    message = str(caught.value)
    assert "'slow-agent': [agent].timeout_sec + [verifier].timeout_sec is" in message
    assert f"env_timeout_s={step + HARBOR_SLACK_S:g} or more" in message
    check_env_timeout(step + HARBOR_SLACK_S, [*tasks, task], command_timeout_s=30.0)

    # the image build, inside make_envs
    build = tmp_path / "slow-build"
    shutil.copytree(SUITE_DIR / "hello-file", build)
    toml = (build / "task.toml").read_text()
    (build / "task.toml").write_text(
        toml.replace("build_timeout_sec = 300.0", "build_timeout_sec = 3500.0")
    )
    with pytest.raises(
        ConfigError, match=r"'slow-build': \[environment\].build_timeout_sec is 3500"
    ):
        check_env_timeout(3600.0, [load_task(build)], command_timeout_s=30.0)

    # without an agent timeout, one bash call (command_timeout_s) bounds a step
    with pytest.raises(ConfigError, match=r"command_timeout_s \+ \[verifier\].timeout_sec is"):
        check_env_timeout(3600.0, [_without_agent_timeout(tmp_path)], command_timeout_s=5000.0)


def _without_agent_timeout(tmp_path):
    from envs.harbor.tasks import load_task

    folder = tmp_path / "no-agent-timeout"
    shutil.copytree(SUITE_DIR / "hello-file", folder)
    toml = (folder / "task.toml").read_text()
    (folder / "task.toml").write_text(toml.replace("[agent]\ntimeout_sec = 120.0\n", ""))
    task = load_task(folder)
    assert task.agent_timeout_s is None
    return task


def test_ctrl_c_says_where_the_run_stopped_and_exits_130(tmp_path):
    """SIGINT during a step, as from a terminal: no traceback, one line with the step, the last
    checkpoint (none yet: save_every) and what to do (clean-up: tests/sandboxes/test_cleanup)."""
    log = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "recipes.distillation.harbor_multi_turn",
        "model_name=tiny-random",
        "teacher_model=tiny-random:2",
        f"tasks={SUITE_DIR / 'hello-file'},{SUITE_DIR / 'count-lines'}",
        "eval_tasks=",
        "max_steps=1000",
        "group_size=2",
        "groups_per_batch=1",
        "max_turns=2",
        "max_tokens=16",
        "save_every=500",
        "progress=false",
        f"log_path={log}",
    ]
    child = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as at a terminal, also when pytest runs in the background (SIGINT ignored)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    metrics = log / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().strip()) and child.poll() is None:
        assert time.monotonic() < deadline, "no step finished in 300 s"
        time.sleep(0.2)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.fullmatch(
        r"interrupted during step \d+ of 1000; last checkpoint: none \(save_every=500\), so there "
        rf"is nothing to resume: start again in a new or empty log_path \(not {re.escape(str(log))}"
        r"\)\n",
        err,
    ), err


def test_an_interrupted_run_with_a_checkpoint_says_how_to_resume(tmp_path):
    checkpoint = tmp_path / "checkpoints" / "step_000004"
    trainer = SimpleNamespace(
        step_index=4,
        max_steps=30,
        log_path=tmp_path,
        config=SimpleNamespace(save_every=2),
        checkpointer=SimpleNamespace(latest=lambda: checkpoint),
    )
    assert interruption(trainer) == (
        f"during step 5 of 30; last checkpoint: {checkpoint}; resume with resume=true "
        f"log_path={tmp_path}"
    )
