"""The chunked, checkpointed distillation losses against plain dense references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, kl_divergence

import safesteer.core.loss as loss_module
from safesteer.errors import SafesteerError
from safesteer.core.loss import LOSS_VARIANTS, distillation_loss, s_slice_logprobs

B, T, D, V = 3, 7, 16, 50
SAFETY_IDS = torch.tensor([3, 11, 17, 24, 30, 41, 49])


def make_head(seed: int, scale: float = 3.0) -> torch.nn.Linear:
    # Scaled-up weights give peaked distributions, closer to a real LM than near-uniform logits.
    torch.manual_seed(seed)
    head = torch.nn.Linear(D, V)
    with torch.no_grad():
        head.weight.mul_(scale)
    return head


def make_batch(seed: int = 0, batch: int = B, length: int = T):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, length, D, generator=g)
    teacher = student + 0.7 * torch.randn(batch, length, D, generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    if batch > 1:
        mask[1, length - 3 :] = False  # right padding
    if batch > 2:
        mask[2, 0] = False  # a masked position before valid ones
    targets = torch.randint(0, V, (batch, length), generator=g)
    return student, teacher, mask, targets


def dense_token_loss(logp_s: torch.Tensor, logp_t: torch.Tensor, variant: str) -> torch.Tensor:
    """Each formula written out on materialised full log-softmaxes."""
    ls, lt = logp_s[..., SAFETY_IDS], logp_t[..., SAFETY_IDS]
    if variant == "localized":
        return (ls.exp() * (ls - lt)).sum(-1)
    if variant == "localized_renorm":
        ls, lt = ls - ls.logsumexp(-1, keepdim=True), lt - lt.logsumexp(-1, keepdim=True)
        return (ls.exp() * (ls - lt)).sum(-1)
    if variant == "localized_forward":
        return (lt.exp() * (lt - ls)).sum(-1)
    if variant == "localized_bucket":
        ps_rest, pt_rest = 1 - ls.exp().sum(-1), 1 - lt.exp().sum(-1)
        return (ls.exp() * (ls - lt)).sum(-1) + ps_rest * (ps_rest.log() - pt_rest.log())
    if variant == "full_reverse":
        return (logp_s.exp() * (logp_s - logp_t)).sum(-1)
    raise AssertionError(variant)


def dense_reference(student, teacher, s_head, t_head, mask, variant):
    logp_s = torch.log_softmax(s_head(student), -1)
    with torch.no_grad():
        logp_t = torch.log_softmax(t_head(teacher), -1)
    token = torch.where(mask, dense_token_loss(logp_s, logp_t, variant), 0.0)
    counts = mask.sum(1)
    per_seq = token.sum(1) / counts.clamp(min=1)
    keep = counts > 0
    return per_seq[keep].mean(), per_seq, token


@pytest.mark.parametrize("variant", LOSS_VARIANTS)
@pytest.mark.parametrize("chunk_size", [1, 3, T, T + 5])
def test_chunked_matches_dense_value_and_gradients(variant, chunk_size):
    s_head, t_head = make_head(1), make_head(2).requires_grad_(False)
    student, teacher, mask, _ = make_batch()

    ref_hidden = student.clone().requires_grad_(True)
    ref_loss, ref_per_seq, _ = dense_reference(ref_hidden, teacher, s_head, t_head, mask, variant)
    ref_loss.backward()
    ref_grads = (ref_hidden.grad, s_head.weight.grad.clone(), s_head.bias.grad.clone())
    s_head.zero_grad()

    hidden = student.clone().requires_grad_(True)
    out = distillation_loss(hidden, teacher, s_head, t_head, SAFETY_IDS, mask, variant, chunk_size)
    out.loss.backward()

    torch.testing.assert_close(out.loss, ref_loss)
    torch.testing.assert_close(out.per_sequence, ref_per_seq.detach())
    assert not out.per_sequence.requires_grad
    torch.testing.assert_close(hidden.grad, ref_grads[0])
    torch.testing.assert_close(s_head.weight.grad, ref_grads[1])
    torch.testing.assert_close(s_head.bias.grad, ref_grads[2])


@pytest.mark.parametrize("variant", ["localized", "full_reverse"])
def test_shared_head_gets_no_gradient_through_the_teacher(variant):
    # A LoRA teacher shares lm_head with the student: only the student path may train it.
    head = make_head(3)
    student, teacher, mask, _ = make_batch(1)
    ref_loss, _, _ = dense_reference(student, teacher, head, head, mask, variant)
    ref_loss.backward()
    ref_grad = head.weight.grad.clone()
    head.zero_grad()

    out = distillation_loss(student, teacher, head, head, SAFETY_IDS, mask, variant, chunk_size=2)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref_loss)
    torch.testing.assert_close(head.weight.grad, ref_grad)


def test_no_grad_mode_gives_same_value():
    s_head, t_head = make_head(1), make_head(2)
    student, teacher, mask, _ = make_batch()
    with_grad = distillation_loss(student, teacher, s_head, t_head, SAFETY_IDS, mask, chunk_size=2)
    with torch.no_grad():
        without = distillation_loss(student, teacher, s_head, t_head, SAFETY_IDS, mask, chunk_size=2)
    torch.testing.assert_close(without.loss, with_grad.loss.detach())


@pytest.mark.parametrize("variant", LOSS_VARIANTS)
def test_masked_positions_do_not_matter(variant):
    s_head, t_head = make_head(1), make_head(2)
    student, teacher, mask, targets = make_batch()
    out_a = distillation_loss(student, teacher, s_head, t_head, SAFETY_IDS, mask, variant, 2, targets)

    student_b, teacher_b, targets_b = student.clone(), teacher.clone(), targets.clone()
    student_b[~mask] = float("nan")
    teacher_b[~mask] = 1e4 * torch.randn_like(teacher_b[~mask])
    targets_b[~mask] = -100  # an id no vocabulary has: must never be gathered
    hidden = student_b.requires_grad_(True)
    out_b = distillation_loss(hidden, teacher_b, s_head, t_head, SAFETY_IDS, mask, variant, 2, targets_b)
    out_b.loss.backward()

    torch.testing.assert_close(out_b.loss.detach(), out_a.loss.detach())
    assert out_b.stats == pytest.approx(out_a.stats)
    assert torch.isfinite(hidden.grad).all()
    assert (hidden.grad[~mask] == 0).all()
    assert (hidden.grad[mask].abs().sum(-1) > 0).all()


def test_per_sequence_mean_then_batch_mean():
    s_head, t_head = make_head(1), make_head(2)
    student, teacher, _, _ = make_batch(2, batch=2, length=6)
    teacher[0] = 5 * torch.randn(6, D)  # the short sequence disagrees much more with its teacher
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, :1] = True
    mask[1, :] = True
    out = distillation_loss(student, teacher, s_head, t_head, SAFETY_IDS, mask, chunk_size=4)

    _, _, token = dense_reference(student, teacher, s_head, t_head, mask, "localized")
    sequence_weighted = 0.5 * token[0, 0] + 0.5 * token[1].mean()
    token_weighted = token[mask].mean()
    assert not torch.isclose(sequence_weighted, token_weighted, atol=1e-3)
    torch.testing.assert_close(out.loss.detach(), sequence_weighted.detach())


def test_all_masked_sequence_is_excluded():
    s_head, t_head = make_head(1), make_head(2)
    student, teacher, mask, _ = make_batch(3)
    mask[1] = False
    out = distillation_loss(student, teacher, s_head, t_head, SAFETY_IDS, mask, chunk_size=3)
    keep = torch.tensor([0, 2])
    ref, _, _ = dense_reference(student[keep], teacher[keep], s_head, t_head, mask[keep], "localized")
    torch.testing.assert_close(out.loss.detach(), ref.detach())
    assert math.isnan(out.per_sequence[1])
    assert torch.isfinite(out.per_sequence[keep]).all()


@pytest.mark.parametrize("variant", LOSS_VARIANTS)
def test_all_masked_batch_gives_connected_zero(variant):
    s_head, t_head = make_head(1), make_head(2)
    student, teacher, _, targets = make_batch()
    student[0, 0] = float("nan")
    hidden = student.requires_grad_(True)
    mask = torch.zeros(B, T)
    out = distillation_loss(hidden, teacher, s_head, t_head, SAFETY_IDS, mask, variant, 2, targets)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert (hidden.grad == 0).all()
    assert torch.isnan(out.per_sequence).all()
    assert set(out.stats) == {"student_s_mass", "teacher_s_mass", "student_entropy", "sampled_kl"}


def identity_head(x: torch.Tensor) -> torch.Tensor:
    return x


def test_localized_is_minimised_at_teacher_over_e_and_can_be_negative():
    # With an identity head the "hidden state" is the logit vector, so the student is optimised directly.
    vocab, ids = 6, torch.tensor([0, 2, 4])
    t_logits = torch.tensor([[[1.5, 0.2, 0.9, -0.4, 0.3, 0.0]]])
    p_t = torch.softmax(t_logits, -1)[0, 0, ids]
    mask = torch.ones(1, 1, dtype=torch.bool)

    z = torch.zeros(1, 1, vocab, requires_grad=True)
    opt = torch.optim.LBFGS([z], lr=1.0, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        out = distillation_loss(z, t_logits, identity_head, identity_head, ids, mask)
        out.loss.backward()
        return out.loss

    opt.step(closure)
    p_s = torch.softmax(z.detach(), -1)[0, 0, ids]
    torch.testing.assert_close(p_s, p_t / math.e, atol=1e-4, rtol=1e-4)
    final = distillation_loss(z, t_logits, identity_head, identity_head, ids, mask).loss.item()
    assert final == pytest.approx(-(p_t.sum() / math.e).item(), abs=1e-6)
    assert final < 0
    at_teacher = distillation_loss(t_logits, t_logits, identity_head, identity_head, ids, mask).loss.item()
    assert at_teacher == pytest.approx(0.0, abs=1e-7) and final < at_teacher


def test_bucket_is_nonnegative_and_zero_iff_s_probabilities_agree():
    mask = torch.ones(B, T, dtype=torch.bool)
    for seed in range(10):
        s_head, t_head = make_head(seed, scale=1 + seed), make_head(100 + seed, scale=1 + seed)
        student, teacher, _, _ = make_batch(seed)
        out = distillation_loss(student, teacher, s_head, t_head, SAFETY_IDS, mask, "localized_bucket", 4)
        assert out.loss.item() > 0
        assert (out.per_sequence >= 0).all()

    s_head = make_head(5)
    student, _, _, _ = make_batch(5)
    same = distillation_loss(student, student, s_head, s_head, SAFETY_IDS, mask, "localized_bucket", 4)
    assert same.loss.item() == pytest.approx(0.0, abs=1e-6)

    # Shuffling the non-S logits keeps every S probability: the bucket loss stays 0, full KL does not.
    logits = torch.randn(B, T, V) * 3
    rest = torch.tensor([v for v in range(V) if v not in set(SAFETY_IDS.tolist())])
    shuffled = logits.clone()
    shuffled[..., rest] = logits[..., rest[torch.randperm(len(rest))]]
    args = (logits, shuffled, identity_head, identity_head, SAFETY_IDS, mask)
    assert distillation_loss(*args, variant="localized_bucket").loss.item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(*args, variant="full_reverse").loss.item() > 0.1


@pytest.mark.parametrize("top", [8.0, 12.0, 16.0, 20.0, 30.0])
def test_bucket_is_accurate_in_float32_when_s_holds_almost_all_mass(top):
    # A confident refusal opener puts nearly all mass on S. The plain float32 formula then loses the
    # tail to rounding and can even go negative; the loss must stay positive and match float64.
    ids = torch.tensor([0, 1])
    s_logits = torch.tensor([[[top, top - 1, 0.0, 1.0]]])
    t_logits = torch.tensor([[[top, top - 1, 3.0, 0.0]]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    out = distillation_loss(s_logits, t_logits, identity_head, identity_head, ids, mask, "localized_bucket")
    ls = torch.log_softmax(s_logits.double(), -1)[0, 0]
    lt = torch.log_softmax(t_logits.double(), -1)[0, 0]
    ls_rest, lt_rest = ls[2:].logsumexp(-1), lt[2:].logsumexp(-1)
    expected = (ls[:2].exp() * (ls[:2] - lt[:2])).sum() + ls_rest.exp() * (ls_rest - lt_rest)
    assert out.loss.item() > 0
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_full_reverse_equals_torch_kl():
    s_head, t_head = make_head(7), make_head(8)
    student, teacher, mask, _ = make_batch(7)
    out = distillation_loss(student, teacher, s_head, t_head, SAFETY_IDS, mask, "full_reverse", 3)
    with torch.no_grad():
        kl = kl_divergence(Categorical(logits=s_head(student)), Categorical(logits=t_head(teacher)))
    per_seq = torch.stack([kl[b][mask[b]].mean() for b in range(B)])
    torch.testing.assert_close(out.per_sequence, per_seq)
    torch.testing.assert_close(out.loss.detach(), per_seq.mean())


def test_stats_match_dense():
    s_head, t_head = make_head(1), make_head(2)
    student, teacher, mask, targets = make_batch(4)
    out = distillation_loss(student, teacher, s_head, t_head, SAFETY_IDS, mask, chunk_size=2, target_ids=targets)
    with torch.no_grad():
        s_logits, t_logits = s_head(student), t_head(teacher)
        logp_s, logp_t = F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1)
        s_mass = logp_s[..., SAFETY_IDS].exp().sum(-1)[mask].mean()
        t_mass = logp_t[..., SAFETY_IDS].exp().sum(-1)[mask].mean()
        entropy = Categorical(logits=s_logits).entropy()[mask].mean()
        y = targets.unsqueeze(-1)
        sampled_kl = (logp_s.gather(-1, y) - logp_t.gather(-1, y)).squeeze(-1)[mask].mean()
    assert out.stats["student_s_mass"] == pytest.approx(s_mass.item(), rel=1e-5)
    assert out.stats["teacher_s_mass"] == pytest.approx(t_mass.item(), rel=1e-5)
    assert out.stats["student_entropy"] == pytest.approx(entropy.item(), rel=1e-5)
    assert out.stats["sampled_kl"] == pytest.approx(sampled_kl.item(), rel=1e-5, abs=1e-6)
    assert all(isinstance(v, float) for v in out.stats.values())

    no_targets = distillation_loss(student, teacher, s_head, t_head, SAFETY_IDS, mask)
    assert "sampled_kl" not in no_targets.stats


def test_s_slice_logprobs_uses_full_vocabulary_softmax():
    logits = torch.randn(2, 5, V, dtype=torch.bfloat16)
    out = s_slice_logprobs(logits, SAFETY_IDS)
    assert out.dtype == torch.float32 and out.shape == (2, 5, len(SAFETY_IDS))
    torch.testing.assert_close(out, F.log_softmax(logits.float(), -1)[..., SAFETY_IDS])
    assert (out.exp().sum(-1) < 1).all()  # not renormalised over S


class SavedTensorProbe:
    """Records the size of every tensor autograd saves for backward outside checkpointed regions."""

    def __init__(self):
        self.sizes: list[int] = []

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    def _pack(self, t):
        self.sizes.append(t.numel())
        return t


@pytest.mark.parametrize("variant", LOSS_VARIANTS)
def test_checkpointing_keeps_no_full_logits_alive(variant, monkeypatch):
    batch, length, chunk = 2, 24, 4
    s_head, t_head = make_head(1), make_head(2)
    student, teacher, _, _ = make_batch(6, batch=batch, length=length)
    mask = torch.ones(batch, length, dtype=torch.bool)
    hidden = student.requires_grad_(True)

    with SavedTensorProbe() as probe:
        out = distillation_loss(hidden, teacher, s_head, t_head, SAFETY_IDS, mask, variant, chunk)
    assert max(probe.sizes) <= batch * chunk * V
    assert sum(probe.sizes) < batch * length * V
    out.loss.backward()
    assert hidden.grad is not None

    # The probe has teeth: without checkpointing every chunk's logits stay saved until backward.
    monkeypatch.setattr(loss_module, "checkpoint", lambda fn, *args, **kwargs: fn(*args))
    with SavedTensorProbe() as unchecked:
        distillation_loss(hidden, teacher, s_head, t_head, SAFETY_IDS, mask, variant, chunk)
    assert sum(unchecked.sizes) >= batch * length * V



@pytest.mark.parametrize("variant", LOSS_VARIANTS)
def test_one_chunk_is_not_checkpointed(variant, monkeypatch):
    """All valid positions in one chunk: no recomputation of the head in backward, same loss and gradients
    (test_chunked_matches_dense_value_and_gradients covers chunk_size >= T against the dense reference)."""
    def no_checkpoint(*args, **kwargs):
        raise AssertionError("a single chunk must not be checkpointed")

    s_head, t_head = make_head(1), make_head(2)
    student, teacher, mask, _ = make_batch()
    hidden = student.clone().requires_grad_(True)
    monkeypatch.setattr(loss_module, "checkpoint", no_checkpoint)
    out = distillation_loss(hidden, teacher, s_head, t_head, SAFETY_IDS, mask, variant, chunk_size=T)
    out.loss.backward()
    assert hidden.grad is not None
    with pytest.raises(AssertionError, match="single chunk"):  # two chunks still are
        distillation_loss(hidden, teacher, s_head, t_head, SAFETY_IDS, mask, variant, chunk_size=1)


def test_errors():
    s_head, t_head = make_head(1), make_head(2)
    student, teacher, mask, targets = make_batch()

    def call(**overrides):
        kwargs = dict(
            student_hidden=student, teacher_hidden=teacher, student_head=s_head, teacher_head=t_head,
            safety_ids=SAFETY_IDS, mask=mask,
        )
        kwargs.update(overrides)
        return distillation_loss(**kwargs)

    with pytest.raises(SafesteerError, match="localized_bucket"):
        call(variant="reverse")
    with pytest.raises(SafesteerError, match="teacher_hidden shape"):
        call(teacher_hidden=teacher[:, :-1])
    with pytest.raises(SafesteerError, match="student_hidden must be"):
        call(student_hidden=student[0])
    with pytest.raises(SafesteerError, match="mask shape"):
        call(mask=mask[:, :-1])
    with pytest.raises(SafesteerError, match="0/1"):
        call(mask=mask.float() * 0.5)
    with pytest.raises(SafesteerError, match="target_ids shape"):
        call(target_ids=targets[:1])
    with pytest.raises(SafesteerError, match="duplicate"):
        call(safety_ids=torch.tensor([3, 11, 3]))
    with pytest.raises(SafesteerError, match="non-empty"):
        call(safety_ids=torch.tensor([], dtype=torch.long))
    with pytest.raises(SafesteerError, match="outside the vocabulary"):
        call(safety_ids=torch.tensor([3, V]))
    with pytest.raises(SafesteerError, match="outside the vocabulary"):
        call(target_ids=torch.full_like(targets, V))
    with pytest.raises(SafesteerError, match="chunk_size"):
        call(chunk_size=0)
    with pytest.raises(SafesteerError, match="share a vocabulary"):
        call(student_head=torch.nn.Linear(D, V + 1))


# ----------------------------------------------------------------------------- weights (beyond the paper)


@pytest.mark.parametrize("variant", LOSS_VARIANTS)
def test_unit_weights_are_bit_for_bit_the_unweighted_loss(variant):
    s_head, t_head = make_head(1), make_head(2)
    student, teacher, mask, targets = make_batch(4)
    kw = dict(variant=variant, chunk_size=3, target_ids=targets)
    plain = distillation_loss(student.clone().requires_grad_(), teacher, s_head, t_head, SAFETY_IDS, mask, **kw)
    ones = distillation_loss(student.clone().requires_grad_(), teacher, s_head, t_head, SAFETY_IDS, mask, **kw,
                             sequence_weights=torch.ones(B), position_weights=torch.ones(B, T))
    assert torch.equal(plain.loss, ones.loss)
    assert torch.equal(plain.per_sequence, ones.per_sequence)
    assert plain.stats == ones.stats


@pytest.mark.parametrize("variant", ["localized", "localized_bucket"])
def test_weights_match_a_dense_reference_in_value_and_gradient(variant):
    s_head, t_head = make_head(1), make_head(2)
    student, teacher, mask, _ = make_batch(5)
    w = torch.tensor([1.0, 4.0, 0.5])
    v = torch.ones(B, T)
    v[:, :2] = 3.0  # the opening positions count three times
    v[0, 5] = 0.0
    x = student.clone().requires_grad_()
    out = distillation_loss(x, teacher, s_head, t_head, SAFETY_IDS, mask, variant=variant, chunk_size=2,
                            sequence_weights=w, position_weights=v)
    out.loss.backward()

    y = student.clone().requires_grad_()
    _, _, token = dense_reference(y, teacher, s_head, t_head, mask, variant)
    per_seq = (token * v).sum(1) / mask.sum(1)
    ref = (w * per_seq).sum() / w.sum()
    ref.backward()
    torch.testing.assert_close(out.loss.detach(), ref.detach())
    torch.testing.assert_close(out.per_sequence, per_seq.detach())
    torch.testing.assert_close(x.grad, y.grad)


def test_sequence_weights_skip_empty_sequences_and_are_checked():
    s_head, t_head = make_head(1), make_head(2)
    student, teacher, mask, _ = make_batch(3)
    mask[1] = False
    w = torch.tensor([2.0, 100.0, 1.0])  # the empty sequence's weight is not in the normaliser
    out = distillation_loss(student, teacher, s_head, t_head, SAFETY_IDS, mask, chunk_size=3, sequence_weights=w)
    _, per_seq, _ = dense_reference(student, teacher, s_head, t_head, mask, "localized")
    torch.testing.assert_close(out.loss.detach(), ((2 * per_seq[0] + per_seq[2]) / 3).detach())
    with pytest.raises(SafesteerError, match="sequence_weights shape"):
        distillation_loss(student, teacher, s_head, t_head, SAFETY_IDS, mask, sequence_weights=torch.ones(2))
    with pytest.raises(SafesteerError, match="position_weights must be >= 0"):
        distillation_loss(student, teacher, s_head, t_head, SAFETY_IDS, mask, position_weights=-torch.ones(B, T))


def test_fused_slice_gradients_are_exact_in_float64():
    """_SliceLogProbs' hand-written backward against finite differences, for ls and the rest bucket at once,
    also on a row where S holds nearly all of the mass."""
    torch.manual_seed(0)
    logits = torch.randn(4, 12, dtype=torch.float64) * 3
    logits[1, [2, 5]] += 25.0  # S (below) holds ~all the mass of this row
    logits.requires_grad_(True)
    ids = torch.tensor([2, 5, 9])

    def f(x):
        ls, rest, _, _ = loss_module._SliceLogProbs.apply(x, ids, False)
        return ls, rest

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("with_entropy", [True, False])
def test_fused_slice_matches_the_plain_formulas(with_entropy):
    """The fused slice (one pass of exponentials, own backward) and the plain autograd formulas give the same S
    log-probs, rest bucket, entropy and normaliser, and the same gradients for any upstream gradient."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 400, generator=g) * 4
    logits[0, SAFETY_IDS] += 20.0  # a confident refusal opener
    ids = SAFETY_IDS
    up_ls, up_rest = torch.randn(6, len(ids), generator=g), torch.randn(6, generator=g)
    outputs, grads = [], []
    for fn in (loss_module._SliceLogProbs.apply, loss_module._plain_slice_logprobs):
        x = logits.clone().requires_grad_(True)
        ls, rest, entropy, lse = fn(x, ids, with_entropy)
        ((ls * up_ls).sum() + (rest * up_rest).sum()).backward()
        outputs.append((ls.detach(), rest.detach(), entropy, lse))
        grads.append(x.grad)
    (ls, rest, entropy, lse), (ls0, rest0, entropy0, lse0) = outputs
    for fused, plain in ((ls, ls0), (rest, rest0), (lse, lse0)):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    if with_entropy:
        # lse - E_p[x] cancels ~20-nat terms in float32: a logged statistic, good to ~1e-4 nats.
        expected = Categorical(logits=logits.double()).entropy().float()
        torch.testing.assert_close(entropy, expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(entropy0, expected, rtol=0, atol=1e-4)
    else:
        assert outputs[0][2].numel() == 0


def test_the_plain_path_gives_the_same_loss(monkeypatch):
    """FUSED_SLICE = False (the code path bench_step.py times as before) computes the same loss and gradients."""
    s_head, t_head = make_head(1), make_head(2).requires_grad_(False)
    student, teacher, mask, targets = make_batch(5)
    results = []
    for fused in (True, False):
        monkeypatch.setattr(loss_module, "FUSED_SLICE", fused)
        hidden = student.clone().requires_grad_(True)
        out = distillation_loss(hidden, teacher, s_head, t_head, SAFETY_IDS, mask, "localized_bucket", 3,
                                target_ids=targets)
        out.loss.backward()
        results.append((out.loss.detach(), hidden.grad, out.stats))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)
    for key in results[0][2]:
        assert results[0][2][key] == pytest.approx(results[1][2][key], rel=1e-5, abs=1e-7)
