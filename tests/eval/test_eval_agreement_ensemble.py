"""Agreement with a teacher store (zero for the teacher itself), the in-training evaluation (what its docstring
says), and ensembles (one member = that model; two = the hand-averaged probabilities), plus `generate` and
ensemble recipes."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import bpe_tokenizer, byte_tokenizer, corpus_texts, tiny_llama
from tolerance import assert_fp32_close
from torch import nn

from alm.errors import ConfigError
from alm.eval import (
    Ensemble,
    EvalText,
    generate,
    load_ensemble,
    score_texts,
    scoring_model,
    store_agreement,
)
from alm.eval.models import load_hf_model
from alm.store.reader import open_store
from alm.templates import family_for_tokenizer
from alm.train.batch import StudentExampleBuilder
from alm.train.evaluate import eval_batches, evaluate

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def teacher_and_store(tmp_path_factory) -> tuple[Path, Path]:
    from train.train_helpers import precompute

    root = tmp_path_factory.mktemp("eval_store")
    folder = root / "teacher"
    tokenizer = bpe_tokenizer(512)
    tiny_llama(len(tokenizer), seed=7).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, precompute(
        root, folder, "heldout", split="heldout", limit=6, hidden=False, precision="exact"
    )


def test_the_teacher_itself_has_zero_chunk_disagreement_and_zero_binarised_kl(
    teacher_and_store,
) -> None:
    teacher, store = teacher_and_store
    agreement = store_agreement(load_hf_model(str(teacher)), str(store))
    assert agreement.num_sequences == 6 and agreement.num_chunks > 50 and agreement.num_groups > 10
    # the stored fp32 log-probs and the recomputed ones come from the same kernels on other batch shapes
    assert agreement.chunk_abs_logp_diff < 1e-4
    assert abs(agreement.binarised_kl) < 1e-6


def test_another_model_disagrees_and_is_scored_on_its_own_tokenization(teacher_and_store) -> None:
    _, store = teacher_and_store
    tokenizer = byte_tokenizer()
    student = scoring_model(tiny_llama(len(tokenizer), seed=1), tokenizer, name="bytes")
    agreement = store_agreement(student, str(store))
    assert agreement.chunk_abs_logp_diff > 0.5 and agreement.binarised_kl > 0


def _members(num: int):
    tokenizer = bpe_tokenizer(512)
    return tokenizer, [
        scoring_model(tiny_llama(len(tokenizer), seed=20 + k), tokenizer, name=f"m{k}")
        for k in range(num)
    ]


TEXTS = [EvalText(str(i), s.encode()) for i, s in enumerate(corpus_texts(4, seed=8))]


@pytest.mark.parametrize("combine", ["probs", "logprobs"])
def test_an_ensemble_of_one_model_equals_that_model(combine: str) -> None:
    _, (member,) = _members(1)
    alone = score_texts(member, TEXTS)
    ensemble = score_texts(Ensemble("one", [member], combine), TEXTS)  # type: ignore[arg-type]
    assert_fp32_close(ensemble.nll_nats, alone.nll_nats, scale=float(alone.nll_nats.max()))


def _hand_averaged_nll(members, tokenizer, text: str, combine: str) -> float:
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = torch.tensor([[eot, *tokenizer(text, add_special_tokens=False)["input_ids"]]])
    with torch.no_grad():
        probs = [torch.softmax(m.model(input_ids=ids).logits[0].double(), -1) for m in members]
    if combine == "probs":
        logp = torch.log((probs[0] + probs[1]) / 2)
    else:
        logp = torch.log_softmax((torch.log(probs[0]) + torch.log(probs[1])) / 2, -1)
    positions = torch.arange(ids.shape[1] - 1)
    return -float(logp[positions, ids[0, positions + 1]].sum())


@pytest.mark.parametrize("combine", ["probs", "logprobs"])
def test_an_ensemble_of_two_scores_the_hand_averaged_probabilities(combine: str) -> None:
    tokenizer, members = _members(2)
    scores = score_texts(Ensemble("two", members, combine), TEXTS, token_budget=64)  # type: ignore[arg-type]
    expected = np.array(
        [_hand_averaged_nll(members, tokenizer, t.text.decode(), combine) for t in TEXTS]
    )
    assert_fp32_close(scores.nll_nats, expected, scale=float(expected.max()))
    # mixing probabilities is never worse than the average member (log is concave)
    if combine == "probs":
        each = [score_texts(m, TEXTS).nll_nats for m in members]
        assert (scores.nll_nats <= (each[0] + each[1]) / 2 + 1e-3).all()


def test_members_with_different_tokenizers_are_refused() -> None:
    _, (member,) = _members(1)
    other_tok = byte_tokenizer()
    other = scoring_model(tiny_llama(len(other_tok)), other_tok, name="bytes")
    with pytest.raises(ConfigError, match="share the tokenizer"):
        Ensemble("mixed", [member, other])


def test_ensemble_recipe_round_trip_and_greedy_generation(tmp_path: Path) -> None:
    tokenizer, members = _members(2)
    for k, m in enumerate(members):
        m.model.save_pretrained(tmp_path / f"m{k}")
        tokenizer.save_pretrained(tmp_path / f"m{k}")
        m.name = str(tmp_path / f"m{k}")
    recipe = Ensemble("pair", members, "probs").save(tmp_path / "pair.yaml")
    loaded = load_ensemble(recipe)
    assert [m.name for m in loaded.members] == [
        m.name for m in members
    ] and loaded.combine == "probs"
    assert_fp32_close(
        score_texts(loaded, TEXTS).nll_nats,
        score_texts(Ensemble("pair", members), TEXTS).nll_nats,
        scale=100,
    )
    # greedy generation follows the argmax of the averaged distribution, step by step
    out = generate(loaded, "The", max_new_tokens=5, stop_at_eos=False)
    prompt = tokenizer("The")["input_ids"]
    ids = [tokenizer.convert_tokens_to_ids("<|endoftext|>"), *prompt]
    for _ in range(5):
        x = torch.tensor([ids])
        with torch.no_grad():
            p = sum(torch.softmax(m.model(input_ids=x).logits[0, -1].double(), -1) for m in members)
        ids.append(int(torch.argmax(p)))
    assert out == tokenizer.decode(ids[1 + len(prompt) :])


def test_bad_ensemble_recipe_is_one_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("ensemble:\n  members: []\n  combine: median\n")
    with pytest.raises(ConfigError, match="combine"):
        load_ensemble(bad)


class _Module(nn.Module):
    """`model(input_ids, attention_mask) -> (logits, None)`, as `TrainModule` is called."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits, None


def test_in_training_eval_of_the_teacher_matches_the_store_and_a_float64_forward(
    teacher_and_store,
) -> None:
    folder, store = teacher_and_store
    scorer = load_hf_model(str(folder))
    builder = StudentExampleBuilder(
        teacher_vocab=open_store(str(store)).vocab,
        student_tokenizer=scorer.tokenizer,
        student_vocab=scorer.vocab,
        student_family=family_for_tokenizer(scorer.vocab),
        max_length=512,
        boundary_class_ids=[0, 1],
        gamma=0.1,
        with_eval=True,
    )
    batches = list(eval_batches(str(store), builder, 4, 0, 1, None))
    figures = evaluate(
        _Module(scorer.model), iter(batches), torch.device("cpu"), lambda t: t, vocab_size=None
    )
    assert figures["eval/num_sequences"] == 6

    # Reference from the docstring: each sequence alone, float64 weights, positions >= 1 of its rendering.
    reference = copy.deepcopy(scorer.model).double()
    nll = 0.0
    student_bytes = 0
    for batch in batches:
        assert batch.eval is not None
        student_bytes += int(batch.eval.student_num_bytes.sum())
        for row in range(batch.input_ids.shape[0]):
            ids = batch.input_ids[row, : int(batch.attention_mask[row].sum())][None]  # [1, T]
            with torch.no_grad():
                logp = torch.log_softmax(reference(input_ids=ids).logits[0], dim=-1)  # [T, V]
            nll -= float(logp[:-1].gather(1, ids[0, 1:, None]).sum())
    assert_fp32_close(figures["eval/student_bpb"], nll / (student_bytes * math.log(2)))
    # The student is the teacher with its tokenizer: the same figure as the stored log-probs give,
    assert_fp32_close(figures["eval/student_bpb"], figures["eval/teacher_bpb"])
    # and the chunk figure is `alm eval`'s (both ~0 here; alm eval's also uses `chunk_abs_logp_diff`).
    agreement = store_agreement(scorer, str(store))
    assert figures["eval/chunk_abs_logp_diff"] < 1e-4 and agreement.chunk_abs_logp_diff < 1e-4
