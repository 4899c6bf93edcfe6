"""Checkpoints on CPU with tiny random Llama models: exact resume (weights, losses, metrics),
crashes mid-write, keep-last-K, and exports that transformers and peft load as they are."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import training.checkpoints as checkpoints
from training.checkpoints import (
    Checkpointer,
    TrainingState,
    export_adapter,
    export_merged,
    later_checkpoints,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    refuse_later_checkpoints,
    save_checkpoint,
)
from training.errors import CheckpointError

REPO = Path(__file__).resolve().parents[2]
VOCAB = 64


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=0.1,  # training draws from torch's RNG
    )


def build(lora: bool, init_seed: int):
    """Model, optimizer and scheduler as a recipe builds them. The base weights always come
    from seed 0 (a pretrained base, loaded again on resume); ``init_seed`` drives everything a
    fresh run initialises itself (the adapter, or all weights in full fine-tuning)."""
    torch.manual_seed(0 if lora else init_seed)
    model = LlamaForCausalLM(tiny_config())
    if lora:
        torch.manual_seed(init_seed)
        config = LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]
        )
        model = get_peft_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 3) * 0.9**s
    )
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler, state: TrainingState) -> float:
    """Draws from python, numpy and torch RNGs and reads the data position, like a real loop."""
    offset = random.randrange(8)
    scale = 1.0 + float(np.random.rand())
    tokens = torch.randint(0, VOCAB, (2, 12))
    tokens[:, 0] = (offset + state.data_state["cursor"]) % VOCAB
    model.train()
    loss = model(input_ids=tokens, labels=tokens).loss * scale
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    state.step += 1
    state.data_state["cursor"] += 3
    state.metrics_state["loss_sum"] += loss.item()
    return loss.item()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fresh_state() -> TrainingState:
    return TrainingState(
        step=0,
        data_state={"cursor": 0},
        metrics_state={"loss_sum": 0.0},
        config={"lr": 1e-2, "name": "tiny"},
    )


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, lora):
    steps = 6
    model, optimizer, scheduler = build(lora, init_seed=1)
    seed_everything(123)
    state = fresh_state()
    uninterrupted = [train_step(model, optimizer, scheduler, state) for _ in range(steps)]
    expected_weights, expected_metrics = trainable(model), dict(state.metrics_state)

    model, optimizer, scheduler = build(lora, init_seed=1)
    seed_everything(123)
    state = fresh_state()
    checkpointer = Checkpointer(tmp_path, save_every=steps // 2)
    first_half = []
    for _ in range(steps // 2):
        first_half.append(train_step(model, optimizer, scheduler, state))
        checkpointer.maybe_save(state, model, optimizer, scheduler)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000003"]
    del model, optimizer, scheduler

    # A fresh process: other RNG states, another initialisation, new optimizer and scheduler.
    seed_everything(999)
    model, optimizer, scheduler = build(lora, init_seed=2)
    resumed = load_checkpoint(tmp_path, model, optimizer, scheduler)
    assert resumed.step == steps // 2
    assert resumed.config == {"lr": 1e-2, "name": "tiny"}
    second_half = [train_step(model, optimizer, scheduler, resumed) for _ in range(steps // 2)]

    assert first_half + second_half == uninterrupted  # bitwise
    weights = trainable(model)
    assert weights.keys() == expected_weights.keys()
    for name, tensor in expected_weights.items():
        assert torch.equal(weights[name], tensor), name
    assert resumed.metrics_state == expected_metrics
    assert resumed.data_state == {"cursor": 3 * steps}


def test_resume_without_rng_diverges(tmp_path):
    """The control: the RNG states are part of what makes the resume exact."""
    model, optimizer, scheduler = build(True, init_seed=1)
    seed_everything(123)
    state = fresh_state()
    train_step(model, optimizer, scheduler, state)
    save_checkpoint(tmp_path, state, model, optimizer, scheduler)
    reference = train_step(model, optimizer, scheduler, state)

    seed_everything(999)
    model, optimizer, scheduler = build(True, init_seed=2)
    resumed = load_checkpoint(tmp_path, model, optimizer, scheduler, restore_rng=False)
    assert train_step(model, optimizer, scheduler, resumed) != reference


class Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 4)


def test_a_crash_inside_the_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model = Linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(tmp_path, TrainingState(step=2), model, optimizer)
    saved = model.layer.weight.detach().clone()
    with torch.no_grad():
        model.layer.weight.add_(1.0)

    def disk_full() -> dict:
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoints, "_rng_state", disk_full)  # after weights and optimizer
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, TrainingState(step=4), model, optimizer)

    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_000002"]
    assert latest_checkpoint(tmp_path) == root / "step_000002"
    state = load_checkpoint(tmp_path, model, optimizer)
    assert state.step == 2
    assert torch.equal(model.layer.weight, saved)


def test_a_process_killed_mid_write_leaves_only_a_hidden_leftover(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, torch
        import training.checkpoints as ck
        model = torch.nn.Linear(4, 4)
        ck.save_checkpoint({str(tmp_path)!r}, ck.TrainingState(step=1), model)
        real_save = ck._torch_save
        def save_then_die(obj, path):
            real_save(obj, path)
            os._exit(3)  # killed after the first file of step 2
        ck._torch_save = save_then_die
        ck.save_checkpoint({str(tmp_path)!r}, ck.TrainingState(step=2), model)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True)
    assert result.returncode == 3, result.stderr.decode()
    root = tmp_path / "checkpoints"
    leftovers = [p for p in root.iterdir() if p.name.startswith(".tmp-step_000002")]
    assert len(leftovers) == 1 and any(leftovers[0].iterdir())
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000001"]

    save_checkpoint(tmp_path, TrainingState(step=3), torch.nn.Linear(4, 4))
    assert sorted(p.name for p in root.iterdir()) == ["step_000001", "step_000003"]


def test_keep_last_k_and_the_save_schedule(tmp_path):
    model = Linear()
    checkpointer = Checkpointer(tmp_path, save_every=2, keep_last=2)
    saved = []
    for step in range(1, 6):
        path = checkpointer.maybe_save(TrainingState(step=step), model, final=step == 5)
        saved.append(path.name if path else None)
    assert saved == [None, "step_000002", None, "step_000004", "step_000005"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000004", "step_000005"]
    # the end of a run that just saved periodically is not saved twice
    assert checkpointer.maybe_save(TrainingState(step=5), model, final=True) is None

    for step in range(6, 10):
        save_checkpoint(tmp_path, TrainingState(step=step), model, keep_last=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step_000007",
        "step_000008",
        "step_000009",
    ]
    only_final = Checkpointer(tmp_path / "other", save_every=0)
    assert not only_final.due(4) and only_final.due(4, final=True)


def test_saving_a_step_again_replaces_it(tmp_path):
    model = Linear()
    save_checkpoint(tmp_path, TrainingState(step=3, metrics_state={"v": 1}), model)
    save_checkpoint(tmp_path, TrainingState(step=3, metrics_state={"v": 2}), model)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000003"]
    assert load_checkpoint(tmp_path, model).metrics_state == {"v": 2}


def test_state_json_is_readable(tmp_path):
    model = Linear()
    path = save_checkpoint(
        tmp_path, TrainingState(step=7, data_state={"epoch": 1}, config={"lr": 0.1}), model
    )
    meta = json.loads((path / "state.json").read_text())
    assert meta["step"] == 7 and meta["weights"] == "full"
    assert meta["data_state"] == {"epoch": 1} and meta["config"] == {"lr": 0.1}
    assert {p.name for p in path.iterdir()} == {"state.json", "model.safetensors", "rng.pt"}


def test_errors_name_the_problem(tmp_path):
    model = Linear()
    with pytest.raises(CheckpointError, match=f"no checkpoint at {re.escape(str(tmp_path))}"):
        load_checkpoint(tmp_path, model)
    with pytest.raises(CheckpointError, match="not JSON"):
        save_checkpoint(tmp_path, TrainingState(step=1, config={"fn": print}), model)
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="keep_last"):
        save_checkpoint(tmp_path, TrainingState(step=1), model, keep_last=0)

    save_checkpoint(tmp_path, TrainingState(step=1), model)
    with pytest.raises(CheckpointError, match=r"no optimizer\.pt"):
        load_checkpoint(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(CheckpointError, match="do not fit the model"):
        load_checkpoint(tmp_path, torch.nn.Linear(3, 3))
    with pytest.raises(CheckpointError, match="LoRA adapter but the model has none"):
        lora_model, _, _ = build(True, init_seed=1)
        save_checkpoint(tmp_path / "lora", TrainingState(step=1), lora_model)
        load_checkpoint(tmp_path / "lora", LlamaForCausalLM(tiny_config()))
    with pytest.raises(CheckpointError, match="use export_merged"):
        export_adapter(model, tmp_path / "adapter")


def test_exports_load_in_transformers_and_peft(tmp_path):
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config())
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    tokens = torch.randint(0, VOCAB, (2, 10))
    for _ in range(3):  # move the adapter away from its zero initialisation
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
        base_logits = AutoModelForCausalLM.from_pretrained(tmp_path / "base")(tokens).logits
    assert not torch.allclose(expected, base_logits, atol=1e-4), "the adapter changed nothing"

    merged_dir = export_merged(model, tmp_path / "merged")
    assert not (merged_dir / "adapter_config.json").exists()
    merged, info = AutoModelForCausalLM.from_pretrained(merged_dir, output_loading_info=True)
    assert type(merged) is LlamaForCausalLM
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any("lora" in name for name in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(tokens).logits, expected, rtol=1e-5, atol=1e-5)
    # the model passed in keeps its adapter and its outputs
    assert isinstance(model, PeftModel)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=tokens).logits, expected)

    adapter_dir = export_adapter(model, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in adapter_dir.iterdir()
    }
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), adapter_dir
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=tokens).logits, expected)

    # exporting again replaces the folder atomically
    export_adapter(model, tmp_path / "adapter")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_only_the_newest_checkpoint_of_a_run_can_be_continued_in_place(tmp_path):
    for step in (2, 4, 10):
        folder = tmp_path / "checkpoints" / f"step_{step:06d}"
        folder.mkdir(parents=True)
        (folder / "state.json").write_text("{}")
    root = tmp_path / "checkpoints"
    assert [p.name for p in later_checkpoints(tmp_path, root / "step_000002")] == [
        "step_000004",
        "step_000010",
    ]
    with pytest.raises(CheckpointError, match=r"later: step_000004, step_000010\)"):
        refuse_later_checkpoints(tmp_path, root / "step_000002")
    refuse_later_checkpoints(tmp_path, root / "step_000010")
    refuse_later_checkpoints(tmp_path / "branch", root / "step_000002")  # a new folder
