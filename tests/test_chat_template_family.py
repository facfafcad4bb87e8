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
    tokenizer = byte_tokenizer()
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
