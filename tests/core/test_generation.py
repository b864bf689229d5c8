import json

import pytest
import torch

from safesteer.core.anatomy import end_of_turn_ids
from safesteer.errors import SafesteerError
from safesteer.core.generation import GenerationConfig, completion_mask, generate_responses
from safesteer.io.prompts import Prompt


def test_completion_mask_with_pad_equal_to_eos():
    eos = 2  # pad == eos: the first eos counts, the padding after it does not
    seqs = torch.tensor([
        [9, 9, 5, 6, eos, eos, eos],  # ends early, then padded with eos
        [9, 9, 5, 6, 7, 8, 4],        # runs to the limit, no eos
        [9, 9, eos, eos, eos, eos, eos],  # empty answer: just the end-of-turn token
    ])
    mask = completion_mask(seqs, prompt_len=2, eot_ids=[eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_completion_mask_with_several_end_tokens():
    seqs = torch.tensor([[1, 5, 7, 3, 3], [1, 5, 3, 7, 0]])
    assert completion_mask(seqs, 1, [3, 7]).tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]


def test_generation_is_batch_invariant_and_resumable(tmp_path, tiny_model, smol_tokenizer):
    prompts = [Prompt(t) for t in ["Say hi.", "Write a long poem about the sea and the sky.", "Count to three.",
                                   "Name a colour."]]
    config = GenerationConfig(max_new_tokens=6, batch_size=4)
    out = tmp_path / "r.jsonl"
    rows, stats = generate_responses(tiny_model, smol_tokenizer, prompts, config, out_path=out, progress=False)
    assert [r["prompt"] for r in rows] == [p.text for p in prompts]
    assert stats.generated == 4 and stats.new_tokens == sum(r["n_tokens"] for r in rows)
    # Left padding: the batched answers equal one-at-a-time answers.
    single, _ = generate_responses(tiny_model, smol_tokenizer, prompts, GenerationConfig(max_new_tokens=6, batch_size=1),
                                   progress=False)
    assert [r["response"] for r in rows] == [r["response"] for r in single]
    # Resume: a rerun with the same settings generates nothing new.
    before = out.read_text()
    again, stats = generate_responses(tiny_model, smol_tokenizer, prompts, config, out_path=out, progress=False)
    assert stats.generated == 0 and stats.new_tokens == 0
    assert out.read_text() == before and [r["response"] for r in again] == [r["response"] for r in rows]
    # A crash mid-file (torn last line) loses only that line.
    lines = before.splitlines()
    out.write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])
    _, stats = generate_responses(tiny_model, smol_tokenizer, prompts, config, out_path=out, progress=False)
    assert stats.generated == 2
    rows_on_disk = [json.loads(l) for l in out.read_text().splitlines() if l.strip().startswith("{") and l.strip().endswith("}")]
    assert {r["prompt"] for r in rows_on_disk} == {p.text for p in prompts}


def test_eot_token_ends_generation_and_is_not_in_response(tiny_model, smol_tokenizer):
    eot = end_of_turn_ids(smol_tokenizer, tiny_model)[0]
    with torch.no_grad():  # make the end-of-turn token the model's favourite
        tiny_model.lm_head.bias = torch.nn.Parameter(torch.zeros(tiny_model.lm_head.out_features))
        tiny_model.lm_head.bias[eot] = 1e4
    rows, _ = generate_responses(tiny_model, smol_tokenizer, [Prompt("Hello")], GenerationConfig(max_new_tokens=5),
                                 progress=False)
    assert rows[0]["n_tokens"] == 1 and rows[0]["finished"]
    assert rows[0]["response"] == ""


def test_sampling_settings_are_validated():
    with pytest.raises(SafesteerError, match="needs sampling"):
        GenerationConfig(num_samples=4)
    with pytest.raises(SafesteerError, match="temperature"):
        GenerationConfig(do_sample=True, temperature=0)


def test_generation_precision_casts_in_place_and_restores_exactly(tiny_model):
    from safesteer.core.generation import generation_precision

    tiny_model.config.tie_word_embeddings = True
    tiny_model.tie_weights()
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    params = {n: p for n, p in tiny_model.named_parameters()}
    with generation_precision(tiny_model, torch.bfloat16) as cast:
        assert cast and all(p.dtype == torch.bfloat16 for p in tiny_model.parameters())
        assert tiny_model.get_input_embeddings().weight is tiny_model.get_output_embeddings().weight
        assert all(b.dtype == torch.float32 for b in tiny_model.buffers() if b.is_floating_point())  # rotary kept
        assert {n: p for n, p in tiny_model.named_parameters()} == params  # same objects: hooks stay bound
    for n, p in tiny_model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[n]), n  # bit-exact, not a bf16 round trip
    with generation_precision(tiny_model, torch.float32) as cast:
        assert not cast  # nothing to do
    with pytest.raises(RuntimeError), generation_precision(tiny_model, torch.bfloat16):
        raise RuntimeError("restored after an error too")
    assert all(p.dtype == torch.float32 for p in tiny_model.parameters())


def test_generation_dtype_is_resolved_recorded_and_part_of_the_key(tiny_model, smol_tokenizer, monkeypatch):
    import safesteer.core.generation as g

    monkeypatch.setattr(g, "_cpu_has_bf16", lambda: True)
    assert g.resolve_generation_dtype("auto", tiny_model) == torch.bfloat16
    assert g.resolve_generation_dtype(None, tiny_model) is None
    with g.generation_precision(tiny_model, torch.float16):  # a half-precision model keeps its dtype under auto
        assert g.resolve_generation_dtype("auto", tiny_model) is None
        assert g.effective_dtype_name("auto", tiny_model) == "float16"
    monkeypatch.setattr(g, "_cpu_has_bf16", lambda: False)
    assert g.resolve_generation_dtype("auto", tiny_model) is None
    assert g.effective_dtype_name("auto", tiny_model) == "float32"
    with pytest.raises(SafesteerError, match="generation dtype"):
        GenerationConfig(dtype="int8")
    config = GenerationConfig(max_new_tokens=3, dtype="bfloat16")
    rows, _ = generate_responses(tiny_model, smol_tokenizer, [Prompt("Say hi.")], config, progress=False)
    assert rows[0]["settings"]["dtype"] == "bfloat16"
    assert GenerationConfig(dtype="bfloat16").key() != GenerationConfig(dtype="float32").key()
    assert all(p.dtype == torch.float32 for p in tiny_model.parameters())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_continuous_batching_gives_the_answers_of_fixed_batches(tmp_path, smol_tokenizer, arch):
    """Finished rows leave, waiting prompts join mid-way (batch 3, seven prompts of different lengths,
    answers of different lengths): every answer equals transformers' generate on fixed batches, and one
    at a time. GPT-2 has absolute positions, so a row's positions must not depend on its padding."""
    from conftest import make_tiny_model
    from safesteer.core import generation as g

    model = make_tiny_model(smol_tokenizer, arch=arch)
    eot = end_of_turn_ids(smol_tokenizer, model)[0]
    with torch.no_grad():  # the end of turn is likely but not certain: answers end at different steps
        head = model.get_output_embeddings()
        head.bias = torch.nn.Parameter(torch.zeros(head.out_features))
        head.bias[eot] = 0.5  # (tried: 0.3 never ends, 0.7 always ends at once)
    prompts = [Prompt(t) for t in ["Say hi.", "Write a long poem about the sea and the sky.", "Count to three.",
                                   "Name a colour.", "What is two plus two, and why?", "Hello", "Explain rain."]]
    seen = {}
    real = g.greedy_continuous

    def recording(*a, **k):
        seen["called"] = True
        return real(*a, **k)

    g.greedy_continuous = recording
    try:
        cont, _ = generate_responses(model, smol_tokenizer, prompts, GenerationConfig(max_new_tokens=7, batch_size=3),
                                     out_path=tmp_path / "c.jsonl", progress=False)
    finally:
        g.greedy_continuous = real
    assert seen
    fixed, _ = generate_responses(model, smol_tokenizer, prompts,
                                  GenerationConfig(max_new_tokens=7, batch_size=3, engine="generate"), progress=False)
    single, _ = generate_responses(model, smol_tokenizer, prompts,
                                   GenerationConfig(max_new_tokens=7, batch_size=1, engine="generate"), progress=False)
    keys = ("response", "n_tokens", "finished")
    assert [[r[k] for k in keys] for r in cont] == [[r[k] for k in keys] for r in fixed]
    assert [[r[k] for k in keys] for r in cont] == [[r[k] for k in keys] for r in single]
    lengths = {r["n_tokens"] for r in cont}
    assert len(lengths) > 1 and any(r["finished"] for r in cont)  # rows leave at different steps
    on_disk = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert sorted(r["prompt_uid"] for r in on_disk) == sorted(p.uid for p in prompts)  # every row written once


def test_continuous_batching_runs_the_shared_prefix_once(tiny_model, smol_tokenizer):
    """The chat template's system turn, common to every prompt, goes through the model once; every later
    forward covers only the prompts' own tokens or decoding steps, and the answers stay those of generate."""
    from safesteer.core import generation as g
    from safesteer.core.forward import shared_prefix_length

    prompts = [Prompt(t) for t in ["Say hi.", "Write a long poem about the sea and the sky.", "Count to three.",
                                   "Name a colour.", "What is two plus two, and why?"]]
    ids = [smol_tokenizer(f, add_special_tokens=False)["input_ids"]
           for f in g.format_prompts(smol_tokenizer, [p.text for p in prompts])]
    n_prefix = shared_prefix_length(ids, keep=1)
    assert n_prefix >= 8
    widths = []
    handle = tiny_model.register_forward_pre_hook(lambda _m, _a, kw: widths.append(kw["input_ids"].shape[1]),
                                                  with_kwargs=True)
    try:
        cont, _ = generate_responses(tiny_model, smol_tokenizer, prompts, GenerationConfig(max_new_tokens=5, batch_size=2),
                                     progress=False)
    finally:
        handle.remove()
    assert widths[0] == n_prefix and widths.count(n_prefix) == 1
    assert max(widths[1:]) == max(len(i) for i in ids) - n_prefix
    single, _ = generate_responses(tiny_model, smol_tokenizer, prompts,
                                   GenerationConfig(max_new_tokens=5, batch_size=1, engine="generate"), progress=False)
    assert [r["response"] for r in cont] == [r["response"] for r in single]


def test_continuous_batching_under_a_steering_hook(tiny_model, smol_tokenizer):
    """Hooks that read the 2-D attention mask (steering skips padding) see the merged batch's mask."""
    from conftest import Spec

    spec = Spec.random(layer=1, seed=3)
    prompts = [Prompt(t) for t in ["Say hi.", "Write a long poem about the sea and the sky.", "Count to three.",
                                   "Name a colour.", "Hello"]]
    ctx = lambda: spec.teacher(tiny_model)  # noqa: E731
    cont, _ = generate_responses(tiny_model, smol_tokenizer, prompts, GenerationConfig(max_new_tokens=6, batch_size=2),
                                 context=ctx, progress=False)
    single, _ = generate_responses(tiny_model, smol_tokenizer, prompts,
                                   GenerationConfig(max_new_tokens=6, batch_size=1, engine="generate"), context=ctx,
                                   progress=False)
    plain, _ = generate_responses(tiny_model, smol_tokenizer, prompts, GenerationConfig(max_new_tokens=6, batch_size=2),
                                  progress=False)
    assert [r["response"] for r in cont] == [r["response"] for r in single]
    assert [r["response"] for r in cont] != [r["response"] for r in plain]  # the hook was on


def test_an_answers_file_of_another_model_or_other_settings_is_refused_never_reused(tmp_path, tiny_model,
                                                                                     smol_tokenizer):
    """Issue #12 item 2: `generate`'s file is keyed on the weights' fingerprint and the settings; a rerun with
    another model or other settings stops with one line instead of reusing (or adding to) the file."""
    prompts = [Prompt("Say hi."), Prompt("Name a colour.")]
    config = GenerationConfig(max_new_tokens=4, batch_size=2)
    out = tmp_path / "r.jsonl"
    rows, _ = generate_responses(tiny_model, smol_tokenizer, prompts, config, out_path=out, progress=False,
                                 extra={"model": "tiny-a"}, fingerprint="aaaa1111")
    assert rows[0]["settings"]["model_fingerprint"] == "aaaa1111"
    before = out.read_bytes()
    _, stats = generate_responses(tiny_model, smol_tokenizer, prompts, config, out_path=out, progress=False,
                                  extra={"model": "tiny-a"}, fingerprint="aaaa1111")
    assert stats.generated == 0  # the same model and settings: resumed, nothing generated again
    fix = f"rerun with the earlier model and settings to resume it, or choose a new --out (or delete {out} to start over)"
    with pytest.raises(SafesteerError) as info:
        generate_responses(tiny_model, smol_tokenizer, prompts, config, out_path=out, progress=False,
                           extra={"model": "tiny-b"}, fingerprint="bbbb2222")
    assert str(info.value) == (f"{out} holds answers made with another model or other settings (model tiny-a "
                               f"(weights aaaa1111) -> tiny-b (weights bbbb2222)); {fix}")
    with pytest.raises(SafesteerError) as info:
        generate_responses(tiny_model, smol_tokenizer, prompts, GenerationConfig(max_new_tokens=5, batch_size=2),
                           out_path=out, progress=False, extra={"model": "tiny-a"}, fingerprint="aaaa1111")
    assert str(info.value) == (f"{out} holds answers made with another model or other settings (max_new_tokens "
                               f"4 -> 5); {fix}")
    assert out.read_bytes() == before  # nothing added to a file that is not this run's
    # A file of an older version (rows without the fingerprint) cannot vouch for the model: refused too.
    old = tmp_path / "old.jsonl"
    old.write_text("".join(json.dumps({**r, "settings": {k: v for k, v in r["settings"].items()
                                                         if k != "model_fingerprint"}, "settings_key": "0123"}) + "\n"
                           for r in rows))
    with pytest.raises(SafesteerError, match=r"\(model tiny-a \(weights not recorded\) -> tiny-a \(weights aaaa1111\)\)"):
        generate_responses(tiny_model, smol_tokenizer, prompts, config, out_path=old, progress=False,
                           extra={"model": "tiny-a"}, fingerprint="aaaa1111")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    with pytest.raises(SafesteerError) as info:
        generate_responses(tiny_model, smol_tokenizer, prompts, config, out_path=notes, progress=False,
                           fingerprint="aaaa1111")
    assert str(info.value) == (f"--out {notes} is not a safesteer answers file (line 1 is no answer row); choose a "
                               f"new --out (or delete {notes} to start over)")
    assert notes.read_text() == "my notes\n"


def test_evaluation_files_keep_the_answers_of_several_settings_side_by_side(tmp_path, tiny_model, smol_tokenizer):
    """Without a fingerprint (evaluation folders, guarded by their model.json) other settings' rows stay and are
    ignored, and the key is the settings' alone, as the shared base-answer cache files them."""
    prompts = [Prompt("Say hi.")]
    out = tmp_path / "r.jsonl"
    generate_responses(tiny_model, smol_tokenizer, prompts, GenerationConfig(max_new_tokens=3), out_path=out,
                       progress=False)
    rows, stats = generate_responses(tiny_model, smol_tokenizer, prompts, GenerationConfig(max_new_tokens=4),
                                     out_path=out, progress=False)
    assert stats.generated == 1 and len(out.read_text().splitlines()) == 2
    assert rows[0]["settings_key"] == GenerationConfig(max_new_tokens=4).resolved(tiny_model).key()
    assert GenerationConfig().key("aaaa") != GenerationConfig().key("bbbb") != GenerationConfig().key()
