"""The embedding projector of tokenizer transfer (ALM_SPEC §8; `alm.train.embedding_projector`).

E' = E + P(E) on the student's new input embeddings: P matches a float64 formula written from its definition; at
step 0 the student is exactly the un-projected one; P trains (its zero-initialised branch gets gradients); the
saved student is a plain model whose table is W + P(W) and gives the training model's log-probs (BPE transfer,
with LoRA, and the n-gram byte student); `alm train` trains and saves it, also under LoRA; a tied student and an
embedding that scales its rows are refused.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tolerance import assert_fp32_close
from torch import nn
from train_helpers import train_recipe

from alm.config import load_yaml_model
from alm.config.train import LoraConfig, StudentConfig, TrainRecipe
from alm.errors import ConfigError
from alm.train.checkpoint import list_checkpoints, load_checkpoint
from alm.train.embedding_projector import (
    EmbeddingProjector,
    fold_embedding_table,
    make_embedding_projector,
)
from alm.train.log import read_metrics
from alm.train.loop import run_train
from alm.train.step import TrainModule
from alm.train.student import apply_lora, load_student, save_student

KINDS = ("linear", "mlp")


def _transfer_student(teacher_dir: Path, tokenizer: str, **transfer):
    cfg = StudentConfig(
        transfer={
            "from": str(teacher_dir),
            "tokenizer": tokenizer,
            "untie_embeddings": True,
            **transfer,
        }  # pyright: ignore[reportArgumentType]
    )
    return load_student(cfg, teacher_model=None, seed=0)


def _randomise(projector: EmbeddingProjector, seed: int) -> None:
    """Give every parameter of `projector` a nonzero draw (a trained projector)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in projector.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))


def reference_projected_rows(rows: torch.Tensor, kind: str, state: dict[str, torch.Tensor]):
    """float64 e + P(e), written from the definitions (linear: A e + b; mlp: W2 gelu(W1 LN(e) + b1) + b2)."""
    e = rows.double()
    p = {k: v.double() for k, v in state.items()}
    if kind == "linear":
        return e + e @ p["layers.0.weight"].T + p["layers.0.bias"]
    mean = e.mean(-1, keepdim=True)
    var = ((e - mean) ** 2).mean(-1, keepdim=True)
    normed = (e - mean) / torch.sqrt(var + 1e-5) * p["layers.0.weight"] + p["layers.0.bias"]
    inner = normed @ p["layers.1.weight"].T + p["layers.1.bias"]
    gelu = 0.5 * inner * (1 + torch.erf(inner / math.sqrt(2)))
    return e + gelu @ p["layers.3.weight"].T + p["layers.3.bias"]


def _ids(student, text: str = "The projector folds into the table, byte for byte.") -> torch.Tensor:
    return torch.tensor([student.tokenizer(text, add_special_tokens=False)["input_ids"]])


@pytest.mark.parametrize("kind", KINDS)
def test_projected_rows_match_the_float64_definition(kind):
    projector = EmbeddingProjector(kind, 24)
    _randomise(projector, 3)
    rows = torch.randn(5, 7, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = rows + projector(rows)
    want = reference_projected_rows(rows, kind, projector.state_dict())
    assert_fp32_close(got.numpy(), want.numpy(), ulps=64)
    folded = fold_embedding_table(rows[0], kind, projector.state_dict())
    assert_fp32_close(folded.numpy(), want[0].numpy(), ulps=64)


@pytest.mark.parametrize("kind", KINDS)
def test_at_step_zero_the_student_is_exactly_the_unprojected_one_and_the_projector_trains(
    teacher_dir, student_dir, kind
):
    student = _transfer_student(teacher_dir, str(student_dir), embedding_projector=kind)
    width = student.model.config.hidden_size
    projector = make_embedding_projector(kind, student.model.get_input_embeddings(), width)
    assert projector is not None
    ids = _ids(student)
    mask = torch.ones_like(ids)
    plain = TrainModule(student.model)
    projected = TrainModule(student.model, None, projector)
    with torch.no_grad():
        want, _ = plain(ids, mask)
    got, _ = projected(ids, mask)
    assert torch.equal(got, want)
    got.logsumexp(-1).sum().backward()
    last = projector.layers[-1]
    assert isinstance(last, nn.Linear) and last.weight.grad is not None
    assert last.weight.grad.abs().sum() > 0 and last.bias.grad is not None
    assert last.bias.grad.abs().sum() > 0


def _saved_logp(folder: Path, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return torch.log_softmax(loaded(input_ids=ids).logits, -1)


def _training_logp(module: TrainModule, ids: torch.Tensor) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        logits, _ = module(ids, torch.ones_like(ids))
    return torch.log_softmax(logits, -1)


@pytest.mark.parametrize("kind", KINDS)
def test_saved_bpe_student_is_a_plain_model_with_the_folded_table_and_the_training_logprobs(
    teacher_dir, student_dir, tmp_path, kind
):
    student = _transfer_student(teacher_dir, str(student_dir), embedding_projector=kind)
    projector = make_embedding_projector(
        kind, student.model.get_input_embeddings(), student.model.config.hidden_size
    )
    assert projector is not None
    _randomise(projector, 5)
    module = TrainModule(student.model, None, projector)
    ids = _ids(student)
    want = _training_logp(module, ids)
    table = student.model.get_input_embeddings().weight.detach().clone()
    save_student(
        student.model,
        student.tokenizer,
        tmp_path / "student",
        fold_input_embeddings=lambda w: fold_embedding_table(w, kind, projector.state_dict()),
    )
    saved = load_file(tmp_path / "student" / "model.safetensors")
    assert not any("projector" in key for key in saved)
    folded = reference_projected_rows(table, kind, projector.state_dict())
    assert_fp32_close(saved["model.embed_tokens.weight"].numpy(), folded.numpy(), ulps=64)
    assert not torch.equal(saved["model.embed_tokens.weight"], table)  # the projector is in it
    # the in-memory student is untouched: training could go on after a save
    assert torch.equal(student.model.get_input_embeddings().weight, table)
    got = _saved_logp(tmp_path / "student", ids)
    # the rows' P computed per batch in training, per table at save: a few fp32 roundings apart
    assert_fp32_close(got.numpy(), want.numpy(), ulps=256, scale=10.0)


def test_saved_lora_student_with_a_projector_merges_and_folds(teacher_dir, student_dir, tmp_path):
    student = _transfer_student(teacher_dir, str(student_dir), embedding_projector="mlp")
    projector = make_embedding_projector(
        "mlp", student.model.get_input_embeddings(), student.model.config.hidden_size
    )
    assert projector is not None
    _randomise(projector, 6)
    lora_model = apply_lora(student.model, LoraConfig(r=4, alpha=8))
    trainable = {n for n, p in lora_model.named_parameters() if p.requires_grad}
    assert any("embed_tokens" in n for n in trainable)  # embeddings trained fully (ALM_SPEC §8)
    with torch.no_grad():  # a trained adapter and embedding copy
        for name, param in lora_model.named_parameters():
            if "lora_B" in name or ("modules_to_save" in name and "embed_tokens" in name):
                param.add_(0.02 * torch.randn_like(param))
    module = TrainModule(lora_model, None, projector)
    ids = _ids(student)
    want = _training_logp(module, ids)
    save_student(
        lora_model,
        student.tokenizer,
        tmp_path / "student",
        fold_input_embeddings=lambda w: fold_embedding_table(w, "mlp", projector.state_dict()),
    )
    saved = load_file(tmp_path / "student" / "model.safetensors")
    assert not any("lora" in key or "modules_to_save" in key for key in saved)
    got = _saved_logp(tmp_path / "student", ids)
    assert_fp32_close(got.numpy(), want.numpy(), ulps=256, scale=10.0)


def test_saved_ngram_byte_student_with_a_projector_gives_the_training_logprobs(
    teacher_dir, tmp_path
):
    student = _transfer_student(
        teacher_dir, "bytes", ngram_embeddings=True, embedding_projector="linear"
    )
    projector = make_embedding_projector(
        "linear", student.model.get_input_embeddings(), student.model.config.hidden_size
    )
    assert projector is not None
    _randomise(projector, 7)
    module = TrainModule(student.model, None, projector)
    ids = _ids(student)
    want = _training_logp(module, ids)
    save_student(
        student.model,
        student.tokenizer,
        tmp_path / "student",
        fold_input_embeddings=lambda w: fold_embedding_table(w, "linear", projector.state_dict()),
    )
    got = _saved_logp(tmp_path / "student", ids, trust_remote_code=True)
    assert_fp32_close(got.numpy(), want.numpy(), ulps=256, scale=10.0)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_alm_train_trains_the_projector_and_saves_its_folded_table(
    tmp_path, stores, student_dir, lora
):
    changes = {"lora": {"r": 4, "alpha": 8}} if lora else {}
    recipe = train_recipe(
        tmp_path / "r.yaml",
        store=stores["heldout"],
        output=tmp_path / "out",
        student={
            "transfer": {
                "from": "teacher",
                "tokenizer": str(student_dir),
                "untie_embeddings": True,
                "embedding_projector": "mlp",
            }
        },
        loss={"kind": "alm+sft"},
        optim__steps=3,
        **changes,
    )
    run_train(load_yaml_model(TrainRecipe, recipe))
    values = [r["loss"] for r in read_metrics(tmp_path / "out") if "loss" in r]
    assert len(values) == 3 and all(math.isfinite(v) for v in values)
    state = load_checkpoint(list_checkpoints(tmp_path / "out")[-1])["model"]
    projector_state = {
        k.removeprefix("embedding_projector."): v
        for k, v in state.items()
        if k.startswith("embedding_projector.")
    }
    assert projector_state["layers.3.weight"].abs().sum() > 0  # trained off its zero start
    assert projector_state["layers.1.weight"].abs().sum() > 0
    # LoRA trains a full copy of the embedding (peft's modules_to_save) and merges it at save
    table_key = next(
        k
        for k in state
        if "embed_tokens" in k
        and k.endswith(".weight")
        and ("modules_to_save" in k if lora else "original_module" not in k)
    )
    saved = load_file(tmp_path / "out" / "student" / "model.safetensors")
    assert not any("projector" in key or "lora" in key for key in saved)
    want = fold_embedding_table(state[table_key], "mlp", projector_state)
    assert torch.equal(saved["model.embed_tokens.weight"], want)


def test_a_projector_on_tied_embeddings_is_refused():
    with pytest.raises(ValueError, match="untie_embeddings: true"):
        StudentConfig(
            transfer={"tokenizer": "bytes", "embedding_projector": "linear"}  # pyright: ignore[reportArgumentType]
        )
    assert StudentConfig(transfer={"tokenizer": "bytes"}).transfer is not None  # pyright: ignore[reportArgumentType]


def test_an_embedding_that_changes_its_rows_is_refused():
    class ScaledEmbedding(nn.Embedding):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            return super().forward(input) * 4.0

    with pytest.raises(ConfigError, match="ScaledEmbedding"):
        make_embedding_projector("mlp", ScaledEmbedding(10, 4), 4)
    assert make_embedding_projector("identity", ScaledEmbedding(10, 4), 4) is None


def test_a_resumed_projector_run_matches_an_uninterrupted_one_bitwise(
    tmp_path, stores, student_dir
):
    student = {
        "transfer": {
            "from": "teacher",
            "tokenizer": str(student_dir),
            "untie_embeddings": True,
            "embedding_projector": "linear",
        }
    }
    common = {"store": stores["heldout"], "student": student, "optim__steps": 3}
    full = train_recipe(tmp_path / "full.yaml", output=tmp_path / "full", **common)
    run_train(load_yaml_model(TrainRecipe, full))
    part = train_recipe(tmp_path / "part.yaml", output=tmp_path / "part", **common)
    run_train(load_yaml_model(TrainRecipe, part, ["stop_after_steps=2"]))
    run_train(
        load_yaml_model(TrainRecipe, part), resume=True
    )  # the projector and its AdamW state restored
    losses = [
        [r["loss"] for r in read_metrics(tmp_path / n) if "loss" in r] for n in ("full", "part")
    ]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    weights_full = load_file(tmp_path / "full" / "student" / "model.safetensors")
    weights_part = load_file(tmp_path / "part" / "student" / "model.safetensors")
    assert weights_full.keys() == weights_part.keys()
    assert all(torch.equal(value, weights_part[key]) for key, value in weights_full.items())
