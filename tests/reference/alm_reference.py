"""Reference ALM, written straight from ALM_SPEC.md §4–§6 as plain per-token / per-chunk Python loops.

Independent of `alm.align`, `alm.templates` and `alm.losses`: a two-pointer walk over token byte strings (§4.1,
with the team's rules for blocks, truncated blocks, position 0, the tail and the loss region), per-chunk sums,
merging, debiasing (none after a template block) and the divergences evaluated from their Bernoulli definitions in
float64. Slow on purpose; only for tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class RefChunk:
    teacher_start: int
    teacher_end: int
    student_start: int
    student_end: int
    start_byte: int
    end_byte: int
    is_block: bool
    in_loss: bool = True


def _blocks(roles: list) -> list[tuple[object, int, int]]:
    """[(role, start_pos, end_pos)] for runs of equal non-None roles."""
    blocks = []
    pos = 0
    while pos < len(roles):
        if roles[pos] is None:
            pos += 1
            continue
        end = pos
        while end < len(roles) and roles[end] == roles[pos]:
            end += 1
        blocks.append((roles[pos], pos, end))
        pos = end
    return blocks


def _byte_offsets(tokens: list[bytes], roles: list) -> list[int]:
    """Start byte of each token in the content text (blocks have zero width)."""
    offsets, cum = [], 0
    for token, role in zip(tokens, roles):
        offsets.append(cum)
        if role is None:
            cum += len(token)
    return offsets


OPENING_ROLES = ("bos", "header:user", "header:assistant", "header:system")


def reference_token_in_loss(
    tokens: list[bytes], roles: list, loss_spans: list[tuple[int, int]]
) -> list[bool]:
    """Per token, from the rule's statement: text whose every byte is covered by some span (a zero-width token:
    the byte it sits before); a block run iff the token before it is in, and an opening block (bos, header) only
    if every text token is in too."""
    covered = {byte for start, end in loss_spans for byte in range(start, end)}
    offsets = _byte_offsets(tokens, roles)
    flags = []
    for pos, (token, role) in enumerate(zip(tokens, roles)):
        first = offsets[pos]
        if role is None:
            flags.append(all(b in covered for b in range(first, first + max(len(token), 1))))
        else:
            flags.append(False)  # decided below
    every_text = all(f for f, r in zip(flags, roles) if r is None)
    for pos, role in enumerate(roles):
        if role is None:
            continue
        run_start = pos
        while run_start > 0 and roles[run_start - 1] == role:
            run_start -= 1
        trained = run_start > 0 and flags[run_start - 1]
        if role in OPENING_ROLES:
            trained = trained and every_text
        flags[pos] = trained
    return flags


def reference_align(
    teacher_tokens: list[bytes],
    student_tokens: list[bytes],
    teacher_roles: list | None = None,
    student_roles: list | None = None,
    loss_spans: list[tuple[int, int]] | None = None,
    keep_outside_loss: bool = False,
    teacher_truncated: bool = False,
    student_truncated: bool = False,
) -> list[RefChunk]:
    teacher_roles = (
        list(teacher_roles) if teacher_roles is not None else [None] * len(teacher_tokens)
    )
    student_roles = (
        list(student_roles) if student_roles is not None else [None] * len(student_tokens)
    )
    teacher_offsets = _byte_offsets(teacher_tokens, teacher_roles)
    student_offsets = _byte_offsets(student_tokens, student_roles)

    # Blocks: the k-th block of a role on each side, kept when both are at the same byte offset and in order, and
    # neither reaches the end of a truncated side (it may have been cut).
    teacher_blocks, student_blocks = _blocks(teacher_roles), _blocks(student_roles)
    pair_of_teacher: dict[int, int] = {}  # teacher block start pos -> pair id
    pair_of_student: dict[int, int] = {}
    block_span_teacher: dict[int, int] = {}
    block_span_student: dict[int, int] = {}
    last_student_block = -1
    for t_index, (role, t_start, t_end) in enumerate(teacher_blocks):
        occurrence = sum(1 for r, _, _ in teacher_blocks[:t_index] if r == role)
        same_role = [k for k, (r, _, _) in enumerate(student_blocks) if r == role]
        if occurrence >= len(same_role):
            continue
        s_index = same_role[occurrence]
        _, s_start, s_end = student_blocks[s_index]
        cut = (teacher_truncated and t_end == len(teacher_tokens)) or (
            student_truncated and s_end == len(student_tokens)
        )
        if cut:
            continue
        if teacher_offsets[t_start] == student_offsets[s_start] and s_index > last_student_block:
            last_student_block = s_index
            pair_of_teacher[t_start] = t_index
            pair_of_student[s_start] = t_index
            block_span_teacher[t_start] = t_end
            block_span_student[s_start] = s_end
    matched_teacher = {p for s, e in block_span_teacher.items() for p in range(s, e)}
    matched_student = {p for s, e in block_span_student.items() for p in range(s, e)}

    def kind(pos: int, tokens: list, roles: list, matched: set, pairs: dict) -> str:
        if pos >= len(tokens):
            return "end"
        if roles[pos] is None:
            return "text"
        if pos in pairs:
            return "block"
        assert pos not in matched
        return "dropped"

    chunks: list[RefChunk] = []
    i = j = 0
    pend_t: list[int] = []
    pend_s: list[int] = []
    width_t = width_s = 0  # bytes consumed in the open chunk
    cum_t = cum_s = 0  # byte offset reached on each side
    start_byte = 0
    dropped_t = dropped_s = tainted = False

    def reset() -> None:
        nonlocal pend_t, pend_s, width_t, width_s, dropped_t, dropped_s, tainted, start_byte
        pend_t, pend_s = [], []
        width_t = width_s = 0
        dropped_t = dropped_s = tainted = False
        start_byte = cum_t

    while True:
        if width_t > 0 and width_s > 0 and cum_t == cum_s:
            if not tainted:
                chunks.append(
                    RefChunk(
                        pend_t[0],
                        pend_t[-1] + 1,
                        pend_s[0],
                        pend_s[-1] + 1,
                        start_byte,
                        cum_t,
                        False,
                    )
                )
            reset()
            continue
        kind_t = kind(i, teacher_tokens, teacher_roles, matched_teacher, pair_of_teacher)
        kind_s = kind(j, student_tokens, student_roles, matched_student, pair_of_student)
        if kind_t == "dropped":
            dropped_t = dropped_t or bool(pend_t)
            i += 1
            continue
        if kind_s == "dropped":
            dropped_s = dropped_s or bool(pend_s)
            j += 1
            continue
        if kind_t == "text" and (cum_t < cum_s or (cum_t == cum_s and width_t == 0)):
            if not pend_t and not pend_s:
                start_byte = cum_t
            tainted = tainted or dropped_t
            pend_t.append(i)
            width_t += len(teacher_tokens[i])
            cum_t += len(teacher_tokens[i])
            i += 1
            continue
        if kind_s == "text" and (cum_s < cum_t or (cum_s == cum_t and width_s == 0)):
            if not pend_t and not pend_s:
                start_byte = cum_s
            tainted = tainted or dropped_s
            pend_s.append(j)
            width_s += len(student_tokens[j])
            cum_s += len(student_tokens[j])
            j += 1
            continue
        if kind_t == "block" and kind_s == "block" and pair_of_teacher[i] == pair_of_student[j]:
            assert cum_t == cum_s == teacher_offsets[i]
            end_t, end_s = block_span_teacher[i], block_span_student[j]
            chunks.append(RefChunk(i, end_t, j, end_s, cum_t, cum_t, True))
            i, j = end_t, end_s
            reset()
            continue
        break  # one side ended (truncation): the rest is the unaligned tail

    out = []
    if loss_spans is not None:
        teacher_flags = reference_token_in_loss(teacher_tokens, teacher_roles, loss_spans)
        student_flags = reference_token_in_loss(student_tokens, student_roles, loss_spans)
    for chunk in chunks:
        if chunk.teacher_start == 0 or chunk.student_start == 0:
            continue
        if loss_spans is not None:
            # A chunk is in the loss iff every token it holds, on both sides, is.
            chunk.in_loss = all(teacher_flags[chunk.teacher_start : chunk.teacher_end]) and all(
                student_flags[chunk.student_start : chunk.student_end]
            )
        if chunk.in_loss or keep_outside_loss:
            out.append(chunk)
    return out


@dataclass
class RefGroup:
    teacher_logp: float
    teacher_start: int
    teacher_end: int
    student_start: int
    student_end: int
    has_boundary_term: bool = True  # append_space on both sides; none after a template block


def reference_groups(
    chunks: list[RefChunk],
    teacher_logp: list[float],
    teacher_boundary_logmass: list[float],
    gamma: float = 0.1,
    drop_unterminated: bool = True,
    debias: bool = True,
) -> list[RefGroup]:
    """§5.1–§5.3 on the compact list of in-loss chunks, group by group; `debias=False` leaves the teacher's
    boundary term out of the group log-prob (merging still follows gamma)."""
    chunks = [c for c in chunks if c.in_loss]
    groups: list[RefGroup] = []
    current: list[tuple[RefChunk, float]] = []
    for index, chunk in enumerate(chunks):
        chunk_logp = min(
            0.0, math.fsum(teacher_logp[q] for q in range(chunk.teacher_start, chunk.teacher_end))
        )
        current.append((chunk, chunk_logp))
        boundary = min(0.0, teacher_boundary_logmass[chunk.teacher_end - 1])
        terminated = math.exp(boundary) > gamma
        last = index == len(chunks) - 1
        gap = not last and (
            chunks[index + 1].teacher_start != chunk.teacher_end
            or chunks[index + 1].student_start != chunk.student_end
        )
        if terminated or last or gap:
            if terminated or chunk.is_block or not drop_unterminated:
                groups.append(
                    RefGroup(
                        teacher_logp=sum(lp for _, lp in current)
                        + (boundary if debias and not chunk.is_block else 0.0),
                        teacher_start=current[0][0].teacher_start,
                        teacher_end=chunk.teacher_end,
                        student_start=current[0][0].student_start,
                        student_end=chunk.student_end,
                        has_boundary_term=debias and not chunk.is_block,
                    )
                )
            current = []
    return groups


def reference_divergence(
    teacher_logp: torch.Tensor,
    student_logp: torch.Tensor,
    temperature: float,
    divergence: str,
    eps: float = 1e-6,
) -> torch.Tensor:
    """The Bernoulli definitions of §6.1, element by element in float64 (p = teacher, q = student)."""
    values = []
    for lt, ls in zip(teacher_logp.double().reshape(-1), student_logp.double().reshape(-1)):
        p = torch.exp(lt / temperature - eps)
        q = torch.exp(ls / temperature - eps)
        if divergence == "binary_ce":
            value = -(p * torch.log(q) + (1 - p) * torch.log(1 - q))
        elif divergence == "reverse_binary_kl":
            value = q * torch.log(q / p) + (1 - q) * torch.log((1 - q) / (1 - p))
        elif divergence == "abs_exp":
            value = torch.abs(p - q)
        elif divergence == "abs":
            value = torch.abs(lt - ls)
        elif divergence == "binary_kl_temp_limit":
            log_p, log_q = lt - eps, ls - eps
            value = (log_p - log_q) + log_p * torch.log(log_q / log_p)
        else:
            raise ValueError(divergence)
        values.append(value)
    return torch.stack(values).reshape(teacher_logp.shape)


def reference_loss(
    student_logits: list[torch.Tensor],
    student_ids: list[list[int]],
    student_boundary_mask: torch.Tensor,
    groups: list[list[RefGroup]],
    *,
    temperature: float = 100.0,
    divergence: str = "binary_ce",
    normaliser: float | None = None,
    vocab_size: int | None = None,
    debias: bool = True,
    excess: bool = False,
) -> torch.Tensor:
    """Σ over groups of the divergence between LT and the student's debiased group log-prob, / normaliser.

    `debias=False`: the student's group log-prob is the plain token sum (no boundary term). `excess=True`: each
    group's divergence minus its value at LS = LT (for binary_ce, the binary KL above the teacher's entropy)."""
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for logits, ids, example_groups in zip(student_logits, student_ids, groups):
        size = vocab_size or logits.shape[-1]
        logsm = torch.log_softmax(logits[:, :size].double(), dim=-1)  # [Ts, V]
        for group in example_groups:
            token_sum = sum(
                logsm[q - 1, ids[q]] for q in range(group.student_start, group.student_end)
            )
            token_sum = torch.clamp(token_sum, max=0.0)
            last = group.student_end - 1
            boundary = torch.clamp(
                torch.logsumexp(logsm[last][student_boundary_mask[:size]], dim=0), max=0.0
            )
            student_logp = token_sum + boundary if debias and group.has_boundary_term else token_sum
            teacher_logp = torch.tensor(group.teacher_logp, dtype=torch.float64)
            value = reference_divergence(
                teacher_logp[None], student_logp[None], temperature, divergence
            )[0]
            if excess:
                p = torch.exp(teacher_logp / temperature - 1e-6)
                value = value - (
                    -(p * torch.log(p) + (1 - p) * torch.log(1 - p))
                    if divergence == "binary_ce"
                    else 0.0
                )
            total = total + value
            count += 1
    return total / (normaliser if normaliser is not None else max(count, 1))
