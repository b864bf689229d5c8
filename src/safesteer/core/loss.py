"""Stage 3 losses: distil the steered teacher into the student on the safety-token slice S.

Every variant scores the next-token distribution at each valid completion position and is reduced
as the method prescribes: mean over the valid positions of each sequence, then mean over sequences.

Memory is the point of this module. A rollout batch of 32 completions x 512 tokens x a 150k
vocabulary is ~10 GB of float32 logits per model, before softmax intermediates and autograd saves.
So the valid positions are scored in chunks; each chunk's student logits are computed inside
`torch.utils.checkpoint` (recomputed in backward instead of stored) and the teacher's under
`no_grad`, so forward and backward both peak at one chunk of logits, never [B, T, V].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..errors import SafesteerError

LOSS_VARIANTS = ("localized", "localized_renorm", "localized_forward", "localized_bucket", "full_reverse")

# Floor for the log-probability of the "rest of the vocabulary" bucket: keeps 0 * log 0 finite
# when S holds (numerically) all of the mass, without changing any non-degenerate value.
_LOG_FLOOR = -1e4

_STAT_KEYS = ("student_s_mass", "teacher_s_mass", "student_entropy", "sampled_kl")

# Checkpoint a lone chunk too (the behaviour before issue #11); only benchmarks/bench_step.py sets it,
# to time the previous code path.
CHECKPOINT_SINGLE_CHUNK = False

# False: the S slice, rest bucket and entropy from the plain autograd formulas (`_plain_slice_logprobs`, the code
# before `_SliceLogProbs`); benchmarks/bench_step.py sets it to time the previous code path.
FUSED_SLICE = True


@dataclass
class DistillationOutput:
    """Result of `distillation_loss`.

    loss: scalar to backpropagate. per_sequence: [B] detached token-mean loss of each sequence
    (NaN for a sequence without valid positions, which the loss excludes). stats: detached means
    over all valid tokens of the batch (NaN when there are none).
    """

    loss: Tensor
    per_sequence: Tensor
    stats: dict[str, float] = field(default_factory=dict)


def _upcast(x: Tensor) -> Tensor:
    """Half-precision logits are too coarse for logsumexp over a large vocabulary; float64 stays."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def s_slice_logprobs(logits: Tensor, safety_ids: Tensor) -> Tensor:
    """logit[S] - logsumexp(logits) over the full vocabulary: [..., V] -> [..., K] (float32 math).

    These are full-softmax log-probabilities gathered at S, not renormalised over S, and no
    [..., V] log-softmax is materialised.
    """
    logits = _upcast(logits)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    return logits.index_select(-1, safety_ids.to(logits.device)) - lse


def _plain_slice_logprobs(logits: Tensor, ids: Tensor, with_entropy: bool = True,
                          with_rest: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """What `_SliceLogProbs` computes, from plain autograd formulas: the same values to float32 rounding,
    several [R, V] passes and saved tensors more (the rest, empty unless `with_rest`, is a logsumexp over the
    complement of S)."""
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    ls = logits.index_select(-1, ids) - lse
    rest = logits.new_empty(0)
    if with_rest:
        in_s = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device).index_fill_(0, ids, True)
        rest = (torch.logsumexp(logits.masked_fill(in_s, float("-inf")), dim=-1) - lse.squeeze(-1)).clamp(min=_LOG_FLOOR)
    entropy = logits.new_empty(0)
    if with_entropy:
        with torch.no_grad():
            logp = logits - lse
            entropy = -(logp.exp() * logp).sum(-1)
    return ls, rest, entropy, lse.squeeze(-1).detach()


def _slice_logprobs(logits: Tensor, ids: Tensor, with_entropy: bool = True,
                    with_rest: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(ls [R, K], rest [R], entropy [R], lse [R]) of logits [R, V], see `_SliceLogProbs`; the plain path leaves
    out what is not asked for (an empty tensor), the fused one computes the rest bucket anyway (one sum)."""
    if FUSED_SLICE:
        return _SliceLogProbs.apply(logits, ids, with_entropy)
    return _plain_slice_logprobs(logits, ids, with_entropy, with_rest)


class _SliceLogProbs(torch.autograd.Function):
    """logits [R, V] -> (ls [R, K], rest [R], entropy [R], lse [R]): full-softmax log-probabilities at S, the
    log-probability of the rest of the vocabulary (clamped at _LOG_FLOOR), and, without gradient, the entropy
    (empty unless `with_entropy`) and the log-normaliser, all from one [R, V] tensor of exponentials.

    The plain formulas (`_plain_slice_logprobs`: logsumexp, a logsumexp over the complement of S, an entropy)
    under autograd walk the [R, V] logits a dozen times and save several [R, V] tensors for backward; on the
    default model a chunk is ~600 x 151,936 floats, so those elementwise passes cost as much as the output head.
    Here forward makes e = exp(logits - max) once, sums it (normaliser), zeroes S in place and sums again
    (the rest, over its own terms: no cancellation when S holds nearly all the mass), and keeps e for
    backward, which writes the gradient in one pass: with p = softmax(logits), g_k = dL/d ls_k, G = sum_k g_k,
    g_r = dL/d rest and P_r = P(not S),
        dL/dx_v = p_v (g_r / P_r - G - g_r)       for v not in S,
        dL/dx_v = g_k - p_v (G + g_r)             for v = s_k.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor, with_entropy: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        top = logits.amax(dim=-1, keepdim=True)
        e = logits - top
        e.exp_()
        total = e.sum(dim=-1, keepdim=True)
        lse = top + total.log()
        ls = logits.index_select(-1, ids) - lse
        entropy = logits.new_empty(0)
        # lse - sum_v p_v x_v, the dot product as a batched one (no [R, V] product tensor); the difference of two
        # logit-sized numbers, so good to ~1e-5 nats in float32: a logged statistic, not part of the loss.
        if with_entropy:
            entropy = (lse - torch.einsum("rv,rv->r", e, logits).unsqueeze(-1) / total).squeeze(-1)
        e.index_fill_(-1, ids, 0.0)
        rest_sum = e.sum(dim=-1, keepdim=True)
        rest = (rest_sum.log() - total.log()).squeeze(-1).clamp(min=_LOG_FLOOR)
        ctx.save_for_backward(e, total, rest_sum, ls, rest, ids)
        ctx.mark_non_differentiable(entropy, lse)
        return ls, rest, entropy, lse.squeeze(-1)

    @staticmethod
    def backward(ctx, g_ls: Tensor | None, g_rest: Tensor | None, _g_entropy, _g_lse):
        e, total, rest_sum, ls, rest, ids = ctx.saved_tensors
        g_ls = torch.zeros_like(ls) if g_ls is None else g_ls
        g_rest = torch.zeros_like(rest) if g_rest is None else g_rest
        # The clamp at the floor passes no gradient (nor does a rest that underflowed to 0).
        g_rest = torch.where(rest > _LOG_FLOOR, g_rest, 0.0).unsqueeze(-1)
        big_g = g_ls.sum(dim=-1, keepdim=True)
        per_rest = torch.where(rest_sum > 0, g_rest / rest_sum.clamp(min=torch.finfo(rest_sum.dtype).tiny), 0.0)
        grad = e * (per_rest - (big_g + g_rest) / total)  # the columns of S are 0 in e, filled next
        grad.index_copy_(-1, ids, g_ls - ls.exp() * (big_g + g_rest))
        return grad, None, None


def _check_inputs(student_hidden, teacher_hidden, safety_ids, mask, variant, chunk_size, target_ids) -> None:
    if variant not in LOSS_VARIANTS:
        raise SafesteerError(f"unknown loss variant {variant!r}; use one of: {', '.join(LOSS_VARIANTS)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise SafesteerError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if student_hidden.dim() != 3:
        raise SafesteerError(
            f"student_hidden must be [batch, positions, hidden], got shape {tuple(student_hidden.shape)}"
        )
    if teacher_hidden.dim() != 3 or teacher_hidden.shape[:2] != student_hidden.shape[:2]:
        raise SafesteerError(
            f"teacher_hidden shape {tuple(teacher_hidden.shape)} does not match student_hidden "
            f"{tuple(student_hidden.shape)} in [batch, positions]; score the same sequences with both models"
        )
    bt = tuple(student_hidden.shape[:2])
    if tuple(mask.shape) != bt:
        raise SafesteerError(f"mask shape {tuple(mask.shape)} must be [batch, positions] = {bt}")
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise SafesteerError("mask must hold only 0/1 (or bool) values; 1 marks a valid completion position")
    if target_ids is not None:
        if tuple(target_ids.shape) != bt:
            raise SafesteerError(f"target_ids shape {tuple(target_ids.shape)} must be [batch, positions] = {bt}")
        if target_ids.dtype.is_floating_point or target_ids.dtype == torch.bool:
            raise SafesteerError(f"target_ids must be an integer tensor of token ids, got {target_ids.dtype}")
    if safety_ids.dim() != 1 or safety_ids.numel() == 0:
        raise SafesteerError(
            f"safety_ids must be a non-empty 1-D tensor of token ids, got shape {tuple(safety_ids.shape)}; "
            "run safety-token selection first"
        )
    if safety_ids.dtype.is_floating_point or safety_ids.dtype == torch.bool:
        raise SafesteerError(f"safety_ids must be an integer tensor of token ids, got {safety_ids.dtype}")
    if torch.unique(safety_ids).numel() != safety_ids.numel():
        raise SafesteerError("safety_ids contains duplicate token ids; each token of S must appear once")


def _check_vocab(vocab_size: int, safety_ids: Tensor, targets: Tensor | None) -> None:
    lo, hi = int(safety_ids.min()), int(safety_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise SafesteerError(
            f"safety_ids range [{lo}, {hi}] lies outside the vocabulary of the head (size {vocab_size}); "
            "were the safety tokens selected with another tokenizer?"
        )
    if targets is not None and targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab_size):
        raise SafesteerError(
            f"target_ids at valid positions lie outside the vocabulary (size {vocab_size}); check the mask"
        )


def _sum_p_log_ratio(log_p: Tensor, log_q: Tensor) -> Tensor:
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _normalised_reverse_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) for two normalised distributions, as sum p (e^d - 1 - d) with d = log q - log p.

    Equal to sum p (log p - log q) because sum q - sum p = 0, but every term is >= 0 and second order
    in d. The plain form cancels first-order terms, and float32 rounding of the two log-normalisers
    (~1e-6 at logit scale 16) then leaves a result that can be negative when p and q nearly agree.
    """
    d = log_q - log_p
    p = log_p.exp()
    safe = d.clamp(max=30.0)  # expm1 overflows float32 near 88; beyond 30 nothing cancels anyway
    terms = torch.where(d < 30.0, p * (torch.expm1(safe) - safe), log_q.exp() - p - p * d)
    return terms.sum(-1)


def _no_valid_positions(student_hidden: Tensor, with_targets: bool) -> DistillationOutput:
    """`distillation_loss` when no position is valid: a zero connected to student_hidden, NaN elsewhere."""
    nan = float("nan")
    stats = {"student_s_mass": nan, "teacher_s_mass": nan, "student_entropy": nan}
    if with_targets:
        stats["sampled_kl"] = nan
    # An empty slice sums to an exact 0 even if the hidden states hold NaN/inf.
    zero = student_hidden[..., :0].sum().float()
    per_sequence = torch.full((student_hidden.shape[0],), nan, device=student_hidden.device)
    return DistillationOutput(loss=zero, per_sequence=per_sequence, stats=stats)


def _check_safety_ids(vocab_size: int, ids: Tensor, targets: Tensor | None, variant: str) -> None:
    """S (and the targets) checked against the head's vocabulary."""
    _check_vocab(vocab_size, ids, targets)
    if variant == "localized_bucket" and ids.numel() == vocab_size:
        raise SafesteerError("localized_bucket needs tokens outside S, but S is the whole vocabulary")


def _variant_loss(variant: str, logits: Tensor, lse: Tensor, ls: Tensor, ls_rest: Tensor, lt: Tensor,
                  lt_rest: Tensor, teacher_head: Callable[[Tensor], Tensor], th: Tensor) -> Tensor:
    """The loss at each position of a chunk: from the student's S slice `ls` and the teacher's `lt` (in ls's
    dtype); "localized_bucket" also takes both rest buckets `ls_rest`, `lt_rest`; "full_reverse" the
    student's logits and their logsumexp `lse` and the teacher's hidden states `th` (its head is applied
    here, under no_grad)."""
    if variant == "localized":
        return _sum_p_log_ratio(ls, lt)
    if variant == "localized_renorm":
        return _sum_p_log_ratio(ls - ls.logsumexp(-1, keepdim=True), lt - lt.logsumexp(-1, keepdim=True))
    if variant == "localized_forward":
        return _sum_p_log_ratio(lt, ls)
    if variant == "localized_bucket":
        lt_all = torch.cat([lt, lt_rest.to(ls.dtype).unsqueeze(-1)], dim=-1)
        return _normalised_reverse_kl(torch.cat([ls, ls_rest.unsqueeze(-1)], dim=-1), lt_all)
    # full_reverse
    with torch.no_grad():
        t_logp = torch.log_softmax(_upcast(teacher_head(th)), dim=-1).to(logits.dtype)
    return _sum_p_log_ratio(logits - lse, t_logp)


def _sequence_means(losses: Tensor, seq_of_pos: Tensor, counts: Tensor, sequence_weights: Tensor | None,
                    device: torch.device) -> tuple[Tensor, Tensor]:
    """The method's reduction of the valid positions' losses: the mean over each sequence's valid
    positions (`counts`), then the mean over the sequences that have any, weighted by `sequence_weights`
    if given. Returns the loss and the [B] detached per-sequence means (NaN without valid positions)."""
    batch = counts.shape[0]
    seq_sum = torch.zeros(batch, dtype=losses.dtype, device=device).index_add(0, seq_of_pos, losses)
    has_tokens = counts > 0
    seq_mean = seq_sum[has_tokens] / counts[has_tokens].to(losses.dtype)
    per_sequence = torch.full((batch,), math.nan, dtype=losses.dtype, device=device)
    per_sequence[has_tokens] = seq_mean.detach()
    if sequence_weights is None:
        return seq_mean.mean(), per_sequence
    w = _weights(sequence_weights, (batch,), "sequence_weights", device, losses.dtype)[has_tokens]
    return (w * seq_mean).sum() / w.sum(), per_sequence


def distillation_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    student_head: Callable[[Tensor], Tensor],
    teacher_head: Callable[[Tensor], Tensor],
    safety_ids: Tensor,
    mask: Tensor,
    variant: str = "localized",
    chunk_size: int = 64,
    target_ids: Tensor | None = None,
    sequence_weights: Tensor | None = None,
    position_weights: Tensor | None = None,
) -> DistillationOutput:
    """Distillation loss of the student towards the teacher, chunked over positions.

    student_hidden / teacher_hidden: [B, T, d] final hidden states (after the final norm) at the
    positions whose next-token distribution is scored; student_head / teacher_head map them to
    logits (the same module is fine: teacher logits are computed under no_grad). safety_ids: [K]
    the set S. mask: [B, T], 1 = valid completion position; hidden states, targets and teacher
    values at masked positions are never read, so padding may hold anything.

    Variants, with ls / lt = student / teacher full-softmax log-probs gathered at S:
    "localized" (the method's loss) sum_S exp(ls) (ls - lt), not a divergence: it can be negative
    and alone is minimised at p_s = p_t / e; "localized_renorm" reverse KL after renormalising both
    over S; "localized_forward" sum_S exp(lt) (lt - ls); "localized_bucket" reverse KL over the K
    tokens of S plus one bucket for the rest of the vocabulary (>= 0); "full_reverse" reverse KL
    over the whole vocabulary.

    Memory: a chunk scores up to B * chunk_size valid positions, so the peak is one [B, chunk_size, V]
    slab of logits, forward and backward. With more than one chunk the student chunk is
    checkpointed, i.e. its head runs again during backward; when every valid position fits in one
    chunk nothing would be freed between chunks, so it is not (same loss and gradients, one head
    pass fewer, that chunk's intermediates kept for backward). For "full_reverse" the teacher head is
    re-run in backward too (its full distribution is needed there and storing it would cost [B, T, V]), so teacher_head must
    not depend on a context, such as a disabled adapter, that ends before backward.

    If no position is valid, the loss is a zero connected to student_hidden, so backward still
    runs (and gives zero gradients); per_sequence and stats are then NaN.

    Weights (beyond the paper; None = all 1, which is exactly the method's reduction): with [B]
    sequence_weights w and [B, T] position_weights v the loss is
    sum_b w_b (sum_t v_bt L_bt / sum_t m_bt) / sum_b w_b over the sequences with valid positions,
    so v scales positions without changing the per-sequence normaliser; per_sequence holds the
    v-weighted means.
    """
    _check_inputs(student_hidden, teacher_hidden, safety_ids, mask, variant, chunk_size, target_ids)
    batch, length, _ = student_hidden.shape
    device = student_hidden.device
    valid = mask.to(device=device, dtype=torch.bool)
    counts = valid.sum(dim=1)
    # Only valid positions are scored: padding costs no compute and cannot leak NaNs into the loss.
    flat_pos = valid.reshape(-1).nonzero().squeeze(1)
    seq_of_pos = flat_pos // length
    n_valid = flat_pos.numel()

    if n_valid == 0:
        return _no_valid_positions(student_hidden, with_targets=target_ids is not None)

    s_hidden = student_hidden.reshape(batch * length, -1)
    t_hidden = teacher_hidden.reshape(batch * length, -1)
    targets = None
    if target_ids is not None:
        targets = target_ids.to(device).reshape(-1).index_select(0, flat_pos).long()
    ids = safety_ids.to(device).long()
    vocab_size = -1  # learnt from the first teacher chunk

    def student_chunk(h: Tensor, lt: Tensor, lt_rest: Tensor, th: Tensor, tgt: Tensor) -> tuple[Tensor, ...]:
        logits = _upcast(student_head(h))
        if logits.shape[-1] != vocab_size:
            raise SafesteerError(
                f"student head gives {logits.shape[-1]} logits but teacher head {vocab_size}; "
                "student and teacher must share a vocabulary"
            )
        if variant == "full_reverse":
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            ls, ls_rest = logits.index_select(-1, ids) - lse, empty
            loss = _variant_loss(variant, logits, lse, ls, ls_rest, lt.to(ls.dtype), lt_rest, teacher_head, th)
            with torch.no_grad():
                logp = logits - lse
                entropy = -(logp.exp() * logp).sum(-1)
        else:
            ls, ls_rest, entropy, lse = _slice_logprobs(logits, ids, with_rest=variant == "localized_bucket")
            lse = lse.unsqueeze(-1)
            loss = _variant_loss(variant, logits, lse, ls, ls_rest, lt.to(ls.dtype), lt_rest, teacher_head, th)
        # Statistics last: checkpoint's recomputation in backward stops after the last saved tensor.
        with torch.no_grad():
            s_mass = ls.exp().sum(-1)
            logp_target = (logits.gather(-1, tgt.unsqueeze(-1)) - lse).squeeze(-1) if tgt.numel() else tgt.float()
        return loss, s_mass, entropy, logp_target

    rows = chunk_size * batch
    token_loss: list[Tensor] = []
    # Summed as tensors and read once at the end: a .item() per chunk would sync the device each time.
    sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in _STAT_KEYS}
    empty = torch.empty(0, dtype=torch.long, device=device)
    for start in range(0, n_valid, rows):
        pos = flat_pos[start : start + rows]
        tgt = targets[start : start + rows] if targets is not None else empty
        th = t_hidden.index_select(0, pos).detach()
        with torch.no_grad():
            t_logits = _upcast(teacher_head(th))
            if vocab_size < 0:
                vocab_size = t_logits.shape[-1]
                _check_safety_ids(vocab_size, ids, targets, variant)
            lt, lt_rest, _, t_lse = _slice_logprobs(t_logits, ids, False, variant == "localized_bucket")
            t_lse = t_lse.unsqueeze(-1)
            lt_rest = lt_rest if variant == "localized_bucket" else empty
            sums["teacher_s_mass"] += lt.exp().sum()
            if tgt.numel():
                t_logp_target = (t_logits.gather(-1, tgt.unsqueeze(-1)) - t_lse).squeeze(-1)
            del t_logits, t_lse
        h = s_hidden.index_select(0, pos)
        th_arg = th if variant == "full_reverse" else empty
        if torch.is_grad_enabled() and (n_valid > rows or CHECKPOINT_SINGLE_CHUNK):
            loss, s_mass, entropy, logp_target = checkpoint(
                student_chunk, h, lt, lt_rest, th_arg, tgt, use_reentrant=False
            )
        else:
            loss, s_mass, entropy, logp_target = student_chunk(h, lt, lt_rest, th_arg, tgt)
        token_loss.append(loss)
        sums["student_s_mass"] += s_mass.sum()
        sums["student_entropy"] += entropy.sum()
        if tgt.numel():
            sums["sampled_kl"] += (logp_target - t_logp_target.to(logp_target.dtype)).sum()

    losses = torch.cat(token_loss)
    if position_weights is not None:
        v = _weights(position_weights, (batch, length), "position_weights", device, losses.dtype)
        losses = losses * v.reshape(-1).index_select(0, flat_pos)
    loss, per_sequence = _sequence_means(losses, seq_of_pos, counts, sequence_weights, device)
    stats = {k: float(v) / n_valid for k, v in sums.items()}
    if target_ids is None:
        del stats["sampled_kl"]
    return DistillationOutput(loss=loss, per_sequence=per_sequence, stats=stats)


def _weights(weights: Tensor, shape: tuple, name: str, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Loss weights checked for shape and sign, on the loss's device and dtype."""
    if tuple(weights.shape) != shape:
        raise SafesteerError(f"{name} shape {tuple(weights.shape)} must be {shape}")
    weights = weights.detach().to(device=device, dtype=dtype)
    if not bool((weights >= 0).all()):
        raise SafesteerError(f"{name} must be >= 0")
    return weights
