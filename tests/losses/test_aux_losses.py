"""SFT (§7.2), hidden-state loss (§7.1), GradMag (§7.3), and the ALM loss with a live teacher on tiny real models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from factories import bpe_tokenizer, byte_tokenizer, tiny_llama
from torch.nn import functional

from alm.align import align_sequences
from alm.errors import AlmError
from alm.losses.alm import alm_live_teacher_loss, sequence_logp_and_boundary_logmass
from alm.losses.gradmag import gradmag_combine, last_block_parameters
from alm.losses.hidden import hidden_state_loss, make_hidden_projection
from alm.losses.sft import sft_loss
from alm.templates import plain_document, render
from alm.vocab import vocab_from_tokenizer

torch.set_num_threads(1)


def test_sft_loss_is_masked_cross_entropy_over_the_global_token_count():
    torch.manual_seed(0)
    logits = torch.randn(3, 9, 17, requires_grad=True)
    ids = torch.randint(0, 17, (3, 9))
    mask = torch.rand(3, 9) < 0.6
    loss = sft_loss(logits, ids, mask, num_tokens_global=40)
    target = torch.where(mask[:, 1:], ids[:, 1:], -100)
    want = functional.cross_entropy(
        logits[:, :-1].reshape(-1, 17), target.reshape(-1), reduction="sum", ignore_index=-100
    )
    assert loss.item() == pytest.approx(want.item() / 40, rel=1e-6)
    (grad,) = torch.autograd.grad(loss, logits)
    (want_grad,) = torch.autograd.grad(want / 40, logits)
    torch.testing.assert_close(grad, want_grad)


def spec_hidden_loss(hs, ht, ps, pt, mask):
    """§7.1 as written: means over (b, c, d) with the mask, then divided by the mean mask."""
    m = mask.float()[:, :, None]
    s = hs.gather(1, ps.clamp(min=0)[:, :, None].expand(-1, -1, hs.shape[-1]))
    t = ht.gather(1, pt.clamp(min=0)[:, :, None].expand(-1, -1, ht.shape[-1]))
    distance = (s - t).square() * m
    norm = ((t * m).square()).mean((0, 1)) / m.mean() + 1e-8
    return (distance / norm).mean() / m.mean()


def test_hidden_state_loss_matches_the_spec_formula():
    torch.manual_seed(0)
    hs, ht = torch.randn(2, 7, 8, requires_grad=True), torch.randn(2, 5, 8)
    ps = torch.tensor([[2, 4, 6, -1], [1, 3, -1, -1]])
    pt = torch.tensor([[1, 2, 4, -1], [1, 2, -1, -1]])
    mask = ps >= 0
    loss = hidden_state_loss(hs, ht, ps, pt, mask)
    want = spec_hidden_loss(hs, ht, ps, pt, mask)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(torch.autograd.grad(loss, hs)[0], torch.autograd.grad(want, hs)[0])


def test_hidden_state_loss_needs_a_projection_when_widths_differ():
    hs, ht = torch.randn(1, 4, 6), torch.randn(1, 4, 8)
    pos = torch.tensor([[1, 2]])
    with pytest.raises(AlmError, match="projection"):
        hidden_state_loss(hs, ht, pos, pos, pos >= 0)
    projection = make_hidden_projection(6, 8)
    loss = hidden_state_loss(hs, ht, pos, pos, pos >= 0, projection=projection)
    loss.backward()
    assert projection.weight.grad is not None and torch.isfinite(loss)
    assert make_hidden_projection(8, 8) is None


def test_gradmag_weights_each_loss_by_its_inverse_last_block_gradient_norm():
    model = tiny_llama(64, seed=1)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    logits = model(ids).logits
    losses = {
        "sft": sft_loss(logits, ids, torch.ones_like(ids, dtype=torch.bool)),
        "small": logits[..., 0].mean() * 1e-3,
    }
    params = last_block_parameters(model)
    assert params == list(model.model.layers[-1].parameters())
    norms = {}
    for name, loss in losses.items():
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        norms[name] = torch.sqrt(sum(g.double().square().sum() for g in grads)).item()
    total, weights = gradmag_combine(losses, params)
    for name in losses:
        assert weights[name].item() == pytest.approx(1 / (norms[name] + 1e-8), rel=1e-5)
    expected = sum(weights[n].item() * losses[n].item() for n in losses) / sum(
        w.item() for w in weights.values()
    )
    assert total.item() == pytest.approx(expected, rel=1e-5)
    # After weighting, both losses pull the last block equally hard (unit gradient norm each).
    for name in losses:
        assert weights[name].item() * norms[name] == pytest.approx(1.0, rel=1e-4)


def test_gradmag_norms_are_those_of_the_reduced_gradient():
    # Two "processes" hold halves of one batch; the reduction they pass in sums their last-block gradients, so the
    # weights equal those of the whole batch on one process, not of either half.
    model = tiny_llama(64, seed=1)
    ids = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    params = last_block_parameters(model)
    whole = {"sft": sft_loss(model(ids).logits, ids, mask, num_tokens_global=36)}
    whole["tiny"] = whole["sft"] * 1e-3 + model(ids).logits[..., 1].mean()
    _, weights_whole = gradmag_combine(whole, params)
    halves = []
    for part in (ids[:2], ids[2:]):
        logits = model(part).logits
        sft = sft_loss(logits, part, mask[:2], num_tokens_global=36)
        halves.append({"sft": sft, "tiny": sft * 1e-3 + logits[..., 1].mean() / 2})
    flat = []
    for half in halves:
        grads = [torch.autograd.grad(loss, params, retain_graph=True) for loss in half.values()]
        flat.append(torch.stack([torch.cat([g.reshape(-1) for g in gs]) for gs in grads]))
    other = {0: flat[1], 1: flat[0]}
    for index, half in enumerate(halves):
        _, weights = gradmag_combine(
            half, params, all_reduce_sum=lambda local, i=index: local + other[i]
        )
        for name in whole:
            assert weights[name].item() == pytest.approx(weights_whole[name].item(), rel=1e-4)
        _, alone = gradmag_combine(half, params)
        assert alone["sft"].item() != pytest.approx(weights_whole["sft"].item(), rel=1e-2)


def test_gradmag_with_one_loss_is_that_loss_and_a_zero_gradient_loss_gets_weight_zero():
    model = tiny_llama(64, seed=1)
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    logits = model(ids).logits
    loss = sft_loss(logits, ids, torch.ones_like(ids, dtype=torch.bool))
    params = last_block_parameters(model)
    total, _ = gradmag_combine({"sft": loss}, params)
    assert total.item() == pytest.approx(loss.item(), rel=1e-6)
    # e.g. no ALM group in the whole global micro-batch: a loss in the graph whose gradient is exactly zero
    no_groups = (logits * 0.0).sum()
    total, weights = gradmag_combine({"sft": loss, "alm": no_groups}, params)
    assert weights["alm"].item() == 0 and total.item() == pytest.approx(loss.item(), rel=1e-6)
    total, weights = gradmag_combine({"sft": no_groups, "alm": no_groups}, params)
    assert total.item() == 0 and all(w.item() == 0 for w in weights.values())


def test_gradmag_refuses_a_loss_without_a_gradient_instead_of_falling_back():
    model = tiny_llama(64, seed=1)
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    loss = sft_loss(model(ids).logits, ids, torch.ones_like(ids, dtype=torch.bool))
    params = last_block_parameters(model)
    with pytest.raises(AlmError, match="does not depend on the model"):
        gradmag_combine({"sft": loss, "alm": torch.zeros(())}, params)
    # parameters the forward did not use (what sharded copies are under FSDP2)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    with pytest.raises(AlmError, match="gives no gradient"):
        gradmag_combine({"sft": loss}, copies)


def test_alm_with_a_live_teacher_trains_a_byte_student_on_tiny_models():
    teacher_tok, student_tok = bpe_tokenizer(), byte_tokenizer()
    teacher_vocab, student_vocab = (
        vocab_from_tokenizer(teacher_tok),
        vocab_from_tokenizer(student_tok),
    )
    document = plain_document("d", "test", 0, b"The quick brown fox jumps over the lazy dog. " * 2)
    teacher_seq = render(document, teacher_tok, teacher_vocab)
    student_seq = render(document, student_tok, student_vocab)
    chunks = align_sequences(teacher_seq, student_seq, teacher_seq.loss_spans)
    teacher = tiny_llama(len(teacher_vocab), seed=0)
    student = tiny_llama(len(student_vocab), seed=1)
    teacher_ids = torch.from_numpy(teacher_seq.token_id.astype(np.int64))[None]
    student_ids = torch.from_numpy(student_seq.token_id.astype(np.int64))[None]
    teacher_mask = torch.from_numpy(teacher_vocab.boundary_mask((0, 1, 2, 3, 4)))
    student_mask = torch.from_numpy(student_vocab.boundary_mask((0, 1, 2, 3, 4)))
    with torch.no_grad():
        teacher_logp, teacher_boundary = sequence_logp_and_boundary_logmass(
            teacher(teacher_ids).logits, teacher_ids, teacher_mask
        )
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = alm_live_teacher_loss(
            student(student_ids).logits,
            student_ids,
            student_mask,
            [chunks],
            [teacher_logp[0]],
            [teacher_boundary[0]],
            temperature=1.0,
        )
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert out.num_groups.item() > 5
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
