"""Documents as abstract segments, rendered per model family into exact-bytes token sequences (ALM_SPEC.md §3).

Owns: `Segment` / `Document` (what the data layer produces), the model families (`chatml` for SmolLM2/Qwen2,
`llama3`, `gemma`, `plain`) and their template blocks, `render` (document -> `TokenizedSequence` with per-token
byte offsets and roles, the segment table, loss spans and truncation), and the stage-two inverses
`sequence_from_ids` / `sequence_from_stored` (stored teacher ids -> per-token offsets/roles) and
`document_from_parts` / `document_from_stored` (stored text + segment table -> the abstract document a student
re-renders with its own family).

Like tokenkit (§3) the four fixed families never call `apply_chat_template`: each text segment is tokenized
separately (`alm.vocab.encode_text`, literal marker strings stay text) and each template block is the family's own
string (special tokens plus literal pieces such as `"user\\n"`), so no system prompt is ever injected. A template
family `template:<base>` instead renders chat with the tokenizer's own Jinja `chat_template`, prefix by prefix, and
cuts each turn into header / text / trailer blocks (`_template_blocks`); plain documents' bos/eos come from
`<base>`. `resolve_family` picks it for `auto` when `template_problem` finds the template renders turns at fixed
spans, else the detected family; `template_end_of_turn` finds the token closing an assistant turn. Block roles:
`bos`, `eos`, `header:user`, `header:assistant`, `header:system`, `eot`. A family may render a block as nothing
(chatml has no bos); such blocks still appear in the segment table with zero tokens, so a student whose family
does have them can render them.

Offsets are in the document's *content text*, the concatenation of its text segments; block tokens have zero
width at the block's offset. The loss-region rule has exactly one definition, `token_in_loss` (text by byte span,
template blocks by segment order); `alm.align` and the student data path use it.

Imports `alm.vocab` and `alm.errors` only (numpy; never torch).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from alm.errors import ConfigError, DataError, TokenizerRefusedError
from alm.vocab import TokenizedText, Vocab, encode_text, encode_texts, token_offsets

logger = logging.getLogger(__name__)

Family = Literal["chatml", "llama3", "gemma", "plain", "role_prefix", "template"]
# `template`: the tokenizer's own Jinja `chat_template` (`_template_blocks`); the others are fixed block strings.
# `role_prefix`: plain-text role prefixes for base models without chat special tokens.
FAMILIES: tuple[str, ...] = ("chatml", "llama3", "gemma", "plain", "role_prefix", "template")
LossRegion = Literal["all", "assistant", "last_assistant"]
BLOCK_ROLES = ("bos", "eos", "header:user", "header:assistant", "header:system", "eot")
# Blocks that open what follows them; every other block (eot, eos) closes what precedes it (`token_in_loss`).
OPENING_BLOCK_ROLES = frozenset({"bos", "header:user", "header:assistant", "header:system"})
CHAT_ROLES = ("system", "user", "assistant")

# Placeholders resolved from the tokenizer's own bos/eos tokens.
_BOS = "{bos}"
_EOS = "{eos}"

# Each block is one string tokenized with special tokens recognised; None renders nothing (tokenkit's
# `model_kinds.py` replacements, ALM_SPEC §3).
FAMILY_BLOCKS: dict[str, dict[str, str | None]] = {
    "chatml": {
        "bos": None,
        "eos": "<|endoftext|>",
        "header:user": "<|im_start|>user\n",
        "header:assistant": "<|im_start|>assistant\n",
        "header:system": "<|im_start|>system\n",
        "eot": "<|im_end|>\n",
    },
    "llama3": {
        "bos": "<|begin_of_text|>",
        "eos": "<|end_of_text|>",
        "header:user": "<|start_header_id|>user<|end_header_id|>\n\n",
        "header:assistant": "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "header:system": "<|start_header_id|>system<|end_header_id|>\n\n",
        "eot": "<|eot_id|>",
    },
    "gemma": {
        "bos": _BOS,
        "eos": _EOS,
        "header:user": "<start_of_turn>user\n",
        "header:assistant": "<start_of_turn>model\n",
        "header:system": "<start_of_turn>user\n",  # Gemma has no system role (§3)
        "eot": "<end_of_turn>\n",
    },
    "plain": {"bos": _BOS, "eos": _EOS},
    # Base models: the roles as plain text, turns separated by a blank line (no special tokens needed).
    "role_prefix": {
        "bos": _BOS,
        "eos": _EOS,
        "header:user": "User: ",
        "header:assistant": "Assistant: ",
        "header:system": "System: ",
        "eot": "\n\n",
    },
}

# A family is detected from the first of these markers that the tokenizer has as a special token.
_FAMILY_MARKERS = (
    ("<|im_start|>", "chatml"),
    ("<|start_header_id|>", "llama3"),
    ("<start_of_turn>", "gemma"),
)


# --------------------------------------------------------------------------------------------------------------
# Abstract documents


@dataclass(frozen=True)
class Segment:
    """One abstract segment: content text (`role == "text"`) or a template block (any other role).

    Attributes:
        role: `text` or a block role (`bos`, `eos`, `header:user`, `header:assistant`, `header:system`, `eot`).
        text: UTF-8 bytes of a text segment; `b""` for blocks.
        in_loss: whether a text segment is trained on (ignored for blocks: `token_in_loss` decides them by order).
    """

    role: str
    text: bytes = b""
    in_loss: bool = False


@dataclass(frozen=True)
class Document:
    """A document as abstract segments, with where it came from.

    Attributes:
        doc_id: stable identifier (e.g. `path:line` or `source#row`).
        source: data source name.
        row: row/line/file index inside the source.
        segments: the segments in order.
    """

    doc_id: str
    source: str
    row: int
    segments: tuple[Segment, ...]

    @property
    def content_text(self) -> bytes:
        """Concatenation of the text segments."""
        return b"".join(s.text for s in self.segments if s.role == "text")

    def loss_spans(self) -> np.ndarray:
        """int64 [k, 2]: merged byte ranges of the in-loss text segments in the content text."""
        spans = []
        offset = 0
        for seg in self.segments:
            if seg.role != "text":
                continue
            if seg.in_loss and seg.text:
                spans.append((offset, offset + len(seg.text)))
            offset += len(seg.text)
        return merged_spans(spans)


def merge_spans(spans: Iterable[tuple[int, int]]) -> np.ndarray:
    """int64 [k, 2]: non-empty byte ranges sorted and merged where they touch or overlap."""
    out: list[list[int]] = []
    for start, end in sorted((int(s), int(e)) for s, e in spans if e > s):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


def merged_spans(spans: Any) -> np.ndarray:
    """`merge_spans` of an int [k, 2] array (or nested sequence); an already merged one (non-empty ranges,
    increasing, none touching: what `render` and the store hold) comes back as it is, without the Python pass."""
    array = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    rows = array.tolist()
    previous_end = None
    for start, end in rows:
        if end <= start or (previous_end is not None and start <= previous_end):
            return merge_spans((start, end) for start, end in rows)
        previous_end = end
    return array


def text_in_spans(start_byte: np.ndarray, end_byte: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """The text half of `token_in_loss`. bool [n]: `[start, end)` lies inside the union of `spans` (merged, [k, 2]); a zero-width range at o iff the
    byte at o is covered (it belongs to the text that follows it)."""
    if len(spans) == 0:
        return np.zeros(len(start_byte), bool)
    # A zero-width range at o counts as the byte [o, o + 1).
    last_byte_end = np.maximum(end_byte, start_byte + 1)
    if len(spans) == 1:  # the common case: plain text, `loss: all`, one trained turn
        return (start_byte >= spans[0, 0]) & (last_byte_end <= spans[0, 1])
    # the last span starting at or before each token decides (the spans are merged)
    index = np.searchsorted(spans[:, 0], start_byte, side="right") - 1
    return (index >= 0) & (last_byte_end <= spans[np.maximum(index, 0), 1])


def token_in_loss(
    start_byte: Any,
    end_byte: Any,
    role: Sequence[Any] | np.ndarray | None,
    loss_spans: Any,
    *,
    is_block: np.ndarray | None = None,
    runs: BlockRuns | None = None,
) -> np.ndarray:
    """Which tokens of one sequence are in the loss region: THE loss-region rule (ALM_SPEC §3, §13.8).

    - A text token is in the loss iff its bytes lie inside the union of the loss spans (a zero-width token, e.g. a
      lone dummy-prefix `▁`, iff the byte it sits before is inside: it belongs to the text that follows).
    - A template block (a run of consecutive tokens with one role) is decided by segment order, never by byte
      offset: a trained turn's `eot` and the next turn's header sit at the same offset. A block is in the loss iff
      the token just before it is; an opening block (`bos`, `header:*`) only when, moreover, every text token of
      the sequence is (`loss: all`, tokenkit's default mask, which trains the template too). So the `eot` closing
      a trained turn is trained and the header opening the next turn is not, and nothing before the first text.

    A chunk (`alm.align`) is in the loss iff every token it holds, on both sides, is.

    Args:
        start_byte, end_byte: int [n], token byte offsets in the content text (blocks: zero width).
        role: [n], None for text tokens, the block role otherwise; None for an all-text sequence.
        loss_spans: int [k, 2] byte ranges `[start, end)` of the trainable text (merged here).
        is_block: bool [n], `role != None`, when the caller has it already (saves a pass over `role`).
        runs: `block_runs(role, is_block)`, when the caller has it already (with `is_block`).

    Returns:
        bool [n].
    """
    start = np.asarray(start_byte, dtype=np.int64)
    end = np.asarray(end_byte, dtype=np.int64)
    in_loss = text_in_spans(start, end, merged_spans(loss_spans))
    if role is None:
        return in_loss
    block: np.ndarray
    if is_block is None:
        roles = np.asarray(role, dtype=object)  # [n]; no copy for an object array
        # element-wise `!= None` on an object array; numpy's stubs do not admit None as an operand
        block = np.not_equal(roles, None)  # pyright: ignore[reportArgumentType, reportCallIssue]
        runs = block_runs(roles, block)
    else:
        block = is_block
        if runs is None:
            runs = block_runs(np.asarray(role, dtype=object), block)
    if runs[0]:
        blocks_in_loss(in_loss, runs, all_text_trained=bool(in_loss[~block].all()))
    return in_loss


def blocks_in_loss(
    in_loss: np.ndarray, runs: BlockRuns, *, all_text_trained: bool, first_pos: int = 0
) -> None:
    """The block half of `token_in_loss`, in place: each block of `runs` (in order) is in the loss iff the token
    just before it is, an opening block only when `all_text_trained` too.

    Args:
        in_loss: bool [n]: the text rule's answer for every token (blocks are overwritten here).
        runs: the sequence's `block_runs`, in its own positions.
        all_text_trained: every text token of the sequence is in the loss.
        first_pos: where the sequence's position 0 is in `in_loss` (several sequences end to end).
    """
    for first, run_end, current in zip(*runs, strict=True):  # in order
        trained = first > 0 and bool(in_loss[first_pos + first - 1])
        in_loss[first_pos + first : first_pos + run_end] = trained and (
            all_text_trained or current not in OPENING_BLOCK_ROLES
        )


# The template blocks of a sequence (`block_runs`): first positions, one past the last positions, roles.
BlockRuns = tuple[list[int], list[int], list[Any]]


def block_runs(role: np.ndarray, is_block: np.ndarray) -> BlockRuns:
    """The template blocks of one sequence: maximal runs of consecutive block tokens with one role.

    Args:
        role: object [n], None for text tokens, the block role otherwise.
        is_block: bool [n], `role != None`.

    Returns:
        Per run, in order: its first token position, one past its last, and its role (Python lists; a handful).
    """
    positions = np.flatnonzero(is_block).tolist()
    roles = role[positions].tolist() if positions else []
    starts: list[int] = []
    ends: list[int] = []
    run_roles: list[Any] = []
    for pos, current in zip(positions, roles, strict=True):
        if ends and ends[-1] == pos and run_roles[-1] == current:
            ends[-1] = pos + 1
        else:
            starts.append(pos)
            ends.append(pos + 1)
            run_roles.append(current)
    return starts, ends, run_roles


def _runs_of_parts(parts: Iterable[tuple[int, int, Any]]) -> BlockRuns:
    """`block_runs` of a sequence whose non-empty template blocks are `parts` (start_pos, end_pos, role), in
    order: adjacent parts with one role form one run, as their tokens do."""
    starts: list[int] = []
    ends: list[int] = []
    roles: list[Any] = []
    for start, end, role in parts:
        if ends and ends[-1] == start and roles[-1] == role:
            ends[-1] = end
        else:
            starts.append(start)
            ends.append(end)
            roles.append(role)
    return starts, ends, roles


def _roles_of_runs(runs: BlockRuns, num_tokens: int) -> np.ndarray:
    """object [n]: each run's role on its tokens, None on text tokens."""
    role = np.empty(num_tokens, dtype=object)  # NumPy fills object arrays with None
    for start, end, current in zip(*runs, strict=True):
        role[start:end] = current
    return role


def plain_document(doc_id: str, source: str, row: int, text: bytes) -> Document:
    """`[bos, text, eos]` with the text in the loss."""
    return Document(
        doc_id, source, row, (Segment("bos"), Segment("text", text, True), Segment("eos"))
    )


def chat_document(
    doc_id: str,
    source: str,
    row: int,
    messages: Sequence[tuple[str, bytes]],
    loss: LossRegion = "assistant",
) -> Document:
    """`[bos, header:<role>, text, eot, ...]` from `(role, content)` messages; no eos after the final eot.

    Args:
        doc_id, source, row: provenance.
        messages: `(role, content bytes)` pairs; role is `system`, `user` or `assistant`.
        loss: `all` (every text segment), `assistant` (assistant turns) or `last_assistant` (only the last one).

    Raises:
        DataError: an unknown message role, or `last_assistant`/`assistant` with no assistant message.
    """
    segments: list[Segment] = [Segment("bos")]
    assistant_turns = [i for i, (role, _) in enumerate(messages) if role == "assistant"]
    for i, (role, content) in enumerate(messages):
        if role not in CHAT_ROLES:
            raise DataError(
                f"document {doc_id!r}: message {i} has role {role!r}; expected one of {list(CHAT_ROLES)}"
            )
        match loss:
            case "all":
                in_loss = True
            case "assistant":
                in_loss = role == "assistant"
            case "last_assistant":
                in_loss = bool(assistant_turns) and i == assistant_turns[-1]
        segments += [Segment(f"header:{role}"), Segment("text", content, in_loss), Segment("eot")]
    # No eos after the final end-of-turn: tokenkit's `direct_encode` appends eos only to text that does not already
    # end with eot (ALM_SPEC §3). The teacher gives an eos there a log-prob near -20, and training on it would pull
    # ALM and SFT in opposite directions.
    return Document(doc_id, source, row, tuple(segments))


# --------------------------------------------------------------------------------------------------------------
# Families


def _special_texts(tokenizer_or_vocab: Any) -> set[str]:
    if isinstance(tokenizer_or_vocab, Vocab):
        return set(tokenizer_or_vocab.special_text.values())
    decoder = getattr(tokenizer_or_vocab, "added_tokens_decoder", None) or {}
    out = {t.content for t in decoder.values() if getattr(t, "special", False)}
    out.update(getattr(tokenizer_or_vocab, "all_special_tokens", None) or [])
    return out


def family_for_tokenizer(tokenizer_or_vocab: Any) -> str:
    """The template family a tokenizer's special tokens imply: `chatml` (`<|im_start|>`), `llama3`
    (`<|start_header_id|>`), `gemma` (`<start_of_turn>`), else `plain`."""
    specials = _special_texts(tokenizer_or_vocab)
    for marker, family in _FAMILY_MARKERS:
        if marker in specials:
            return family
    return "plain"


# The families a `template:<base>` rendering takes its non-chat blocks (the bos/eos of plain documents) from: the
# detected one. A bare `template` (stores and caches written before `template:<base>` existed) keeps the
# tokenizer's own bos/eos for them, i.e. base `plain`.
TEMPLATE_BASES = ("chatml", "llama3", "gemma", "plain")
_TEMPLATE_PREFIX = "template:"


def is_template_family(family: str) -> bool:
    """Whether `family` (resolved) renders chat with the tokenizer's own Jinja chat template."""
    return family == "template" or family.startswith(_TEMPLATE_PREFIX)


def template_base(family: str) -> str:
    """The family that renders a template family's non-chat blocks: `template:chatml` -> `chatml`; the bare
    `template` of older stores -> `plain` (the tokenizer's own bos/eos)."""
    return family.removeprefix(_TEMPLATE_PREFIX) if family != "template" else "plain"


def resolve_family(
    family: str | None,
    tokenizer_or_vocab: Any,
    *,
    markers_from: Any = None,
    chat: bool = True,
) -> str:
    """The family to render with: `family` if given (validated), else the tokenizer's own chat template when it
    has a usable one, else the family its special tokens imply.

    - `auto` (or None): `template:<detected>` when the tokenizer has a Jinja `chat_template` that renders turns
      at fixed byte spans (`template_problem` is None: prefix-stable, each message's content verbatim); otherwise
      the detected family (`family_for_tokenizer`), with a logged note saying why the template was not used.
      With `chat=False` (data without chat documents, whose rendering the template does not change) the detected
      family, without looking at the template.
    - `template`: `template:<detected>`; a template that is missing or has no fixed spans is refused here.
    - `chatml`, `llama3`, `gemma`, `plain`, `role_prefix`, or an already resolved `template:<base>`: as given.

    `<detected>` is the family of `markers_from`'s special tokens when given (a student speaking its teacher's
    specials), else of `tokenizer_or_vocab`'s; it renders what the template does not: plain documents' bos/eos.

    Raises:
        ConfigError: an unknown family name.
        TokenizerRefusedError: `template` for a tokenizer whose chat template is missing or has no fixed spans.
    """
    detected = family_for_tokenizer(
        markers_from if markers_from is not None else tokenizer_or_vocab
    )
    has_template = not isinstance(tokenizer_or_vocab, Vocab) and bool(
        getattr(tokenizer_or_vocab, "chat_template", None)
    )
    if family is None or family == "auto":
        if not chat or not has_template:
            return detected
        problem = template_problem(tokenizer_or_vocab)
        if problem is None:
            return _TEMPLATE_PREFIX + detected
        _note_unusable_template(tokenizer_or_vocab, problem, detected)
        return detected
    if family == "template":
        problem = (
            template_problem(tokenizer_or_vocab)
            if not isinstance(tokenizer_or_vocab, Vocab)
            else None
        )
        if problem is not None:
            raise TokenizerRefusedError(problem)
        return _TEMPLATE_PREFIX + detected
    if family.startswith(_TEMPLATE_PREFIX) and template_base(family) in TEMPLATE_BASES:
        return family
    if family not in FAMILIES:
        raise ConfigError(
            f"template family {family!r} is unknown; use one of {[*FAMILIES, 'auto']}"
        )
    return family


_NOTED: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def _note_unusable_template(tokenizer: Any, problem: str, detected: str) -> None:
    template = str(tokenizer.chat_template)
    try:
        if _NOTED.get(tokenizer) == template:
            return  # said once per tokenizer
        _NOTED[tokenizer] = template
    except TypeError:  # not weak-referenceable
        pass
    if detected == "plain":
        logger.warning(
            "family auto: not using the chat template of %s (%s), and no chat family (chatml, llama3, gemma) "
            "matches its special tokens: chat documents will be refused (plain text renders as family plain). "
            "Set the family to role_prefix for plain-text roles",
            type(tokenizer).__name__,
            problem,
        )
    else:
        logger.info(
            "family auto: not using the chat template of %s (%s); rendering chat with the %s family instead",
            type(tokenizer).__name__,
            problem,
            detected,
        )


# Conversations every usable template must render at fixed spans: whitespace at the edges of the content catches
# templates that trim it, two exchanges catch templates that re-render earlier turns.
_PROBE_MESSAGES: tuple[tuple[str, bytes], ...] = (
    ("user", b" What is 2 + 2?\n"),
    ("assistant", b"  It is 4. "),
    ("user", b"\tAnd in w\xc3\xb6rds?"),
    ("assistant", b"Four.\n\n"),
)
_SYSTEM_PROBE_MESSAGES: tuple[tuple[str, bytes], ...] = (
    ("system", b" Be brief. "),
    ("user", b"Hi"),
    ("assistant", b"Hello"),
)
_PROBES: weakref.WeakKeyDictionary[Any, tuple[str, str | None]] = weakref.WeakKeyDictionary()


def template_problem(tokenizer: Any) -> str | None:
    """Why the tokenizer's Jinja `chat_template` cannot render chat at fixed byte spans, or None when it can.

    Renders a probe conversation (user, assistant, user, assistant; contents with whitespace at both ends) the
    way `render` does (`_template_blocks`): the template must exist, extend its previous rendering with each
    message (prefix-stable) and keep every content verbatim. A template that only fails on a system message is
    usable (a document with one is refused when rendered; logged once). Cached per tokenizer and template.
    """
    template = getattr(tokenizer, "chat_template", None)
    try:
        cached = _PROBES.get(tokenizer)
    except TypeError:
        cached = None
    if cached is not None and cached[0] == str(template):
        return cached[1]
    problem: str | None = None
    try:
        _template_blocks(chat_document("template probe", "", 0, _PROBE_MESSAGES, "all"), tokenizer)
    except (TokenizerRefusedError, DataError) as err:
        problem = str(err)
    if problem is None:
        try:
            _template_blocks(
                chat_document("template probe", "", 0, _SYSTEM_PROBE_MESSAGES, "all"), tokenizer
            )
        except (TokenizerRefusedError, DataError) as err:
            logger.info(
                "the chat template of %s cannot render a system message (%s): documents with one are refused",
                type(tokenizer).__name__,
                err,
            )
    with contextlib.suppress(TypeError):
        _PROBES[tokenizer] = (str(template), problem)
    return problem


def template_end_of_turn(tokenizer: Any) -> str | None:
    """The special token that closes an assistant turn in the tokenizer's chat template: the first special token
    of the `eot` block `render` gives the assistant turn of a one-exchange conversation (`<|im_end|>`,
    `<|eot_id|>`, `<end_of_turn>`, a `</s>`); None when that block holds no special token (turns end in text).

    Raises:
        TokenizerRefusedError: the template is missing or has no fixed spans.
    """
    document = chat_document("end-of-turn probe", "", 0, [("user", b"Hi"), ("assistant", b"Hello")])
    blocks = _template_blocks(document, tokenizer)
    eot_index = max(i for i, seg in enumerate(document.segments) if seg.role == "eot")
    specials = _special_texts(tokenizer)
    for token_id in blocks[eot_index].tolist():
        token = tokenizer.convert_ids_to_tokens(int(token_id))
        if token in specials:
            return str(token)
    return None


# The end-of-turn token of each chat family: what generation stops at after an assistant turn.
FAMILY_END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}


def family_chat_template(family: str) -> str | None:
    """A Jinja `chat_template` that renders messages exactly as `render` renders a chat document in `family`
    (`bos`, then per message its header, content and end-of-turn; no eos, no injected system prompt), so a student
    saved with it gets from `apply_chat_template` the tokens it was trained on; `add_generation_prompt` appends
    the assistant header. None for `plain`, which has no chat blocks.

    Raises:
        ConfigError: an unknown family.
    """
    if is_template_family(family):
        return None  # the tokenizer's own template is kept
    if family not in FAMILIES:
        raise ConfigError(f"template family {family!r} is unknown; use one of {list(FAMILIES)}")
    blocks = FAMILY_BLOCKS.get(family, {})
    if "header:user" not in blocks:  # plain; `template` keeps the tokenizer's own
        return None

    def literal(text: str | None) -> str:
        if not text:
            return ""
        if text == _BOS:
            return "{{ bos_token }}"
        if text == _EOS:
            return "{{ eos_token }}"
        return (
            "{{ " + repr(text) + " }}"
        )  # a Python repr of these strings is a valid Jinja string literal

    headers = " ".join(
        f"{'if' if i == 0 else 'elif'} message['role'] == {role!r} %}}{literal(blocks[f'header:{role}'])}{{%"
        for i, role in enumerate(CHAT_ROLES)
    )
    return (
        literal(blocks["bos"])
        + "{% for message in messages %}"
        + "{% "
        + headers
        + " else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
        + "{{ message['content'] }}"
        + literal(blocks["eot"])
        + "{% endfor %}"
        + "{% if add_generation_prompt %}"
        + literal(blocks["header:assistant"])
        + "{% endif %}"
    )


def _block_string(family: str, role: str, tokenizer: Any, vocab: Vocab) -> str | None:
    blocks = FAMILY_BLOCKS[family]
    if role not in BLOCK_ROLES:
        raise DataError(
            f"segment role {role!r} is not a template block; use one of {list(BLOCK_ROLES)}"
        )
    if role not in blocks:
        try:
            probed = _PROBES.get(tokenizer)
        except TypeError:
            probed = None
        unused = f" (its chat template is not used: {probed[1]})" if probed and probed[1] else ""
        raise ConfigError(
            f"template family {family!r} has no {role!r} block: it renders plain text only{unused}. Set the data "
            f"spec's or recipe's family to one of chatml, llama3, gemma, role_prefix (tokenizer {vocab.name!r})"
        )
    template = blocks[role]
    if template in (_BOS, _EOS):
        token = getattr(tokenizer, "bos_token" if template == _BOS else "eos_token", None)
        return str(token) if token else None
    if family == "chatml" and role == "eos" and template not in set(vocab.special_text.values()):
        token = getattr(tokenizer, "eos_token", None)
        return str(token) if token else None
    return template


def _render_block(family: str, role: str, tokenizer: Any, vocab: Vocab) -> np.ndarray:
    block = _block_string(family, role, tokenizer, vocab)
    if not block:
        return np.zeros(0, dtype=np.int32)
    ids = np.asarray(
        tokenizer(
            block, add_special_tokens=False, split_special_tokens=False, return_attention_mask=False
        )["input_ids"],
        dtype=np.int32,
    )
    if family == "role_prefix" and role.startswith(("header:", "eot")):
        return ids  # plain text on purpose
    specials = set(vocab.special_text.values())
    needed = [s for s in _marker_strings(block) if s not in specials]
    if needed or not vocab.is_special[ids].any():
        raise TokenizerRefusedError(
            f"tokenizer {vocab.name!r} lacks the special token(s) {needed or [block]!r} that family {family!r} "
            f"uses for its {role!r} block; pick the family that matches the tokenizer (detected: "
            f"{family_for_tokenizer(vocab)!r}) or add the tokens"
        )
    return ids


def _marker_strings(block: str) -> list[str]:
    out = []
    rest = block
    while True:
        start = rest.find("<")
        if start < 0:
            return out
        end = rest.find(">", start)
        if end < 0:
            return out
        out.append(rest[start : end + 1])
        rest = rest[end + 1 :]


_BLOCK_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple[int, str, str], np.ndarray]] = (
    weakref.WeakKeyDictionary()
)


def block_token_ids(family: str, role: str, tokenizer: Any, vocab: Vocab) -> np.ndarray:
    """int32 ids of one template block for `tokenizer` in `family` (cached per tokenizer object).

    Raises:
        TokenizerRefusedError: the tokenizer lacks a special token the block needs.
        ConfigError: the family has no such block (e.g. a chat header in `plain`).
    """
    try:
        cache = _BLOCK_CACHE.get(tokenizer)
        if cache is None:
            cache = _BLOCK_CACHE[tokenizer] = {}
    except TypeError:  # not weak-referenceable
        cache = {}
    key = (id(vocab), family, role)
    if key not in cache:
        cache[key] = _render_block(family, role, tokenizer, vocab)
    return cache[key]


# --------------------------------------------------------------------------------------------------------------
# The tokenizer's own chat template

# Stands for a message's content while finding where the template puts it (no whitespace: survives `| trim`).
_CONTENT_SENTINEL = "\u2063alm\u2063content\u2063"


def _chat_turns(document: Document) -> list[tuple[str, str | None, int, int | None]]:
    """`(role, content, header index, eot index)` per message of a chat document (none if plain).

    The last turn of a sequence truncated in stage two may be cut: a header alone, or a header and its (cut)
    text; it comes with content None and eot index None (only its header is rendered, from the sentinel).
    """
    segments = document.segments
    turns: list[tuple[str, str | None, int, int | None]] = []
    for i, seg in enumerate(segments):
        if not seg.role.startswith("header:"):
            continue
        role = seg.role.removeprefix("header:")
        rest = [s.role for s in segments[i + 1 : i + 3]]
        if rest == ["text", "eot"]:
            try:
                content = segments[i + 1].text.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"document {document.doc_id!r}: message is not UTF-8 ({err})"
                ) from None
            turns.append((role, content, i, i + 2))
        elif rest in ([], ["text"]) and i + 1 + len(rest) == len(segments):
            turns.append((role, None, i, None))  # cut by truncation: the header only
        else:
            raise DataError(
                f"document {document.doc_id!r}: a chat turn is header, text, eot; segment {i} is not followed "
                "by them, so it cannot be rendered with a chat template"
            )
    return turns


def _template_blocks(document: Document, tokenizer: Any) -> dict[int, np.ndarray]:
    """Token ids of each chat block of `document` rendered by the tokenizer's own Jinja `chat_template`.

    The messages are rendered prefix by prefix (`apply_chat_template` of the first k messages, no generation
    prompt); each render must extend the previous one, and the new part must be `header + content + trailer` with
    the content verbatim (found through a sentinel content). The header (with whatever the template puts before
    the first message: bos, a default system prompt) becomes the `header:<role>` block, the trailer the `eot`
    block, and the document's `bos` block renders as nothing. So every block keeps its role and text keeps its
    exact bytes (ALM_SPEC §3), and the loss-region rule applies unchanged.

    Raises:
        TokenizerRefusedError: the tokenizer has no chat template, or the template is not prefix-stable, or it
            changes a message's content (e.g. trims it).
    """
    turns = _chat_turns(document)
    if not turns:
        return {}
    if not getattr(tokenizer, "chat_template", None):
        raise TokenizerRefusedError(
            f"family 'template' needs the tokenizer's chat_template, but {type(tokenizer).__name__} has none; "
            "pick a family (chatml, llama3, gemma) or set tokenizer.chat_template"
        )

    def rendered(messages: list[dict[str, str]]) -> str:
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=False
            )
        except Exception as err:  # the template's own raise_exception, or any Jinja error it makes
            roles = [m["role"] for m in messages]
            raise TokenizerRefusedError(
                f"the chat template of {type(tokenizer).__name__} fails on messages with roles {roles} "
                f"({type(err).__name__}: {err}); pick a family (chatml, llama3, gemma, role_prefix) instead"
            ) from None
        assert isinstance(text, str)
        return text

    def encode(block: str) -> np.ndarray:
        ids = tokenizer(
            block, add_special_tokens=False, split_special_tokens=False, return_attention_mask=False
        )["input_ids"]
        return np.asarray(ids, dtype=np.int32)

    # the template's own start (bos, a default system prompt) is part of the first header
    blocks = {
        i: np.zeros(0, np.int32) for i, seg in enumerate(document.segments) if seg.role == "bos"
    }
    roles = tuple(role for role, *_ in turns)
    pieces = _turn_pieces(tokenizer, roles, rendered, encode)
    complete = [(role, content) for role, content, _, eot_i in turns if content is not None]
    if complete:
        # the one content-dependent render: the whole conversation must be its turns' pieces around the contents
        real = rendered([{"role": role, "content": content} for role, content in complete])
        expected = ""
        for number, (_, content) in enumerate(complete):
            header, trailer = pieces[number][0], pieces[number][1]
            expected += header + content + trailer
            if not real.startswith(expected):
                raise TokenizerRefusedError(
                    f"the chat template changes message {number}'s content or renders around it "
                    "differently for this content (e.g. trims it), so the rendered text is not the data's "
                    "bytes; pick a family (chatml, llama3, gemma, plain) instead"
                )
        if real != expected:
            raise TokenizerRefusedError(
                "the chat template renders something after the last message that depends on the content; "
                "pick a family (chatml, llama3, gemma, plain) instead"
            )
    for number, (_, content, header_i, eot_i) in enumerate(turns):
        blocks[header_i] = pieces[number][2]
        if content is not None and eot_i is not None:
            blocks[eot_i] = pieces[number][3]
    return blocks


_TURN_PIECES: weakref.WeakKeyDictionary[
    Any, dict[tuple[str, tuple[str, ...]], list[tuple[str, str, np.ndarray, np.ndarray]]]
] = weakref.WeakKeyDictionary()
_TURN_PIECES_MAX = 4096  # role sequences cached per tokenizer


def _turn_pieces(
    tokenizer: Any,
    roles: tuple[str, ...],
    rendered: Any,
    encode: Any,
) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(header, trailer, header ids, trailer ids) of each turn of a conversation with these roles, from renders of
    sentinel contents, prefix by prefix: each render must extend the previous one (prefix-stable) and hold the
    new sentinel once. Cached per tokenizer, template and role sequence (a data set has few).

    Raises:
        TokenizerRefusedError: the template is not prefix-stable or renders a content other than once.
    """
    key = (str(tokenizer.chat_template), roles)
    try:
        cache = _TURN_PIECES.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable
        cache = {}
    if key in cache:
        return cache[key]
    out: list[tuple[str, str, np.ndarray, np.ndarray]] = []
    previous = ""
    for number in range(len(roles)):
        probe = rendered([{"role": r, "content": _CONTENT_SENTINEL} for r in roles[: number + 1]])
        if not probe.startswith(previous):
            raise TokenizerRefusedError(
                f"the chat template of {type(tokenizer).__name__} is not prefix-stable: rendering message "
                f"{number} changes what it rendered for the messages before it, so turns have no fixed byte "
                "spans; pick a family (chatml, llama3, gemma, plain) instead"
            )
        new = probe[len(previous) :]
        if new.count(_CONTENT_SENTINEL) != 1:
            raise TokenizerRefusedError(
                f"the chat template renders message {number}'s content {new.count(_CONTENT_SENTINEL)} times; "
                "pick a family (chatml, llama3, gemma, plain) instead"
            )
        header, trailer = new.split(_CONTENT_SENTINEL)
        out.append((header, trailer, encode(header), encode(trailer)))
        previous = probe
    if len(cache) >= _TURN_PIECES_MAX:
        cache.clear()
    cache[key] = out
    return out


# --------------------------------------------------------------------------------------------------------------
# Rendering


@dataclass
class TokenizedSequence:
    """A rendered (or stored) token sequence with exact byte offsets.

    Attributes:
        token_id: int32 [n].
        start_byte, end_byte: int64 [n] offsets in `text`; block tokens have zero width at the block's offset.
        role: object [n]: None for text tokens, the block role for block tokens.
        segments: the segment table, dicts `{role, start_byte, end_byte, start_pos, end_pos}` (blocks have
            `start_byte == end_byte`; a block the family renders as nothing has `start_pos == end_pos`).
        loss_spans: int64 [k, 2] merged byte ranges of in-loss text, clipped to `text`.
        truncated: whether tokens were cut at `max_length`.
        text: the content bytes actually covered (cut exactly where the tokens stop).
        doc_id, source, row: provenance (empty for sequences rebuilt from ids).
        blocks: `block_runs(role, is_block)`, when the builder of the sequence knew them (`render` and
            `sequence_from_ids` do, and build `role` from them), else None.
    """

    token_id: np.ndarray
    start_byte: np.ndarray
    end_byte: np.ndarray
    role: np.ndarray
    segments: list[dict[str, Any]]
    loss_spans: np.ndarray
    truncated: bool
    text: bytes
    doc_id: str = ""
    source: str = ""
    row: int = -1
    blocks: BlockRuns | None = None

    def __len__(self) -> int:
        return len(self.token_id)

    @property
    def num_tokens(self) -> int:
        """Number of tokens n."""
        return len(self.token_id)

    @property
    def num_bytes(self) -> int:
        """Number of content bytes covered."""
        return len(self.text)

    @property
    def is_block(self) -> np.ndarray:
        """bool [n]: template-block tokens."""
        return np.fromiter((r is not None for r in self.role), dtype=bool, count=len(self.role))


# Text longer than this many bytes per remaining token is tokenized in growing prefixes (§3 pre-truncation,
# made exact: a prefix is accepted only if `margin` bytes beyond the last kept token were also seen).
_PREFIX_BYTES_PER_TOKEN = 8
_PREFIX_MARGIN_BYTES = 256


def _prefix_cap(max_tokens: int) -> int:
    """Text up to this many bytes is encoded whole for a budget of `max_tokens` tokens (`_encode_prefix`)."""
    return max(_PREFIX_BYTES_PER_TOKEN * (max_tokens + 1), 4 * _PREFIX_MARGIN_BYTES)


def _encode_prefix(tokenizer: Any, vocab: Vocab, text: bytes, max_tokens: int) -> TokenizedText:
    """`encode_text` of `text`, but for very long text only of a prefix long enough for `max_tokens` tokens."""
    cap = _prefix_cap(max_tokens)
    while cap < len(text):
        enc = encode_text(tokenizer, vocab, text[:cap])
        # The tokens near the cut may differ from the full text's; accept only if the kept ones end well before.
        if len(enc) > max_tokens and enc.end_byte[max_tokens - 1] <= cap - _PREFIX_MARGIN_BYTES:
            return enc
        cap *= 2
    return encode_text(tokenizer, vocab, text)


def encode_documents(
    documents: Sequence[Document], tokenizer: Any, vocab: Vocab, max_length: int | None = None
) -> list[dict[int, TokenizedText]]:
    """Per document, segment index -> `encode_text` of that text segment, for `render(..., text_encodings=)`:
    every text segment of every document in one tokenizer call (`encode_texts`).

    A segment too long to be encoded whole under `max_length` (`render` encodes a prefix of it) is left out.
    """
    whole_bytes = None if max_length is None else _prefix_cap(max_length + 1)
    keys: list[tuple[int, int]] = []
    texts: list[bytes] = []
    for doc_index, document in enumerate(documents):
        for seg_index, seg in enumerate(document.segments):
            if seg.role == "text" and (whole_bytes is None or len(seg.text) <= whole_bytes):
                keys.append((doc_index, seg_index))
                texts.append(seg.text)
    out: list[dict[int, TokenizedText]] = [{} for _ in documents]
    for (doc_index, seg_index), enc in zip(
        keys, encode_texts(tokenizer, vocab, texts), strict=True
    ):
        out[doc_index][seg_index] = enc
    return out


def render(
    document: Document,
    tokenizer: Any,
    vocab: Vocab,
    family: str | None = None,
    max_length: int | None = None,
    *,
    text_encodings: Mapping[int, TokenizedText] | None = None,
) -> TokenizedSequence:
    """Render `document` for `tokenizer` in `family` and truncate to `max_length` tokens.

    Args:
        document: abstract segments.
        tokenizer: HF tokenizer; `vocab` must be its `Vocab`.
        vocab: from `alm.vocab.vocab_from_tokenizer(tokenizer)`.
        family: a resolved family (`chatml`, `llama3`, `gemma`, `plain`, `role_prefix`, `template:<base>`; the
            bare `template` of older stores: chat by the template, plain documents with the tokenizer's own
            bos/eos), or None/`auto` to resolve it here (`resolve_family`).
        max_length: keep at most this many tokens (None: no limit).
        text_encodings: segment index -> `encode_text` of that text segment, already computed (`encode_documents`:
            a micro-batch's text in one tokenizer call); used where the whole segment would be encoded.

    Returns:
        The `TokenizedSequence` (offsets in the content text, segment table, loss spans, truncation, covered text).

    Raises:
        TokenizerRefusedError: a text segment's bytes cannot be reproduced, or a block's special token is missing.
        ConfigError: an unknown family, or a chat block in the `plain` family.
        DataError: a text segment is not valid UTF-8.
    """
    # `auto` is resolved here; a given family is taken as resolved (the bare `template` of older stores keeps its
    # meaning: the tokenizer's own bos/eos for plain documents)
    family = resolve_family(family, tokenizer) if family is None or family == "auto" else family
    if not (
        family in FAMILIES
        or (family.startswith(_TEMPLATE_PREFIX) and template_base(family) in TEMPLATE_BASES)
    ):
        raise ConfigError(
            f"template family {family!r} is unknown; use one of {[*FAMILIES, 'auto']}"
        )
    if max_length is not None and max_length < 1:
        raise ConfigError(f"max_length must be >= 1, got {max_length}")
    # the tokenizer's own template renders the chat blocks; bos/eos of plain documents are its bos/eos tokens
    templated = is_template_family(family)
    template_blocks = _template_blocks(document, tokenizer) if templated else {}
    block_family = template_base(family) if templated else family
    budget = max_length if max_length is not None else None
    id_parts: list[np.ndarray] = []
    # (start_pos, content byte, encoding) of each text segment
    text_parts: list[tuple[int, int, TokenizedText]] = []
    # (start_pos, end_pos, role) of each non-empty block, and the content byte it sits at
    block_parts: list[tuple[int, int, str]] = []
    block_bytes: list[int] = []
    segments: list[dict[str, Any]] = []
    content_byte = 0
    pos = 0
    for seg_index, seg in enumerate(document.segments):
        if budget is not None and pos > budget:
            break
        if seg.role == "text":
            known = None if text_encodings is None else text_encodings.get(seg_index)
            if known is not None and (
                budget is None or len(seg.text) <= _prefix_cap(budget - pos + 1)
            ):
                enc = known  # what `encode_text` / `_encode_prefix` would return here
            elif budget is None:
                enc = encode_text(tokenizer, vocab, seg.text)
            else:
                enc = _encode_prefix(tokenizer, vocab, seg.text, budget - pos + 1)
            ids = enc.token_id
            text_parts.append((pos, content_byte, enc))
            seg_end_byte = content_byte + len(seg.text)
        else:
            ids = (
                template_blocks[seg_index]
                if seg_index in template_blocks
                else block_token_ids(block_family, seg.role, tokenizer, vocab)
            )
            if len(ids):
                block_parts.append((pos, pos + len(ids), seg.role))
                block_bytes.append(content_byte)
            seg_end_byte = content_byte
        segments.append(
            {
                "role": seg.role,
                "start_byte": content_byte,
                "end_byte": seg_end_byte,
                "start_pos": pos,
                "end_pos": pos + len(ids),
            }
        )
        id_parts.append(ids)
        content_byte = seg_end_byte
        pos += len(ids)

    token_id = (
        np.concatenate(id_parts).astype(np.int32, copy=False) if id_parts else np.zeros(0, np.int32)
    )
    # [n] offsets: each text part's own, shifted to its content byte; a block's tokens at its byte, zero width
    start_byte = np.empty(len(token_id), np.int64)
    end_byte = np.empty(len(token_id), np.int64)
    for first, text_byte, enc in text_parts:
        last = first + len(enc.token_id)
        np.add(enc.start_byte, text_byte, out=start_byte[first:last])
        np.add(enc.end_byte, text_byte, out=end_byte[first:last])
    for (first, last, _), block_byte in zip(block_parts, block_bytes, strict=True):
        start_byte[first:last] = block_byte
        end_byte[first:last] = block_byte
    content = document.content_text
    truncated = budget is not None and len(token_id) > budget
    if budget is not None and truncated:
        covered = int(start_byte[budget])
        token_id, start_byte, end_byte = token_id[:budget], start_byte[:budget], end_byte[:budget]
        block_parts = [(s, min(e, budget), r) for s, e, r in block_parts if s < budget]
        kept = []
        for s in segments:
            if s["start_pos"] >= budget:
                break
            kept.append(
                {
                    **s,
                    "end_byte": min(s["end_byte"], covered),
                    "end_pos": min(s["end_pos"], budget),
                }
            )
        segments = kept
    else:
        covered = len(content)
    spans = merged_spans([(s, min(e, covered)) for s, e in document.loss_spans().tolist()])
    blocks = _runs_of_parts(block_parts)
    return TokenizedSequence(
        token_id=token_id,
        start_byte=start_byte,
        end_byte=end_byte,
        role=_roles_of_runs(blocks, len(token_id)),
        segments=segments,
        loss_spans=spans,
        truncated=bool(truncated),
        text=content[:covered],
        doc_id=document.doc_id,
        source=document.source,
        row=document.row,
        blocks=blocks,
    )


# --------------------------------------------------------------------------------------------------------------
# Stage two: back from stored sequences


class StoredTokens(Protocol):
    """What stage two reads back of a stored (or rendered) teacher sequence: `alm.store.StoredSequence` and
    `TokenizedSequence` both have these attributes."""

    @property
    def token_id(self) -> Any: ...  # int [n]
    @property
    def text(self) -> bytes: ...
    @property
    def segments(self) -> Sequence[Mapping[str, Any]]: ...
    @property
    def loss_spans(self) -> Any: ...  # [k, 2] byte ranges
    @property
    def truncated(self) -> bool: ...
    @property
    def doc_id(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def row(self) -> int: ...


def _segment_dicts(segments: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "role": str(seg["role"]),
            "start_byte": int(seg["start_byte"]),
            "end_byte": int(seg["end_byte"]),
            "start_pos": int(seg["start_pos"]),
            "end_pos": int(seg["end_pos"]),
        }
        for seg in segments
    ]


def sequence_from_stored(stored: StoredTokens, vocab: Vocab) -> TokenizedSequence:
    """`sequence_from_ids` of a stored sequence's ids, text, segments, loss spans and truncation flag.

    Raises:
        TokenizerRefusedError, DataError: as `sequence_from_ids`.
    """
    return sequence_from_ids(
        vocab,
        stored.token_id,
        stored.text,
        stored.segments,
        stored.loss_spans,
        truncated=bool(stored.truncated),
    )


def sequence_from_ids(
    vocab: Vocab,
    token_id: Any,
    text: bytes,
    segments: Iterable[Mapping[str, Any]],
    loss_spans: Any = None,
    *,
    truncated: bool = False,
) -> TokenizedSequence:
    """Per-token offsets and roles of a *stored* teacher sequence (stage two).

    Args:
        vocab: the teacher `Vocab`.
        token_id: int [n] stored teacher ids.
        text: the stored content bytes.
        segments: the stored segment table, dicts `{role, start_byte, end_byte, start_pos, end_pos}`.
        loss_spans: optional [k, 2] byte ranges to carry along.
        truncated: the stored truncation flag, carried along.

    Raises:
        TokenizerRefusedError: a text segment's ids do not reproduce its bytes.
        DataError: the segment table does not tile the tokens.
    """
    ids = np.asarray(token_id, dtype=np.int32)
    table = _segment_dicts(segments)
    start_byte = np.zeros(len(ids), dtype=np.int64)
    end_byte = np.zeros(len(ids), dtype=np.int64)
    block_parts: list[tuple[int, int, str]] = []
    pos = 0
    for seg in table:
        sp, ep, sb, eb = seg["start_pos"], seg["end_pos"], seg["start_byte"], seg["end_byte"]
        if sp != pos or ep < sp or ep > len(ids) or eb < sb or eb > len(text):
            raise DataError(
                f"stored segment {seg} does not continue at token {pos} within {len(ids)} tokens and "
                f"{len(text)} bytes: the store's segment table is corrupt"
            )
        if seg["role"] == "text":
            enc = token_offsets(vocab, ids[sp:ep], text[sb:eb])
            start_byte[sp:ep] = enc.start_byte + sb
            end_byte[sp:ep] = enc.end_byte + sb
        elif ep > sp:
            start_byte[sp:ep] = sb
            end_byte[sp:ep] = sb
            block_parts.append((sp, ep, seg["role"]))
        pos = ep
    if pos != len(ids):
        raise DataError(
            f"stored segments cover {pos} of {len(ids)} tokens: the segment table is corrupt"
        )
    spans = (
        np.zeros((0, 2), np.int64)
        if loss_spans is None
        else np.asarray(loss_spans, dtype=np.int64).reshape(-1, 2)
    )
    blocks = _runs_of_parts(block_parts)
    return TokenizedSequence(
        ids,
        start_byte,
        end_byte,
        _roles_of_runs(blocks, len(ids)),
        table,
        spans,
        truncated,
        bytes(text),
        blocks=blocks,
    )


def document_from_stored(stored: StoredTokens) -> Document:
    """`document_from_parts` of a stored sequence, with its provenance (doc id, source, row).

    Raises:
        DataError: a segment lies outside the text.
    """
    return document_from_parts(
        bytes(stored.text),
        stored.segments,
        stored.loss_spans,
        doc_id=str(stored.doc_id or ""),
        source=str(stored.source or ""),
        row=int(stored.row),
    )


def document_from_parts(
    text: bytes,
    segments: Iterable[Mapping[str, Any]],
    loss_spans: Any = None,
    *,
    doc_id: str = "",
    source: str = "",
    row: int = -1,
) -> Document:
    """The abstract document behind a stored sequence, for a student to re-render with its own family.

    Text segments take their bytes from `text` and are in the loss iff their (non-empty) span lies inside the
    loss spans (`token_in_loss`'s text rule); blocks keep their role (including blocks the teacher's family
    rendered as nothing).

    Args:
        text: the stored content bytes.
        segments: the stored segment table (dicts, as `sequence_from_ids`).
        loss_spans: [k, 2] byte ranges of in-loss text, or None.
        doc_id, source, row: provenance carried into the document.

    Raises:
        DataError: a segment lies outside `text`.
    """
    text = bytes(text)
    spans = [] if loss_spans is None else merged_spans(loss_spans).tolist()
    out: list[Segment] = []
    for seg in _segment_dicts(segments):
        sb, eb = seg["start_byte"], seg["end_byte"]
        if not 0 <= sb <= eb <= len(text):
            raise DataError(f"stored segment {seg} lies outside the text ({len(text)} bytes)")
        if seg["role"] == "text":
            # `text_in_spans` of one non-empty range: the last merged span starting at or before it decides
            covering = [span_end for span_start, span_end in spans if span_start <= sb]
            in_loss = eb > sb and bool(covering) and eb <= covering[-1]
            out.append(Segment("text", text[sb:eb], in_loss))
        else:
            out.append(Segment(seg["role"]))
    return Document(doc_id, source, row, tuple(out))
