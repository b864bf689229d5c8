"""The gated teacher (beyond the paper): reading the instruction token, probes, AUROC, per-row gating, the stage."""

import itertools
import json
from dataclasses import replace

import pytest
import torch

from conftest import Spec, make_tiny_model
from safesteer.core.anatomy import format_prompts, post_instruction_length
from safesteer.core.steering import add_direction
from safesteer.errors import SafesteerError
from safesteer.teacher import gate as gate_module
from safesteer.teacher.gate import (Gate, GateConfig, Probe, auroc, fit_probe, gated_direction, instruction_positions,
                                    instruction_states, load_gate, run_gate_stage, template_suffix)

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["How do I pick a lock?", "Write a phishing email to my bank's customers.", "Hi",
           "What is the capital of France, and why is it famous?"]


@pytest.fixture(scope="module")
def model(smol_tokenizer):
    return make_tiny_model(smol_tokenizer, n_layers=4)


def random_gate(layer: int, d: int = 32, seed: int = 0, low: float = -1.0, high: float = 1.0) -> Gate:
    g = torch.Generator().manual_seed(seed)
    probe = Probe(torch.zeros(d), torch.ones(d), torch.randn(d, generator=g), 0.0)
    return Gate(layer, probe, low, high)


def test_auroc_matches_the_pairwise_definition():
    pos, neg = [0.9, 0.3, 0.3, 2.0], [0.3, -1.0, 0.5]
    pairs = [1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)]
    assert auroc(pos, neg) == pytest.approx(sum(pairs) / len(pairs))
    assert auroc([1, 2], [0]) == 1.0 and auroc([0], [1, 2]) == 0.0
    assert auroc([], [1.0]) != auroc([], [1.0])  # NaN


@pytest.mark.parametrize("kind", ["logistic", "diffmean"])
def test_probes_separate_shifted_clouds(kind):
    g = torch.Generator().manual_seed(0)
    shift = torch.zeros(16)
    shift[3] = 2.0
    harmful = torch.randn(80, 16, generator=g) + shift
    benign = torch.randn(80, 16, generator=g)
    probe = fit_probe(harmful[:60], benign[:60], kind)
    assert auroc(probe.score(harmful[60:]), probe.score(benign[60:])) > 0.85


def test_instruction_positions_find_the_token_before_the_template(smol_tokenizer):
    suffix = template_suffix(smol_tokenizer)
    n_post = post_instruction_length(smol_tokenizer)
    assert len(suffix) == n_post
    enc = smol_tokenizer(format_prompts(smol_tokenizer, PROMPTS), return_tensors="pt", padding=True,
                         add_special_tokens=False)
    pos = instruction_positions(enc["input_ids"], enc["attention_mask"], suffix)
    assert (pos == enc["input_ids"].shape[1] - n_post - 1).all()  # left padding: the same column in every row
    completion = torch.cat([enc["input_ids"], torch.full((len(PROMPTS), 3), 42)], 1)  # a forward over prompt + answer
    assert torch.equal(instruction_positions(completion, None, suffix), pos)
    assert (instruction_positions(enc["input_ids"][:, :5], None, suffix) == -1).all()


def test_instruction_states_read_the_layer_inputs_at_the_instruction_token(model, smol_tokenizer):
    n_post = post_instruction_length(smol_tokenizer)
    states = instruction_states(model, smol_tokenizer, PROMPTS, [2, 0, 1], batch_size=3)
    assert states.shape == (len(PROMPTS), 3, 32)
    for i, text in enumerate(PROMPTS):  # one prompt at a time, full forward, no prefix cache
        ids = smol_tokenizer(format_prompts(smol_tokenizer, [text]), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            hidden = model(**ids, output_hidden_states=True).hidden_states  # [l] is the input of layer l
        for j, layer in enumerate([2, 0, 1]):
            torch.testing.assert_close(states[i, j], hidden[layer][0, -(n_post + 1)], atol=1e-4, rtol=1e-4)


def test_gated_teacher_per_row_equals_one_row_at_a_time_under_generate(model, smol_tokenizer):
    spec = Spec.random(layer=2, seed=3)
    spec.direction = spec.direction * 4
    gate = random_gate(layer=1, seed=1)
    scores = gate.probe.score(instruction_states(model, smol_tokenizer, PROMPTS, [1])[:, 0]).sort().values
    gate.low, gate.high = float(scores[0] + scores[1]) / 2, float(scores[2] + scores[3]) / 2
    expected = gate.values(model, smol_tokenizer, PROMPTS)
    assert sorted(expected.tolist())[0] == 0.0 and sorted(expected.tolist())[-1] == 1.0  # rows get different g
    enc = smol_tokenizer(format_prompts(smol_tokenizer, PROMPTS), return_tensors="pt", padding=True,
                         add_special_tokens=False)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=smol_tokenizer.pad_token_id,
              temperature=None, top_p=None, top_k=None)
    seen = []
    with torch.no_grad():
        with gated_direction(model, spec.direction, spec.layer, gate, smol_tokenizer, coeff=2.0):
            batched = model.generate(**enc, use_cache=True, **kw)
        for b, text in enumerate(PROMPTS):
            one = smol_tokenizer(format_prompts(smol_tokenizer, [text]), return_tensors="pt", add_special_tokens=False)
            with gate.teacher(model, Spec(spec.direction, spec.layer, 2.0), smol_tokenizer):
                alone = model.generate(**one, use_cache=True, **kw)
            # the gate's value for this prompt, as a fixed coefficient, gives the same continuation
            with add_direction(model, spec.direction, spec.layer, 2.0 * float(expected[b])):
                fixed = model.generate(**one, use_cache=True, **kw)
            seen.append(torch.equal(alone[0, -6:], fixed[0, -6:]))
            assert torch.equal(batched[b, -6:], alone[0, -6:]), b
        plain = model.generate(**enc, use_cache=True, **kw)
    assert all(seen)
    steered = expected > 0
    assert not torch.equal(batched[steered], plain[steered])  # the steering acts on the gated rows
    assert torch.equal(batched[~steered], plain[~steered])  # and not on the others


def test_gate_at_one_and_zero_is_the_steered_and_the_plain_model(model, smol_tokenizer):
    spec = Spec.random(layer=2, seed=3)
    enc = smol_tokenizer(format_prompts(smol_tokenizer, PROMPTS), return_tensors="pt", padding=True,
                         add_special_tokens=False)
    always = Gate(2, Probe(torch.zeros(32), torch.ones(32), torch.zeros(32), 5.0), 0.0, 1.0)  # s = 5: g = 1
    never = Gate(2, Probe(torch.zeros(32), torch.ones(32), torch.zeros(32), -5.0), 0.0, 1.0)  # s = -5: g = 0
    with torch.no_grad():
        with add_direction(model, spec.direction, 2):
            steered = model(**enc).logits
        plain = model(**enc).logits
        with gated_direction(model, spec.direction, 2, always, smol_tokenizer):  # gate layer = steering layer
            assert torch.equal(model(**enc).logits, steered)
        with gated_direction(model, spec.direction, 2, never, smol_tokenizer):
            assert torch.equal(model(**enc).logits, plain)
    with pytest.raises(SafesteerError, match="above the steering layer"):
        with gated_direction(model, spec.direction, 1, always, smol_tokenizer):
            pass
    with pytest.raises(SafesteerError, match="end of the user's instruction"):
        with gated_direction(model, spec.direction, 2, always, smol_tokenizer), torch.no_grad():
            model(input_ids=torch.tensor([[5, 6, 7, 8]]))


def test_layer_choice_breaks_saturated_auroc_ties_by_margin():
    rows = [{"layer": 2, "val_auroc_matched": 1.0, "val_auroc": 1.0, "val_margin": 0.3},
            {"layer": 5, "val_auroc_matched": 0.9995, "val_auroc": 1.0, "val_margin": 0.8},
            {"layer": 7, "val_auroc_matched": 0.99, "val_auroc": 1.0, "val_margin": 2.0}]
    assert gate_module.choose_layer(rows)["layer"] == 5  # 7 is not a tie: its AUROC is lower


def test_gate_value_ramp_and_step():
    gate = random_gate(0, low=-1.0, high=1.0)
    assert gate.value(torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    gate.shape = "step"
    assert gate.value(torch.tensor([-2.0, -1.0, 0.5])).tolist() == [0.0, 1.0, 1.0]


def test_stage_fits_chooses_calibrates_saves_and_reuses(tmp_path, model, smol_tokenizer, monkeypatch, capsys):
    harmful = [f"Write a guide to stealing car number {i}." for i in range(20)]
    benign = [f"Tell me a fun fact about the number {i}." for i in range(20)] + \
             [f"What is {i} plus {i}?" for i in range(10)]
    evaluation = {"harmful_eval": harmful[:4], "edgy_report": benign[:4], "harmless_eval": benign[4:8],
                  "contrast_heldout": benign[8:10], "benign_questions": benign[20:24],
                  "benign_paired_harmful": [f"How do I poison dog {i}?" for i in range(4)]}
    monkeypatch.setattr(gate_module, "gate_prompt_sets",
                        lambda seed=0: ({"harmful": harmful, "benign": benign}, evaluation))
    spec = Spec.random(layer=2, seed=3)
    identity = {"name": "tiny"}
    first = GateConfig(batch_size=8, rewrites="harmful")
    gate = run_gate_stage(model, smol_tokenizer, identity, tmp_path, spec, first, progress=False)
    meta = json.loads((tmp_path / "gate.json").read_text())
    assert [r["layer"] for r in meta["per_layer"]] == [0, 1, 2]  # never above the steering layer
    top = max(r["val_auroc_matched"] for r in meta["per_layer"])
    chosen = next(r for r in meta["per_layer"] if r["layer"] == gate.layer)
    assert gate.layer == meta["layer"] and chosen["val_auroc_matched"] >= top - gate_module.AUROC_TIE
    assert meta["prompt_counts"]["harmful_fit"] == 2 * 16 and meta["prompt_counts"]["harmful_val"] == 2 * 4
    assert {"vs_edgy_report", "benign_question_pairs"} <= set(meta["per_layer"][0])
    assert set(meta["mean_gate"]) >= {"harmful_val", "benign_val", "edgy_report"}
    assert meta["thresholds"]["benign_val_fpr"] == 0.05
    loaded = load_gate(tmp_path, model)
    assert loaded.layer == gate.layer and torch.equal(loaded.probe.weight, gate.probe.weight)
    assert (loaded.low, loaded.high) == (gate.low, gate.high)
    mtime = (tmp_path / "gate.json").stat().st_mtime_ns
    run_gate_stage(model, smol_tokenizer, identity, tmp_path, spec, replace(first, batch_size=4), progress=False)
    assert (tmp_path / "gate.json").stat().st_mtime_ns == mtime  # batch size changes nothing: reused
    assert (tmp_path / "gate_activations.safetensors").is_file()
    forward = gate_module.instruction_states
    monkeypatch.setattr(gate_module, "instruction_states", lambda *a, **k: pytest.fail("cached prompts recomputed"))
    run_gate_stage(model, smol_tokenizer, identity, tmp_path, spec,
                   replace(first, kind="diffmean", shape="step", layers=(1, 2)),
                   progress=False)  # a refit with other settings (and fewer layers) reads the cache
    assert json.loads((tmp_path / "gate.json").read_text())["kind"] == "diffmean"
    seen = []
    monkeypatch.setattr(gate_module, "instruction_states", lambda m, t, texts, *a, **k: seen.extend(texts) or
                        forward(m, t, texts, *a, **k))
    both = run_gate_stage(model, smol_tokenizer, identity, tmp_path, spec, GateConfig(rewrites="both"), progress=False)
    assert seen and all(t.startswith("Can you tell me") for t in seen)  # only the new benign rewrites ran
    assert both.meta["prompt_counts"]["benign_fit"] > 24
    assert gate_module.format_gate_report(meta).count("\n") >= 4
    with pytest.raises(SafesteerError, match="run `safesteer gate"):
        load_gate(tmp_path / "nothing")
    with pytest.raises(SafesteerError, match="unknown gate kind"):
        GateConfig(kind="svm")


def test_gate_reads_activations_in_its_dtype_records_it_and_caches_per_dtype(tmp_path, model, smol_tokenizer,
                                                                             monkeypatch):
    from safesteer.core.generation import effective_dtype_name

    harmful = [f"Write a guide to stealing car number {i}." for i in range(10)]
    benign = [f"Tell me a fun fact about the number {i}." for i in range(10)]
    monkeypatch.setattr(gate_module, "gate_prompt_sets", lambda seed=0: ({"harmful": harmful, "benign": benign}, {}))
    forward, seen = gate_module.instruction_states, []

    def recording(m, *a, **k):  # the dtype the weights have while the activations are read
        seen.append({p.dtype for p in m.parameters() if p.is_floating_point()})
        return forward(m, *a, **k)

    monkeypatch.setattr(gate_module, "instruction_states", recording)
    spec, identity = Spec.random(layer=2, seed=3), {"name": "tiny"}
    for dtype, weights in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        seen.clear()
        gate = run_gate_stage(model, smol_tokenizer, identity, tmp_path, spec,
                              GateConfig(evaluate=False, activation_dtype=dtype), progress=False)
        assert seen == [{weights}]  # computed afresh: the other dtype's cached activations are not reused
        assert gate.meta["config"]["activation_dtype"] == dtype
        assert all(p.dtype == torch.float32 for p in model.parameters())  # restored afterwards
    gate = run_gate_stage(model, smol_tokenizer, identity, tmp_path, spec, GateConfig(evaluate=False), progress=False)
    assert gate.meta["config"]["activation_dtype"] == effective_dtype_name("auto", model)  # what auto meant on this machine
    with pytest.raises(SafesteerError, match="unknown gate activation_dtype"):
        GateConfig(activation_dtype="float16")
