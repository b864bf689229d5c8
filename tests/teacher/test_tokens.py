"""Safety-token selection: the vote against hand-computed toy cases, the rollout against a teacher-forced
reference, and the stage end to end on a tiny random model with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import safesteer.teacher.tokens as st
from safesteer import cli
from safesteer.core.anatomy import end_of_turn_ids, format_prompts, output_head
from safesteer.core.sampling import rollout_seeds
from safesteer.errors import SafesteerError
from safesteer.teacher.tokens import (
    SafetyTokenConfig,
    end_of_turn_valid_mask,
    filter_harmless,
    load_safety_tokens,
    rollout_batch,
    run_token_stage,
    select_safety_tokens,
    static_eligible_mask,
    vote_tokens,
)
from safesteer.core.steering import add_direction

from conftest import make_tiny_model

PROMPTS = ["Say hi.", "Write a short poem about the sea and the sky at dawn.", "Count to three.", "Name a colour."]


def logits_rows(rows: list[dict[int, float]], vocab: int) -> torch.Tensor:
    """[len(rows), vocab] logits: the given entries, 0 elsewhere."""
    out = torch.zeros(len(rows), vocab)
    for i, row in enumerate(rows):
        for tok, value in row.items():
            out[i, tok] = value
    return out


# ----------------------------------------------------------------------------- the vote on toy tensors


def hand_case():
    """2 samples x 2 positions over V=10; base uniform, so delta orders tokens like the steered logits."""
    V = 10
    steered = logits_rows([
        {7: 3.0, 2: 2.0, 5: 1.0},                 # sample 0, position 0
        {2: 3.0, 9: 2.0, 0: 1.5, 7: 1.0},         # sample 0, position 1
        {0: 4.0, 2: 2.0, 5: 1.5, 4: 1.0},         # sample 1, position 0
        {8: 10.0},                                # sample 1, position 1: masked
    ], V)
    logp_t = steered.log_softmax(-1).view(2, 2, V)
    logp_0 = torch.full((2, 2, V), -math.log(V))
    valid = torch.tensor([[True, True], [True, False]])
    eligible = torch.ones(V, dtype=torch.bool)
    eligible[0] = False  # e.g. a special token
    return logp_t, logp_0, valid, eligible


def test_vote_reproduces_hand_computed_case():
    logp_t, logp_0, valid, eligible = hand_case()
    sel = vote_tokens(logp_t, logp_0, valid, eligible, k_prime=3, k=4)
    # Top-3 eligible per valid position: {7,2,5}, {2,9,7} (0 excluded), {2,5,4} (0 excluded).
    # Votes: 2 -> 3, 7 -> 2, 5 -> 2, 9 -> 1, 4 -> 1. Ties: 7 beats 5 on mean delta (steered logits
    # summed over the valid positions: 3+1+0 = 4 vs 1+0+1.5 = 2.5), 9 beats 4 (2 vs 1).
    assert sel.ids == [2, 7, 5, 9]
    assert sel.votes == [3, 2, 2, 1]
    assert sel.n_valid_positions == 3
    # Mean delta of token 2 by hand: its steered log-prob per valid row, plus log V for the uniform base.
    rows = logp_t[valid]
    assert sel.mean_delta[0] == pytest.approx(float(rows[:, 2].mean()) + math.log(10), abs=1e-5)
    assert sel.mean_steered_prob[0] == pytest.approx(float(rows[:, 2].exp().mean()), rel=1e-5)
    assert sel.mean_base_prob[0] == pytest.approx(0.1, rel=1e-5)
    # K larger than the voted set: zero-vote tokens are dropped, the masked row's token 8 never voted.
    wide = vote_tokens(logp_t, logp_0, valid, eligible, k_prime=3, k=10)
    assert wide.ids == [2, 7, 5, 9, 4]


def test_vote_with_fewer_eligible_tokens_than_k_prime():
    V = 10
    eligible = torch.zeros(V, dtype=torch.bool)
    eligible[[1, 4, 6]] = True
    base = logits_rows([{t: 2.0 for t in (1, 4, 6)}] * 3, V).log_softmax(-1)
    # The steered model lowers every eligible token and raises every excluded one: all eligible deltas < 0.
    steered = logits_rows([{1: -1.0, 4: -2.0, 6: -3.0, 0: 5.0, 9: 4.0}] * 3, V).log_softmax(-1)
    valid = torch.ones(1, 3, dtype=torch.bool)
    sel = vote_tokens(steered.view(1, 3, V), base.view(1, 3, V), valid, eligible, k_prime=5, k=50)
    assert (steered - base)[:, [1, 4, 6]].max() < 0
    assert sel.ids == [1, 4, 6]  # each position voted only among the 3 eligible tokens
    assert sel.votes == [3, 3, 3]
    # The internal tally: exactly one vote per (position, eligible token), nothing else.
    stats = st.TokenStats(V)
    stats.add_steered(steered)
    stats.add_scores(steered, base, eligible, k_prime=5)
    assert stats.votes.tolist() == [0, 3, 0, 0, 3, 0, 3, 0, 0, 0]


def test_end_of_turn_mask_is_cumulative():
    argmax = torch.tensor([[5, 2, 7, 7], [1, 1, 1, 2], [2, 4, 4, 4], [3, 3, 3, 3], [9, 8, 9, 2]])
    valid = end_of_turn_valid_mask(argmax, eot_ids=[2, 8])
    assert valid.tolist() == [
        [True, False, False, False],  # eot predicted at position 1: it and everything after are invalid
        [True, True, True, False],
        [False, False, False, False],
        [True, True, True, True],
        [True, False, False, False],  # the second end-of-turn id counts too
    ]


class StubTokenizer:
    """Seven tokens with known texts; the model's output matrix has two extra padding rows."""

    vocab = ["<|endoftext|>", "hello", " world", "<|im_start|>", "a<|b", "<pad>", "\n"]
    all_special_ids = [0, 3]
    added_tokens_decoder = {0: SimpleNamespace(special=True), 3: SimpleNamespace(special=True),
                            5: SimpleNamespace(special=True), 6: SimpleNamespace(special=False)}

    def __len__(self):
        return len(self.vocab)

    def batch_decode(self, seqs):
        return ["".join(self.vocab[i] for i in s) for s in seqs]


def test_static_exclusions_on_a_stub_vocabulary():
    mask = static_eligible_mask(StubTokenizer(), vocab_size=9)
    # special (0, 3), added special (5), "<|" in the text of a non-special token (4), rows past the tokenizer.
    assert mask.tolist() == [False, True, True, False, False, False, True, False, False]


def test_static_exclusions_on_the_real_tokenizer(smol_tokenizer):
    tok = smol_tokenizer
    mask = static_eligible_mask(tok, len(tok))
    assert not mask[tok.all_special_ids].any()
    texts = tok.batch_decode([[i] for i in range(len(tok))])
    assert not any(mask[i] and "<|" in t for i, t in enumerate(texts))
    hello = tok("Hello", add_special_tokens=False)["input_ids"]
    assert len(hello) == 1 and mask[hello[0]]


def test_probability_floor_uses_mean_over_valid_positions():
    V = 6
    # Base: uniform, except tokens 3 and 4, which it all but never emits (so their deltas are the largest).
    logp_0 = torch.full((V,), 1 / V).log()
    logp_0[[3, 4]] = -40.0
    # Steered: 3 and 4 stay tiny at the valid positions (delta ~17 and ~19 but p_t < 1e-8); token 4 is
    # likely only at the masked position. Among the rest, 1 rises most (0.5 vs 1/6), then 2 (0.2).
    p_valid = torch.tensor([0.15, 0.5, 0.2, 1e-10, 1e-9, 0.15])
    p_masked = torch.tensor([0.1, 0.1, 0.1, 1e-10, 0.6, 0.1])
    logp_t = torch.stack([p_valid.log(), p_valid.log(), p_masked.log()]).view(1, 3, V)
    logp_0 = logp_0.expand(1, 3, V)
    valid = torch.tensor([[True, True, False]])
    eligible = torch.ones(V, dtype=torch.bool)
    floored = vote_tokens(logp_t, logp_0, valid, eligible, k_prime=2, k=3, min_steered_prob=1e-8)
    assert floored.ids == [1, 2] and floored.votes == [2, 2]
    assert vote_tokens(logp_t, logp_0, valid, eligible, 2, 3, min_steered_prob=0.0).ids == [4, 3]
    # Were the masked position counted, token 4's mean steered probability (~0.2) would pass the floor.
    all_valid = torch.ones(1, 3, dtype=torch.bool)
    assert 4 in vote_tokens(logp_t, logp_0, all_valid, eligible, 2, 3, min_steered_prob=1e-8).ids


def test_mean_variant_ranks_by_average_delta():
    V = 5
    delta = torch.tensor([[0.0, 10.0, 1.0, 0.0, 0.0],   # token 1 jumps at one position only
                          [0.0, 0.0, 1.0, 0.0, 0.0],
                          [0.0, 0.0, 1.0, 0.0, 0.5]]).view(1, 3, V)
    logp_0 = torch.full((1, 3, V), -math.log(V))
    logp_t = logp_0 + delta  # log-probs need not be normalised for the selection itself
    valid = torch.ones(1, 3, dtype=torch.bool)
    eligible = torch.ones(V, dtype=torch.bool)
    vote = vote_tokens(logp_t, logp_0, valid, eligible, k_prime=1, k=1)
    mean = vote_tokens(logp_t, logp_0, valid, eligible, k_prime=1, k=3, method="mean")
    assert vote.ids == [2]  # two of three positions put token 2 first
    assert mean.ids == [1, 2, 4]  # averages 10/3, 1, 1/6
    assert mean.mean_delta == pytest.approx([10 / 3, 1.0, 0.5 / 3], abs=1e-6)


def test_ties_are_broken_by_mean_delta_then_id_and_row_order_does_not_matter():
    V = 6
    delta = torch.tensor([[0.0, 2.0, 0.5, 0.0, 2.0, 1.5],
                          [0.0, 1.0, 0.8, 0.0, 1.0, 0.2]])
    logp_0 = torch.full((2, V), -math.log(V))
    logp_t = logp_0 + delta
    eligible = torch.ones(V, dtype=torch.bool)
    valid = torch.ones(2, 1, dtype=torch.bool)
    sel = vote_tokens(logp_t.view(2, 1, V), logp_0.view(2, 1, V), valid, eligible, k_prime=3, k=4)
    # Top-3 per row: {1, 4, 5} and {1, 4, 2}. Tokens 1 and 4 tie exactly (2 votes, same mean delta):
    # lower id first. Tokens 5 and 2 tie on votes: 5 has the larger mean delta (0.85 vs 0.65).
    assert sel.ids == [1, 4, 5, 2]
    swapped = vote_tokens(logp_t.flip(0).view(2, 1, V), logp_0.view(2, 1, V), valid, eligible, 3, 4)
    assert swapped.ids == sel.ids and swapped.votes == sel.votes


def test_weighted_ranking_prefers_tokens_the_teacher_emits():
    V = 4
    p_0 = torch.tensor([0.9 - 1e-8, 1e-8, 0.1, 0.0]) + 1e-12
    p_t = torch.tensor([0.5 - 1e-4, 1e-4, 0.5, 0.0]) + 1e-12
    logp_t, logp_0 = p_t.log().view(1, 1, V), p_0.log().view(1, 1, V)
    valid = torch.ones(1, 1, dtype=torch.bool)
    eligible = torch.ones(V, dtype=torch.bool)
    # delta: token 1 +9.2 (1e-8 -> 1e-4), token 2 +1.6 (0.1 -> 0.5); weighted: 9e-4 vs 0.8.
    assert vote_tokens(logp_t, logp_0, valid, eligible, 1, 1).ids == [1]
    assert vote_tokens(logp_t, logp_0, valid, eligible, 1, 1, rank_by="weighted").ids == [2]


def test_config_defaults_per_family_and_validation():
    assert SafetyTokenConfig().resolve("qwen") == (7, 1e-8)
    assert SafetyTokenConfig().resolve("llama") == (5, 1e-7)
    assert SafetyTokenConfig().resolve("gpt2") == (5, 1e-8)
    assert SafetyTokenConfig(horizon=1, min_steered_prob=0.0).resolve("qwen") == (1, 0.0)
    with pytest.raises(SafesteerError):
        SafetyTokenConfig(method="median")
    with pytest.raises(SafesteerError):
        SafetyTokenConfig(rank_by="votes")
    with pytest.raises(SafesteerError):
        SafetyTokenConfig(horizon=0)


# ----------------------------------------------------------------------------- model passes


def steer_ctx(model, seed=1, scale=4.0, layer=1):
    torch.manual_seed(seed)
    r = torch.randn(model.config.hidden_size) * scale
    return r, (lambda: add_direction(model, r, layer))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rollout_matches_teacher_forced_reference(smol_tokenizer, arch):
    """Cached, shared-prompt rollout == a plain left-padded forward over prompt + sampled tokens."""
    tok = smol_tokenizer
    model = make_tiny_model(tok, arch=arch)
    _, ctx = steer_ctx(model)
    H, M = 4, 2
    formatted = format_prompts(tok, PROMPTS[:3])
    gen = torch.Generator().manual_seed(0)
    out = rollout_batch(model, tok, ctx, formatted, H, M, end_of_turn_ids(tok, model), gen)
    R = len(formatted) * M
    assert out["tokens"].shape == (R, H - 1)
    assert out["teacher_logits"].shape == (R, H, len(tok))

    enc = tok([f for f in formatted for _ in range(M)], return_tensors="pt", padding=True, add_special_tokens=False)
    ids = torch.cat([enc["input_ids"], out["tokens"]], 1)
    mask = torch.cat([enc["attention_mask"], torch.ones(R, H - 1, dtype=torch.long)], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    P = enc["input_ids"].shape[1]
    with torch.no_grad():
        with ctx():
            ref_t = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, P - 1:].float()
        ref_0 = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, P - 1:].float()
        head = output_head(model)
        got_t_from_hidden = head(out["teacher_hidden"]).float()
        got_0 = head(out["base_hidden"]).float()
    torch.testing.assert_close(out["teacher_logits"].log_softmax(-1), ref_t.log_softmax(-1), atol=2e-4, rtol=0)
    torch.testing.assert_close(got_t_from_hidden.log_softmax(-1), ref_t.log_softmax(-1), atol=2e-4, rtol=0)
    torch.testing.assert_close(got_0.log_softmax(-1), ref_0.log_softmax(-1), atol=2e-4, rtol=0)
    assert torch.equal(out["base_argmax"], ref_0.argmax(-1))
    assert (ref_t - ref_0).abs().max() > 1e-2  # the steering is really on for the teacher only


def eos_loving_model(tok, arch="llama"):
    """A tiny model whose output head puts nearly all mass on end-of-turn tokens at every position."""
    model = make_tiny_model(tok, arch=arch)
    old = model.get_output_embeddings()
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[end_of_turn_ids(tok, model)] = 30.0
    model.set_output_embeddings(head)
    model.config.tie_word_embeddings = False
    return model


def test_exactly_h_minus_1_tokens_even_when_the_model_wants_to_stop(smol_tokenizer):
    tok = smol_tokenizer
    model = eos_loving_model(tok)
    eot = end_of_turn_ids(tok, model)
    _, ctx = steer_ctx(model, scale=0.5)
    formatted = format_prompts(tok, PROMPTS)
    with torch.no_grad():
        enc = tok(formatted, return_tensors="pt", padding=True, add_special_tokens=False)
        first = model(**enc).logits[:, -1]
    assert set(first.argmax(-1).tolist()) <= set(eot)  # the model would stop at once
    for H in (1, 6):
        out = rollout_batch(model, tok, ctx, formatted, H, 3, eot, torch.Generator().manual_seed(0))
        assert out["tokens"].shape == (len(PROMPTS) * 3, H - 1)
        assert not torch.isin(out["tokens"], torch.tensor(eot)).any()
        assert out["teacher_logits"].shape[1] == H
    # ...and the base model's end-of-turn argmax masks every position, which the stage reports clearly.
    with pytest.raises(SafesteerError, match="no valid response position.*--horizon.*--tokens.horizon"):
        select_safety_tokens(model, tok, ctx, PROMPTS, SafetyTokenConfig(samples_per_prompt=2), progress=False)


@pytest.mark.parametrize("per_row", [False, True])
def test_samples_follow_the_teacher_distribution(smol_tokenizer, per_row):
    """Temperature 1, top_p 1: the first token's frequencies match the teacher's probabilities,
    with one generator for the batch or one per row (the stage's way)."""
    tok = smol_tokenizer
    model = make_tiny_model(tok)
    old = model.get_output_embeddings()
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    a, b = 1000, 2000
    with torch.no_grad():
        head.weight.zero_()  # logits = bias whatever the hidden state: p(a) = 0.7, p(b) = 0.3 (others ~1e-6 in all)
        head.bias.zero_()
        head.bias[a], head.bias[b] = 25.0, 25.0 + math.log(3 / 7)
    model.set_output_embeddings(head)
    model.config.tie_word_embeddings = False
    _, ctx = steer_ctx(model)
    gens = ([torch.Generator().manual_seed(s) for s in range(1000)] if per_row
            else torch.Generator().manual_seed(0))
    out = rollout_batch(model, tok, ctx, format_prompts(tok, ["Hi"]), 2, 1000, end_of_turn_ids(tok, model), gens)
    first = out["tokens"][:, 0]
    assert set(first.tolist()) <= {a, b}
    assert abs((first == a).float().mean().item() - 0.7) < 0.05


def test_select_on_tiny_model_respects_exclusions_and_floor(smol_tokenizer):
    tok = smol_tokenizer
    model = make_tiny_model(tok)
    _, ctx = steer_ctx(model)
    config = SafetyTokenConfig(horizon=3, samples_per_prompt=3, top_k_per_position=30, n_tokens=12, batch_size=6)
    res = select_safety_tokens(model, tok, ctx, PROMPTS, config, progress=False)
    assert (res.horizon, res.min_steered_prob, res.family) == (3, 1e-7, "llama")
    assert 0 < len(res.ids) <= 12 and len(set(res.ids)) == len(res.ids)
    assert res.votes == sorted(res.votes, reverse=True)
    assert not set(res.ids) & set(tok.all_special_ids)
    assert all("<|" not in t for t in res.texts)
    assert all(p >= 1e-7 for p in res.mean_steered_prob)
    assert res.n_positions == len(PROMPTS) * 3 * 3 and 0 < res.n_valid_positions <= res.n_positions
    assert res.texts == [tok.decode([i]) for i in res.ids]
    # Same seed, same S.
    again = select_safety_tokens(model, tok, ctx, PROMPTS, config, progress=False)
    assert again.ids == res.ids and again.votes == res.votes


def test_a_row_gets_the_same_samples_in_any_batch(smol_tokenizer):
    """Per-row generators: a prompt's samples depend on its own seeds only, not on its batch-mates."""
    tok = smol_tokenizer
    model = make_tiny_model(tok)
    _, ctx = steer_ctx(model)
    H, M = 5, 3
    eot = end_of_turn_ids(tok, model)
    formatted = format_prompts(tok, PROMPTS[:3])

    def tokens(indices):
        gens = [torch.Generator().manual_seed(s) for s in rollout_seeds(7, indices, M)]
        torch.manual_seed(len(indices))  # the global generator must play no part
        out = rollout_batch(model, tok, ctx, [formatted[i] for i in indices], H, M, eot, gens)
        return out["tokens"].view(len(indices), M, H - 1)

    together = tokens([0, 1, 2])
    assert torch.equal(together[2], tokens([2])[0])  # alone, with less padding
    assert torch.equal(together[0], tokens([1, 0])[1])  # another place in the batch
    assert not torch.equal(together[0, 0], together[0, 1])  # the M rows of a prompt are different samples
    with pytest.raises(SafesteerError, match="generators"):
        rollout_batch(model, tok, ctx, formatted, H, M, eot, [torch.Generator()] * M)


def test_selection_does_not_depend_on_the_batching(smol_tokenizer):
    """One prompt per forward or all prompts in one: the same samples, hence the same S and statistics."""
    tok = smol_tokenizer
    model = make_tiny_model(tok)
    _, ctx = steer_ctx(model)
    base = dict(horizon=4, samples_per_prompt=3, top_k_per_position=30, n_tokens=12)
    one_each = select_safety_tokens(model, tok, ctx, PROMPTS, SafetyTokenConfig(**base, batch_size=3), progress=False)
    all_in_one = select_safety_tokens(model, tok, ctx, PROMPTS, SafetyTokenConfig(**base, batch_size=12),
                                      progress=False)
    assert one_each.examples == all_in_one.examples  # first sample of each prompt, in prompt order
    assert [e["prompt"] for e in one_each.examples] == PROMPTS
    assert one_each.ids == all_in_one.ids and one_each.votes == all_in_one.votes
    assert one_each.n_valid_positions == all_in_one.n_valid_positions
    assert one_each.mean_steered_prob == pytest.approx(all_in_one.mean_steered_prob, rel=1e-4)
    assert one_each.mean_base_prob == pytest.approx(all_in_one.mean_base_prob, rel=1e-4)
    other_seed = select_safety_tokens(model, tok, ctx, PROMPTS, SafetyTokenConfig(**base, batch_size=3, seed=0),
                                      progress=False)
    assert other_seed.examples != one_each.examples


# ----------------------------------------------------------------------------- stage, artifacts, CLI


def write_direction(path, hidden, layer=1, coeff=1.0, seed=1):
    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    save_file({"direction": torch.randn(hidden) * 4}, str(path / "direction.safetensors"))
    (path / "direction.json").write_text(json.dumps({"layer": layer, "coeff": coeff, "position": -1}))
    return path


SMALL = dict(horizon=3, samples_per_prompt=2, top_k_per_position=20, n_tokens=10)


def test_run_token_stage_writes_reuses_and_recomputes(tmp_path, smol_tokenizer, monkeypatch):
    tok = smol_tokenizer
    model = make_tiny_model(tok)
    identity = {"name": "tiny", "kind": "local", "path": "/somewhere"}
    direction = write_direction(tmp_path / "dir", model.config.hidden_size)
    out = tmp_path / "run"
    config = SafetyTokenConfig(**SMALL)
    res = run_token_stage(model, tok, identity, direction, out, PROMPTS, config, progress=False)
    data = json.loads((out / "safety_tokens.json").read_text())
    assert [r["id"] for r in data["tokens"]] == res.ids
    assert {"id", "text", "votes", "mean_p0", "mean_pt"} <= set(data["tokens"][0])
    assert data["config"]["horizon"] == 3 and data["resolved"]["min_steered_prob"] == 1e-7
    assert data["prompts"]["n"] == len(PROMPTS) and len(data["prompts"]["uids"]) == len(PROMPTS)
    assert data["direction"]["layer"] == 1 and len(data["direction"]["sha256"]) == 64
    assert data["timing"]["total_s"] >= 0 and data["model"]["name"] == "tiny"
    png = (out / "safety_tokens.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_safety_tokens(out) == res.ids

    # Same model (cache path moved), direction, prompts and config: reused without computing.
    def boom(*a, **k):
        raise AssertionError("recomputed although the artifact matches")

    monkeypatch.setattr(st, "select_safety_tokens", boom)
    again = run_token_stage(model, tok, {**identity, "path": "/elsewhere"}, direction, out, PROMPTS, config,
                            progress=False)
    assert again.ids == res.ids and again.votes == res.votes and again.horizon == 3
    # Anything that changes the result triggers a recompute.
    for changed in [dict(identity=identity | {"name": "other"}), dict(prompts=PROMPTS[:3]),
                    dict(config=SafetyTokenConfig(**(SMALL | {"n_tokens": 5})))]:
        args = dict(identity=identity, prompts=PROMPTS, config=config) | changed
        with pytest.raises(AssertionError, match="recomputed"):
            run_token_stage(model, tok, args["identity"], direction, out, args["prompts"], args["config"], progress=False)
    write_direction(direction, model.config.hidden_size, seed=2)
    with pytest.raises(AssertionError, match="recomputed"):
        run_token_stage(model, tok, identity, direction, out, PROMPTS, config, progress=False)


def test_load_safety_tokens_errors(tmp_path):
    with pytest.raises(SafesteerError, match="safesteer tokens"):
        load_safety_tokens(tmp_path)
    (tmp_path / "safety_tokens.json").write_text("{not json")
    with pytest.raises(SafesteerError, match="unreadable"):
        load_safety_tokens(tmp_path)


def test_filter_keeps_non_refused_prompts_in_order(monkeypatch):
    monkeypatch.setattr(st, "_refusal_scores", lambda m, t, texts: torch.tensor([0.5, -1.0, -0.2, 3.0, -4.0]))
    prompts = ["a", "b", "c", "d", "e"]
    assert filter_harmless(None, None, prompts, limit=2) == ["b", "c"]
    assert filter_harmless(None, None, prompts, limit=10) == ["b", "c", "e"]
    monkeypatch.setattr(st, "_refusal_scores", lambda m, t, texts: torch.ones(len(texts)))
    with pytest.raises(SafesteerError, match="harmless filter") as err:
        filter_harmless(None, None, prompts, limit=2)
    assert "--split-seed" in str(err.value) and "--no-filter" not in str(err.value)  # align has no --no-filter
    with pytest.raises(SafesteerError, match="--no-filter"):
        filter_harmless(None, None, prompts, limit=2, command="tokens")


def test_cli_tokens_on_a_tiny_local_model(tmp_path, tiny_model_dir, capsys):
    out = write_direction(tmp_path / "run", 32)
    # The paper preset: the cpu preset's probability floor (1e-3) admits no token of a tiny random model.
    argv = ["tokens", "--model", str(tiny_model_dir), "--out", str(out), "--preset", "paper", "--horizon", "3",
            "--samples-per-prompt", "2", "--n-prompts", "4", "--top-k-per-position", "20", "--n-tokens", "8",
            "--batch-size", "8"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    ids = load_safety_tokens(out)
    data = json.loads((out / "safety_tokens.json").read_text())
    assert 0 < len(ids) <= 8 and data["prompts"]["n"] == 4
    assert data["config"]["top_k_per_position"] == 20 and data["config"]["min_steered_prob"] is None  # paper's floor
    assert repr(data["tokens"][0]["text"]) in printed and "harmless filter" in printed
    assert (out / "safety_tokens.png").is_file()
    # A missing direction is a one-line error naming the fix.
    assert cli.main(["tokens", "--model", str(tiny_model_dir), "--out", str(tmp_path / "empty")]) == 2
    assert "safesteer direction" in capsys.readouterr().err


@pytest.mark.slow
def test_full_stage_on_smollm2(tmp_path):
    from safesteer.io.models import load_model
    from safesteer.io.prompts import builtin_splits

    loaded = load_model("smollm2-135m-instruct", device="cpu")
    model, tok = loaded
    direction = write_direction(tmp_path / "run", model.config.hidden_size, layer=10)
    prompts = filter_harmless(model, tok, builtin_splits(0)["harmless"]["direction_val"], 8)
    config = SafetyTokenConfig(n_prompts=8)
    res = run_token_stage(model, tok, loaded.identity, direction, tmp_path / "run", prompts, config, progress=False)
    assert (res.horizon, res.min_steered_prob) == (5, 1e-7)
    assert len(res.ids) == 50 and res.votes == sorted(res.votes, reverse=True)
    assert all(p >= 1e-7 for p in res.mean_steered_prob)
    assert not set(res.ids) & set(tok.all_special_ids) and all("<|" not in t for t in res.texts)
    assert (tmp_path / "run" / "safety_tokens.png").is_file()
    assert load_safety_tokens(tmp_path / "run") == res.ids
