"""Loading Harbor tasks (own parsing is Harbor's), load-time errors that name the path, the
bundled suite, registries and train/test splits."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from envs.errors import TaskLoadError, TaskSplitError
from envs.harbor.tasks import (
    SUITE_DIR,
    bundled_split,
    load_dataset,
    load_registry,
    load_task,
    load_tasks,
    split_tasks,
)
from tests.envs.conftest import TASK_TOML


def test_load_task_honours_task_toml(make_task):
    path = make_task(
        "tuned",
        task_toml="""
[agent]
timeout_sec = 42.0
[verifier]
timeout_sec = 7.0
[verifier.env]
MODE = "strict"
[environment]
cpus = 2
memory_mb = 1024
storage_mb = 2048
network_mode = "no-network"
workdir = "/work"
docker_image = "debian:bookworm-slim"
""",
    )
    task = load_task(path)
    assert task.name == "tuned"
    assert task.path == path.resolve()
    assert task.instruction == "Do the thing.\n"
    assert task.agent_timeout_s == 42.0
    assert task.verifier_timeout_s == 7.0
    env = task.config.environment
    assert (env.cpus, env.memory_mb, env.storage_mb) == (2, 1024, 2048)
    assert env.network_mode.value == "no-network"
    assert env.workdir == "/work"
    assert env.docker_image == "debian:bookworm-slim"
    assert task.config.verifier.env == {"MODE": "strict"}
    assert task.reference_solution == "#!/bin/bash\necho solved > /app/out.txt\n"


def test_legacy_allow_internet_maps_to_network_mode(make_task):
    path = make_task(task_toml="[environment]\nallow_internet = false\n")
    with pytest.warns(DeprecationWarning):
        task = load_task(path)
    assert task.config.environment.network_mode.value == "no-network"


def test_task_name_comes_from_task_section(make_task):
    path = make_task("folder", task_toml='[task]\nname = "acme/pretty-name"\n')
    assert load_task(path).name == "acme/pretty-name"


def test_task_without_solution_has_no_reference(make_task):
    task = load_task(make_task(solve_sh=None))
    assert task.solve_script is None and task.reference_solution is None


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"task_toml": None}, "missing task.toml"),
        ({"instruction": None}, "missing instruction.md"),
        ({"test_sh": None}, "missing tests/test.sh"),
        ({"task_toml": "[agent\ntimeout_sec = 1"}, "task.toml is not valid TOML"),
        ({"task_toml": '[agent]\ntimeout_sec = "soon"\n'}, "task.toml: agent.timeout_sec"),
        ({"task_toml": '[environment]\nnetwork_mode = "maybe"\n'}, "environment.network_mode"),
        ({"instruction": "  \n"}, "instruction.md is empty"),
        ({"dockerfile": None}, "no environment: expected environment/Dockerfile"),
        (
            {"task_toml": '[environment]\nos = "windows"\n', "files": {"tests/test.bat": "x"}},
            "only linux tasks",
        ),
        (
            {"task_toml": '[[steps]]\nname = "one"\n', "files": {"steps/one/instruction.md": "x"}},
            "multi-step tasks",
        ),
        ({"task_toml": "[environment]\ngpus = 1\n"}, "needs 1 GPU(s); no backend here has GPUs"),
        (
            {"task_toml": '[environment]\nenv = { A = "${APPRENTICE_UNSET_VAR}" }\n'},
            "[environment].env: Environment variable 'APPRENTICE_UNSET_VAR' not found",
        ),
        (
            {"task_toml": '[environment]\nnetwork_mode = "allowlist"\nallowed_hosts = ["x.org"]\n'},
            "network_mode='allowlist' (x.org) cannot be enforced here",
        ),
    ],
)
def test_broken_task_fails_at_load_with_path_and_reason(make_task, kwargs, problem):
    path = make_task("broken", **kwargs)
    with pytest.raises(TaskLoadError) as info:
        load_task(path)
    message = str(info.value)
    assert str(path.resolve()) in message
    assert problem in message
    assert list(info.value.problems) == [path.resolve()]


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(TaskLoadError, match=r"nowhere: does not exist"):
        load_tasks(tmp_path / "nowhere")


def test_dataset_folder_loads_every_task_and_ignores_other_folders(make_task, tmp_path):
    make_task("b-task")
    make_task("a-task")
    (tmp_path / "tasks" / ".git").mkdir()
    (tmp_path / "tasks" / "notes").mkdir()  # no task markers: not a task
    (tmp_path / "tasks" / "README.md").write_text("a dataset\n")
    tasks = load_tasks(tmp_path / "tasks")
    assert [t.name for t in tasks] == ["a-task", "b-task"]


def test_dataset_folder_reports_every_broken_task(make_task, tmp_path):
    make_task("good")
    bad_toml = make_task("bad-toml", task_toml="[agent\n")
    no_tests = make_task("no-tests", test_sh=None)
    with pytest.raises(TaskLoadError) as info:
        load_dataset(tmp_path / "tasks")
    assert set(info.value.problems) == {bad_toml.resolve(), no_tests.resolve()}
    assert "cannot load 2 Harbor tasks" in str(info.value)


def test_empty_dataset_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaskLoadError, match="contains no Harbor task directories"):
        load_dataset(tmp_path / "empty")


def test_a_task_reached_through_two_sources_is_loaded_once(make_task, tmp_path):
    one = make_task("one")
    make_task("two")
    tasks = load_tasks(tmp_path / "tasks", one)
    assert [t.name for t in tasks] == ["one", "two"]


def test_duplicate_task_names_are_an_error(make_task, tmp_path):
    one = make_task("one", task_toml='[task]\nname = "acme/same"\n')
    two = make_task("two", task_toml='[task]\nname = "acme/same"\n')
    with pytest.raises(TaskLoadError, match="'acme/same' is also used by"):
        load_tasks(one, two)


# ---- registry.json ------------------------------------------------------------------------


def _registry(path: Path, tasks: list[dict], name: str = "local-set", version: str = "1.0"):
    path.write_text(
        json.dumps([{"name": name, "version": version, "description": "", "tasks": tasks}])
    )
    return path


def test_local_registry_resolves_paths_next_to_the_file(make_task, tmp_path):
    make_task("alpha")
    make_task("beta")
    registry = _registry(
        tmp_path / "registry.json",
        [{"name": "alpha", "path": "tasks/alpha"}, {"name": "beta", "path": "tasks/beta"}],
    )
    assert [t.name for t in load_tasks(registry)] == ["alpha", "beta"]
    assert [t.name for t in load_tasks(f"{registry}:local-set@1.0")] == ["alpha", "beta"]


def test_registry_errors_name_the_problem(make_task, tmp_path):
    make_task("alpha")
    registry = _registry(
        tmp_path / "registry.json",
        [
            {"name": "alpha", "path": "tasks/alpha"},
            {"name": "gone", "path": "tasks/gone"},
            {"name": "remote", "path": "x", "git_url": "https://example.invalid/r.git"},
            {"name": "remote2", "path": "y", "git_url": "https://example.invalid/s.git"},
        ],
    )
    with pytest.raises(TaskLoadError) as info:
        load_registry(registry)
    text = str(info.value)
    assert "(registry task 'gone') does not exist" in text
    assert "task 'remote' of dataset" in text and "task 'remote2' of dataset" in text
    with pytest.raises(TaskLoadError, match=r"no dataset 'other' in the registry \(has: local"):
        load_registry(registry, "other")
    (tmp_path / "bad.json").write_text('{"not": "a list"}')
    with pytest.raises(TaskLoadError, match=r"not a valid Harbor registry\.json"):
        load_registry(tmp_path / "bad.json")


# ---- the bundled suite ---------------------------------------------------------------------


def test_bundled_suite_has_at_least_40_tasks_split_train_and_test():
    tasks = load_tasks("bundled")
    assert len(tasks) >= 40
    split = bundled_split()
    train, test = {t.name for t in split.train}, {t.name for t in split.test}
    assert train | test == {t.name for t in tasks} and not train & test
    assert len(test) >= 8 and len(train) >= 30
    assert [t.name for t in load_tasks("bundled:test")] == [t.name for t in split.test]


def test_bundled_tasks_follow_the_suite_conventions():
    for task in load_tasks("bundled"):
        env = task.config.environment
        assert env.network_mode.value == "no-network", task.name
        assert env.cpus == 1 and env.memory_mb and env.memory_mb <= 1024, task.name
        assert task.agent_timeout_s and task.agent_timeout_s <= 300, task.name
        assert task.verifier_timeout_s <= 60, task.name
        assert task.reference_solution is not None, task.name
        dockerfile = (task.environment_dir / "Dockerfile").read_text().splitlines()
        assert dockerfile[0] == "FROM debian:bookworm-slim", task.name
        assert "WORKDIR /app" in dockerfile, task.name
        allowed = ("FROM ", "WORKDIR ", "COPY ", "RUN ", "ENV ")
        assert all(line.startswith(allowed) for line in dockerfile if line), task.name
        assert "/logs/verifier/reward.txt" in (task.tests_dir / "test.sh").read_text()


def test_bundled_split_file_lists_each_task_once():
    declared = tomllib.loads((SUITE_DIR / "split.toml").read_text())
    names = declared["train"] + declared["test"]
    assert len(names) == len(set(names))


def test_unknown_bundled_split_is_an_error():
    with pytest.raises(TaskLoadError, match="unknown bundled split 'dev'"):
        load_tasks("bundled:dev")


# ---- splits -------------------------------------------------------------------------------


@pytest.fixture
def five_tasks(make_task):
    return [load_task(make_task(name)) for name in ("count-a", "count-b", "sort-a", "sort-b", "x")]


def names(tasks):
    return sorted(t.name for t in tasks)


def test_split_by_names_and_globs(five_tasks):
    split = split_tasks(five_tasks, test=["sort-*", "x"])
    assert names(split.test) == ["sort-a", "sort-b", "x"]
    assert names(split.train) == ["count-a", "count-b"]
    split = split_tasks(five_tasks, train=["count-*"])
    assert names(split.test) == ["sort-a", "sort-b", "x"]
    split = split_tasks(five_tasks, train=["count-a"], test=["x"])
    assert (names(split.train), names(split.test)) == (["count-a"], ["x"])


def test_seeded_fraction_split_is_reproducible_and_disjoint(five_tasks):
    one = split_tasks(five_tasks, test_fraction=0.4, seed=3)
    two = split_tasks(list(reversed(five_tasks)), test_fraction=0.4, seed=3)
    assert names(one.test) == names(two.test)
    assert len(one.test) == 2 and len(one.train) == 3
    assert not set(names(one.test)) & set(names(one.train))
    splits = [split_tasks(five_tasks, test_fraction=0.4, seed=i) for i in range(8)]
    picks = {tuple(names(split.test)) for split in splits}
    assert len(picks) > 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"test": ["nope-*"]}, "test pattern 'nope-\\*' matches no task"),
        ({"train": ["count-*"], "test": ["count-a"]}, "in both train and test"),
        ({"test": ["*"]}, "leaves no train tasks"),
        ({"test_fraction": 1.5}, "test_fraction must be in"),
        ({"test": ["x"], "test_fraction": 0.5}, "not both"),
        ({}, "no split given"),
    ],
)
def test_bad_splits_are_errors(five_tasks, kwargs, message):
    with pytest.raises(TaskSplitError, match=message):
        split_tasks(five_tasks, **kwargs)


def test_task_toml_template_is_valid(make_task):
    """The fixture's task.toml is what the other tests build on."""
    assert load_task(make_task(task_toml=TASK_TOML)).verifier_timeout_s == 20.0
