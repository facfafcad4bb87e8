"""`family: template`: chat rendered with the tokenizer's own Jinja `chat_template` (issue 10 item 5).

Reference: `apply_chat_template` of the whole conversation, tokenized in one piece by the tokenizer itself (a byte
tokenizer, so tokens never merge across a segment boundary); block spans are checked by decoding each block and
text offsets by slicing the content text.
"""

from __future__ import annotations

import numpy as np
import pytest
from factories import byte_tokenizer

from alm.errors import TokenizerRefusedError
from alm.templates import chat_document, plain_document, render, token_in_loss
from alm.vocab import vocab_from_tokenizer

# SmolLM2-Instruct's template: a default system prompt when the first message is not a system message.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MESSAGES = [
    ("user", "What is 2 + 2?"),
    ("assistant", "It is 4."),
    ("user", "And in words?"),
    ("assistant", "Four, ünïcödé included."),
]


def tokenizer_with(template: str | None):
    import copy

    tokenizer = copy.deepcopy(
        byte_tokenizer()
    )  # the factory's tokenizer is shared: never mutate it
    tokenizer.chat_template = template
    return tokenizer, vocab_from_tokenizer(tokenizer)


def test_the_tokenizers_own_template_renders_the_conversation_with_role_spans():
    tokenizer, vocab = tokenizer_with(SMOLLM2_TEMPLATE)
    document = chat_document("d", "s", 0, [(r, c.encode()) for r, c in MESSAGES])
    seq = render(document, tokenizer, vocab, "template")
    messages = [{"role": r, "content": c} for r, c in MESSAGES]
    want = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert seq.token_id.tolist() == list(want)
    blocks = {
        (s["role"], s["start_pos"]): tokenizer.decode(seq.token_id[s["start_pos"] : s["end_pos"]])
        for s in seq.segments
        if s["role"] != "text"
    }
    headers = [text for (role, _), text in blocks.items() if role.startswith("header:")]
    assert headers[0].startswith(
        "<|im_start|>system\nYou are a helpful"
    )  # the injected prompt opens turn 0
    assert headers[0].endswith("<|im_start|>user\n") and headers[1] == "<|im_start|>assistant\n"
    assert [t for (role, _), t in blocks.items() if role == "eot"] == ["<|im_end|>\n"] * 4
    text = [s for s in seq.segments if s["role"] == "text"]
    assert [seq.text[s["start_byte"] : s["end_byte"]].decode() for s in text] == [
        c for _, c in MESSAGES
    ]
    # the loss rule is unchanged: assistant text and the end-of-turn closing it, nothing else
    in_loss = token_in_loss(seq.start_byte, seq.end_byte, seq.role, seq.loss_spans)
    trained = tokenizer.decode(seq.token_id[in_loss])
    assert trained == "It is 4.<|im_end|>\nFour, ünïcödé included.<|im_end|>\n"


def test_plain_documents_take_the_tokenizers_bos_and_eos():
    tokenizer, vocab = tokenizer_with(SMOLLM2_TEMPLATE)
    seq = render(plain_document("d", "s", 0, b"hello"), tokenizer, vocab, "template")
    assert tokenizer.decode(seq.token_id) == "<|endoftext|>hello<|endoftext|>"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (None, "has none"),
        (  # the message count up front: every render rewrites the start
            "{{ messages|length }}{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}",
            "not prefix-stable",
        ),
        (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>{% endfor %}",
            "changes message",
        ),
        (
            "{% for m in messages %}{{ m['content'] }}{{ m['content'] }}{% endfor %}",
            "2 times",
        ),
    ],
    ids=["no-template", "not-prefix-stable", "trims", "twice"],
)
def test_a_template_without_fixed_spans_is_refused(template, message):
    tokenizer, vocab = tokenizer_with(template)
    document = chat_document("d", "s", 0, [("user", b" padded "), ("assistant", b"ok")])
    with pytest.raises(TokenizerRefusedError, match=message):
        render(document, tokenizer, vocab, "template")


def test_truncation_cuts_a_template_rendering_like_any_other():
    tokenizer, vocab = tokenizer_with(SMOLLM2_TEMPLATE)
    document = chat_document("d", "s", 0, [(r, c.encode()) for r, c in MESSAGES])
    full = render(document, tokenizer, vocab, "template")
    cut = render(document, tokenizer, vocab, "template", max_length=100)
    assert cut.truncated and np.array_equal(cut.token_id, full.token_id[:100])


def test_role_prefix_renders_chat_as_plain_text_for_base_models():
    from alm.templates import family_chat_template

    tokenizer = byte_tokenizer(specials=("<|endoftext|>",))  # a base model: no chat specials
    vocab = vocab_from_tokenizer(tokenizer)
    document = chat_document("d", "s", 0, [(r, c.encode()) for r, c in MESSAGES[:2]])
    seq = render(document, tokenizer, vocab, "role_prefix")
    assert tokenizer.decode(seq.token_id) == (
        "<|endoftext|>User: What is 2 + 2?\n\nAssistant: It is 4.\n\n"
    )
    in_loss = token_in_loss(seq.start_byte, seq.end_byte, seq.role, seq.loss_spans)
    assert tokenizer.decode(seq.token_id[in_loss]) == "It is 4.\n\n"
    # the template a role_prefix student is saved with renders the same tokens
    tokenizer.chat_template = family_chat_template("role_prefix")
    messages = [{"role": r, "content": c} for r, c in MESSAGES[:2]]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert list(ids) == seq.token_id.tolist()


# --------------------------------------------------------------------------------------------------------------
# `family: auto` takes the tokenizer's own template when it has fixed spans, else the family (issue 10 item 5)

# Meta-Llama-3-8B-Instruct's template: bos, then per message header, trimmed content, <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# The same without `| trim`: prefix-stable and verbatim, so `auto` uses it.
LLAMA3_UNTRIMMED_TEMPLATE = LLAMA3_TEMPLATE.replace(" | trim", "")
# Gemma-2-it's template: no system role, `model` for the assistant, trimmed content, <end_of_turn>.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
LLAMA3_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)


def llama3_byte_tokenizer(template: str | None):
    from alm.vocab import build_byte_tokenizer

    tokenizer = build_byte_tokenizer(
        list(LLAMA3_SPECIALS), bos="<|begin_of_text|>", eos="<|end_of_text|>"
    )
    tokenizer.chat_template = template
    return tokenizer, vocab_from_tokenizer(tokenizer)


def gemma_tokenizer():
    import copy

    from factories import sentencepiece_tokenizer

    tokenizer = copy.deepcopy(
        sentencepiece_tokenizer(model_type="unigram", specials=("<start_of_turn>", "<end_of_turn>"))
    )
    tokenizer.chat_template = GEMMA_TEMPLATE
    return tokenizer, vocab_from_tokenizer(tokenizer)


def smollm2():
    from factories import smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    return tokenizer, vocab_from_tokenizer(tokenizer)


def test_auto_renders_chat_with_a_usable_template_and_names_the_family_it_falls_back_to(caplog):
    import logging

    from factories import bpe_tokenizer

    from alm.templates import resolve_family

    caplog.set_level(logging.INFO, logger="alm.templates")
    assert resolve_family("auto", smollm2()[0]) == "template:chatml"
    assert resolve_family("auto", llama3_byte_tokenizer(LLAMA3_UNTRIMMED_TEMPLATE)[0]) == (
        "template:llama3"
    )
    assert resolve_family("auto", bpe_tokenizer(512)) == "chatml"  # no template: the family
    # Llama 3's and Gemma's own templates trim the content: no fixed spans, so their family, with a note
    assert resolve_family("auto", llama3_byte_tokenizer(LLAMA3_TEMPLATE)[0]) == "llama3"
    assert resolve_family("auto", gemma_tokenizer()[0]) == "gemma"
    notes = [
        r.getMessage() for r in caplog.records if "not using the chat template" in r.getMessage()
    ]
    assert len(notes) == 2 and all("changes message" in note for note in notes)
    assert "rendering chat with the llama3 family instead" in notes[0]
    # plain-text data: the template is not looked at (the rendering is the family's either way)
    assert resolve_family("auto", smollm2()[0], chat=False) == "chatml"
    # an explicit `template` that has no fixed spans is refused up front, naming why
    with pytest.raises(TokenizerRefusedError, match="changes message"):
        resolve_family("template", llama3_byte_tokenizer(LLAMA3_TEMPLATE)[0])
    assert resolve_family("template", smollm2()[0]) == "template:chatml"


def test_auto_without_a_usable_template_or_a_family_refuses_chat_naming_the_template(caplog):
    import copy
    import logging

    from alm.errors import ConfigError
    from alm.templates import resolve_family

    tokenizer = copy.deepcopy(
        byte_tokenizer(specials=("<|endoftext|>",))
    )  # no chat specials at all
    tokenizer.chat_template = (
        "{{ messages|length }}{% for m in messages %}{{ m['content'] }}<|endoftext|>{% endfor %}"
    )
    vocab = vocab_from_tokenizer(tokenizer)
    caplog.set_level(logging.INFO, logger="alm.templates")
    family = resolve_family("auto", tokenizer)
    assert family == "plain"
    assert any("chat documents will be refused" in r.getMessage() for r in caplog.records)
    assert render(plain_document("d", "s", 0, b"hi"), tokenizer, vocab, family).num_tokens == 4
    document = chat_document("d", "s", 0, [("user", b"Hi"), ("assistant", b"Hello")])
    with pytest.raises(ConfigError, match="not prefix-stable") as refused:
        render(document, tokenizer, vocab, family)
    assert "role_prefix" in str(refused.value)


def test_smollm2_renders_through_its_template_as_chatml_does_but_for_its_default_system_prompt():
    """The documented difference between `auto` (SmolLM2's own template) and `chatml`: a conversation without a
    system message gets the template's default system prompt at the start of its first header; with a system
    message, and for plain documents, the tokens are identical."""
    tokenizer, vocab = smollm2()
    with_system = [("system", "Be brief."), *MESSAGES]
    for messages in (with_system, MESSAGES):
        document = chat_document("d", "s", 0, [(r, c.encode()) for r, c in messages])
        family = render(document, tokenizer, vocab, "chatml")
        template = render(document, tokenizer, vocab, "template:chatml")
        default_prompt = tokenizer(
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
            "<|im_end|>\n",
            add_special_tokens=False,
        )["input_ids"]
        injected = [] if messages is with_system else default_prompt
        assert template.token_id.tolist() == injected + family.token_id.tolist()
        assert template.text == family.text
        np.testing.assert_array_equal(template.loss_spans, family.loss_spans)
        assert [s["role"] for s in template.segments] == [s["role"] for s in family.segments]
        # the whole-conversation apply_chat_template is what the template path renders
        want = tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in messages], tokenize=True, return_dict=False
        )
        assert template.token_id.tolist() == list(want)
    plain = plain_document("d", "s", 0, b"def f(x):\n    return x\n")
    assert (
        render(plain, tokenizer, vocab, "template:chatml").token_id.tolist()
        == render(plain, tokenizer, vocab, "chatml").token_id.tolist()
    )


def test_a_resolved_template_family_renders_plain_documents_in_its_base_family():
    from alm.templates import resolve_family

    tokenizer, vocab = tokenizer_with(SMOLLM2_TEMPLATE)
    family = resolve_family("template", tokenizer)
    assert family == "template:chatml"
    seq = render(plain_document("d", "s", 0, b"hello"), tokenizer, vocab, family)
    assert tokenizer.decode(seq.token_id) == "hello<|endoftext|>"  # chatml's: no bos, <|endoftext|>
    # the bare `template` of stores written before keeps its meaning (test_plain_documents_take_...)
    legacy = render(plain_document("d", "s", 0, b"hello"), tokenizer, vocab, "template")
    assert tokenizer.decode(legacy.token_id) == "<|endoftext|>hello<|endoftext|>"


def test_a_template_that_raises_on_a_role_refuses_that_document_with_one_message():
    tokenizer, vocab = gemma_tokenizer()
    document = chat_document("d", "s", 0, [("system", b"Be brief."), ("user", b"Hi")])
    with pytest.raises(TokenizerRefusedError, match="System role not supported"):
        render(document, tokenizer, vocab, "template:gemma")


@pytest.mark.parametrize(
    ("make", "end_of_turn"),
    [
        (smollm2, "<|im_end|>"),
        (lambda: tokenizer_with(SMOLLM2_TEMPLATE), "<|im_end|>"),
        (lambda: llama3_byte_tokenizer(LLAMA3_TEMPLATE), "<|eot_id|>"),
        (lambda: llama3_byte_tokenizer(LLAMA3_UNTRIMMED_TEMPLATE), "<|eot_id|>"),
        (gemma_tokenizer, "<end_of_turn>"),
        (  # turns that end in plain text: no end-of-turn token
            lambda: tokenizer_with(
                "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
            ),
            None,
        ),
    ],
    ids=["smollm2", "chatml-bytes", "llama3", "llama3-untrimmed", "gemma", "text-turns"],
)
def test_the_end_of_turn_is_the_special_token_closing_the_assistant_turn(make, end_of_turn):
    from alm.templates import template_end_of_turn

    tokenizer, _ = make()
    assert template_end_of_turn(tokenizer) == end_of_turn


@pytest.mark.parametrize(
    ("make", "family", "end_of_turn"),
    [
        (lambda: tokenizer_with(SMOLLM2_TEMPLATE), "template:chatml", "<|im_end|>"),
        (lambda: llama3_byte_tokenizer(LLAMA3_UNTRIMMED_TEMPLATE), "template:llama3", "<|eot_id|>"),
    ],
    ids=["chatml", "llama3"],
)
def test_a_saved_template_student_keeps_its_template_and_stops_at_its_end_of_turn(
    tmp_path, make, family, end_of_turn
):
    """`save_student` with a template family: the template training rendered with stays, eos becomes the
    end-of-turn it closes assistant turns with, generation stops there (or at the previous eos), and the saved
    tokenizer's `apply_chat_template` gives the tokens `render` gave in training."""
    import copy
    import json

    from factories import tiny_llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alm.train.student import save_student

    tokenizer = copy.deepcopy(make()[0])
    template = tokenizer.chat_template
    previous_eos = tokenizer.eos_token_id
    model = tiny_llama(len(tokenizer), seed=3)
    save_student(model, tokenizer, tmp_path / "student", family=family)
    saved = AutoTokenizer.from_pretrained(tmp_path / "student")
    assert saved.chat_template == template
    assert saved.eos_token == end_of_turn
    end_id = saved.convert_tokens_to_ids(end_of_turn)
    generation = json.loads((tmp_path / "student" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [end_id, previous_eos]
    document = chat_document("d", "s", 0, [(r, c.encode()) for r, c in MESSAGES])
    trained = render(document, saved, vocab_from_tokenizer(saved), family)
    ids = saved.apply_chat_template(
        [{"role": r, "content": c} for r, c in MESSAGES], tokenize=True, return_dict=False
    )
    assert list(ids) == trained.token_id.tolist()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert reloaded.generation_config.eos_token_id == [end_id, previous_eos]
    assert saved.get_vocab() == tokenizer.get_vocab()


def test_a_stored_sequence_cut_inside_a_turn_renders_as_a_prefix_of_the_whole():
    """Stage two re-renders truncated stored documents: the last turn may be a header alone or a header with cut
    (possibly not UTF-8) text. The template path renders its header from the template and the text as bytes: a
    prefix of the whole conversation's rendering, cut where the stored text ends. Every cut point is tried."""
    from alm.templates import document_from_parts

    tokenizer, vocab = tokenizer_with(SMOLLM2_TEMPLATE)
    document = chat_document("d", "s", 0, [(r, c.encode()) for r, c in MESSAGES])
    whole = render(document, tokenizer, vocab, "template:chatml")
    teacher_length = len(render(document, tokenizer, vocab, "chatml"))
    last_roles = set()
    for max_length in range(1, teacher_length):
        stored = render(document, tokenizer, vocab, "chatml", max_length=max_length)
        assert stored.truncated
        cut = document_from_parts(stored.text, stored.segments, stored.loss_spans)
        seq = render(cut, tokenizer, vocab, "template:chatml")
        assert seq.text == stored.text
        assert seq.token_id.tolist() == whole.token_id[: len(seq)].tolist(), max_length
        last_roles.add(cut.segments[-1].role)
    assert {"header:user", "header:assistant", "text", "eot"} <= last_roles
