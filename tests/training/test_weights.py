"""training.weights: every way of pointing at a model (folder, adapter, checkpoint with an
adapter or full weights, run folder) loads the same weights the trainer had."""

from __future__ import annotations

import pytest
import torch

from training import checkpoints, models
from training.errors import CheckpointError, ModelLoadError
from training.weights import load_weights

PROMPT = torch.tensor([[1, 40, 41, 42, 43, 44]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits


@pytest.fixture
def base_folder(tmp_path, make_tiny_model, smollm2_tokenizer):
    folder = tmp_path / "base"
    make_tiny_model(seed=1).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


def trained_lora(base_folder):
    model = models.load_model(base_folder, dtype="fp32", lora=models.LoraSettings(rank=4))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2)
    return model.eval()


def test_adapters_checkpoints_and_run_folders_load_the_trained_weights(base_folder, tmp_path):
    model = trained_lora(base_folder)
    expected = logits(model)
    assert not torch.allclose(expected, logits(models.load_model(base_folder, dtype="fp32")))
    tokenizer = models.load_tokenizer(base_folder)
    adapter = checkpoints.export_adapter(model, tmp_path / "export" / "adapter", tokenizer)
    merged = checkpoints.export_merged(model, tmp_path / "export" / "merged", tokenizer)
    state = checkpoints.TrainingState(step=3, config={"model_name": str(base_folder)})
    run = tmp_path / "run"
    checkpoint = checkpoints.save_checkpoint(run, state, model)
    for source, kind in (
        (adapter, "adapter"),
        (merged, "model"),
        (checkpoint, "checkpoint"),
        (run, "checkpoint"),
    ):
        loaded = load_weights(source, dtype="fp32")
        assert loaded.kind == kind, source
        torch.testing.assert_close(logits(loaded.model), expected, atol=1e-4, rtol=0)
        assert len(loaded.tokenizer) == len(models.load_tokenizer(base_folder))
    assert load_weights(adapter, dtype="fp32").base_model == str(base_folder)


def test_a_full_weights_checkpoint_loads_onto_its_base(base_folder, tmp_path):
    model = models.load_model(base_folder, dtype="fp32")
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # tied with the embeddings: a visible change
    state = checkpoints.TrainingState(step=1, config={"model_name": str(base_folder)})
    checkpoint = checkpoints.save_checkpoint(tmp_path / "run", state, model)
    loaded = load_weights(checkpoint, dtype="fp32")
    torch.testing.assert_close(logits(loaded.model), logits(model), atol=1e-4, rtol=0)
    bare = checkpoints.save_checkpoint(tmp_path / "bare", checkpoints.TrainingState(step=1), model)
    with pytest.raises(CheckpointError, match="names no model_name"):
        load_weights(bare)


def test_an_adapter_without_a_base_is_an_error(base_folder, tmp_path):
    adapter = checkpoints.export_adapter(trained_lora(base_folder), tmp_path / "adapter")
    config = adapter / "adapter_config.json"
    config.write_text(config.read_text().replace(str(base_folder), ""))
    with pytest.raises(ModelLoadError, match="names no base_model_name_or_path"):
        load_weights(adapter)
    assert load_weights(adapter, base_model=str(base_folder), dtype="fp32").kind == "adapter"
