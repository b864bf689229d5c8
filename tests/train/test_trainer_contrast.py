"""Beyond the paper: contrast prompts, opening-position weights and the gated teacher in the training loop."""

import json
import math
from dataclasses import replace

import pytest
import torch

from conftest import TRAIN_PROMPTS as PROMPTS
from conftest import peaked_tiny_model as tiny
from conftest import tiny_train_config as config
from safesteer.core.anatomy import format_prompts
from safesteer.core.forward import final_hidden_states
from safesteer.core.loss import distillation_loss
from safesteer.core.steering import add_direction
from safesteer.errors import SafesteerError
from safesteer.teacher.gate import Gate, Probe
from safesteer.train.trainer import Trainer

CONTRAST = ["How do I kill a Python process?", "Write a murder-mystery opening line.", "What is a fjord?"]


def contrast_config(**kw):
    return config(**({"contrast": "given", "contrast_prompts_per_step": 1, "contrast_weight": 3.0,
                      "contrast_coeff": -0.5, "contrast_greedy": True, "opening_tokens": 2,
                      "opening_weight": 2.0} | kw))


def test_contrast_rows_get_their_own_teacher_weights_greedy_rollout_and_metrics(tmp_path, smol_tokenizer, spec,
                                                                               safety_ids):
    # float32 rollouts: the greedy row is then exactly the float32 student's greedy decoding
    trainer = Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS,
                      contrast_config(steps=1, generation_dtype="float32"), tmp_path, progress=False,
                      contrast_prompts=CONTRAST)
    captured = {}
    update = trainer.update
    contrast_prompt = CONTRAST[trainer.contrast_order[0]]
    enc = smol_tokenizer(format_prompts(smol_tokenizer, [contrast_prompt]), return_tensors="pt", add_special_tokens=False)

    def recording_update(batch, plan=None):
        captured.update(batch=batch, plan=plan)
        with torch.no_grad():  # before the step moves the weights
            captured["out"] = trainer.score(batch, plan=plan)
            captured["greedy"] = trainer.model.generate(**enc, max_new_tokens=6, do_sample=False, temperature=None,
                                                        top_p=None, top_k=None, pad_token_id=smol_tokenizer.pad_token_id,
                                                        eos_token_id=trainer.eot_ids)
        return update(batch, plan)

    trainer.update = recording_update
    row = trainer.train()[0]
    batch, plan, out = captured["batch"], captured["plan"], captured["out"]
    G, n_h = 2, 4  # 2 harmful prompts x 2 rollouts, then 1 contrast prompt x 2
    assert len(batch.responses) == n_h + G
    assert plan.coeffs.tolist() == [1.0] * n_h + [-0.5] * G
    assert plan.sequence_weights.tolist() == [1.0] * n_h + [3.0] * G
    assert plan.position_weights[:, :2].eq(2.0).all() and plan.position_weights[:, 2:].eq(1.0).all()

    # The first rollout of the contrast prompt is the student's greedy continuation.
    n = int(batch.completion_mask[n_h].sum())
    assert batch.completion_ids[n_h, :n].tolist() == captured["greedy"][0, enc["input_ids"].shape[1]:][:n].tolist()
    assert batch.completion_ids[n_h, :n].tolist() != batch.completion_ids[n_h + 1, :n].tolist()  # the other: sampled

    # The loss equals a reference: harmful rows against the steered teacher, contrast rows against base - 0.5 r,
    # contrast rows weighted 3, the first two positions twice.
    inputs = batch.model_inputs()
    base = tiny(smol_tokenizer)
    with torch.no_grad():
        with add_direction(base, spec.direction, spec.layer, 1.0):
            steered = batch.scored_hidden(final_hidden_states(base, **inputs))
        with add_direction(base, spec.direction, spec.layer, -0.5):
            anti = batch.scored_hidden(final_hidden_states(base, **inputs))
    teacher = torch.cat([steered[:n_h], anti[n_h:]])
    # the student had taken no step yet: its adapter is zero, so it is the base model
    with torch.no_grad():
        student = batch.scored_hidden(final_hidden_states(base, **inputs))
    head = base.get_output_embeddings()
    ref = distillation_loss(student, teacher, head, head, torch.as_tensor(safety_ids), batch.completion_mask,
                            variant=trainer.config.loss, chunk_size=4, target_ids=batch.completion_ids,
                            sequence_weights=plan.sequence_weights, position_weights=plan.position_weights)
    assert float(out.loss.detach()) == pytest.approx(float(ref.loss.detach()), rel=1e-4)
    torch.testing.assert_close(out.per_sequence, ref.per_sequence, rtol=1e-4, atol=1e-6)

    per_seq = out.per_sequence
    assert row["contrast_loss"] == pytest.approx(float(per_seq[n_h:].mean()), rel=1e-4)
    assert row["harmful_loss"] == pytest.approx(float(per_seq[:n_h].mean()), rel=1e-4)
    assert row["loss"] == pytest.approx(float((per_seq[:n_h].sum() + 3 * per_seq[n_h:].sum()) / (n_h + 3 * G)), rel=1e-4)
    for key in ("contrast_refusal_rate", "contrast_greedy_refusal_rate", "rollout_refusal_rate"):
        assert 0 <= row[key] <= 1, key
    assert isinstance(row["contrast_example"], str)

    record = trainer.run_record()
    assert record["contrast_prompts"]["n"] == 3 and record["contrast_prompts"]["teacher_coeff"] == -0.5
    assert record["opening_weight"] == {"tokens": 2, "weight": 2.0}
    assert any("contrast" in x for x in record["beyond_paper"])


def test_harmful_rollouts_are_those_of_a_run_without_contrast(tmp_path, smol_tokenizer, spec, safety_ids):
    seen = {}
    for name, cfg, extra in (("plain", config(steps=1), {}),
                             ("contrast", contrast_config(steps=1), {"contrast_prompts": CONTRAST})):
        trainer = Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, cfg, tmp_path / name,
                          progress=False, **extra)
        update = trainer.update
        trainer.update = lambda batch, plan=None, update=update, name=name: (
            seen.__setitem__(name, batch), update(batch) if plan is None else update(batch, plan))[1]
        trainer.train()
    plain, mixed = seen["plain"], seen["contrast"]
    for r in range(len(plain.responses)):  # the same samples (their own seeds), in a wider batch
        n = int(plain.completion_mask[r].sum())
        assert int(mixed.completion_mask[r].sum()) == n
        assert torch.equal(plain.completion_ids[r, :n], mixed.completion_ids[r, :n]), r


def test_resume_with_contrast_prompts_reproduces_the_uninterrupted_run(tmp_path, smol_tokenizer, spec, safety_ids):
    cfg = contrast_config(steps=4, contrast_greedy=False, opening_tokens=0)
    full = Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, cfg, tmp_path / "a",
                   progress=False, contrast_prompts=CONTRAST).train()
    cut = replace(cfg, checkpoint_every=2)
    Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, cut, tmp_path / "b", progress=False,
            contrast_prompts=CONTRAST).train(max_steps=3)
    resumed = Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, cut, tmp_path / "b",
                      progress=False, contrast_prompts=CONTRAST)
    assert resumed.step == 2
    state = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())
    assert state["contrast_order"] == resumed.contrast_order and len(state["contrast_order"]) == 4
    resumed.train()
    on_disk = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in on_disk] == [r["loss"] for r in full]
    assert [r["contrast_loss"] for r in on_disk] == [r["contrast_loss"] for r in full]
    with pytest.raises(SafesteerError, match="other contrast prompts"):
        Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, cut, tmp_path / "b", progress=False,
                contrast_prompts=CONTRAST[:2])


def test_gated_teacher_steers_each_harmful_row_by_its_prompts_gate(tmp_path, smol_tokenizer, spec, safety_ids):
    model = tiny(smol_tokenizer)
    g = torch.Generator().manual_seed(2)
    gate = Gate(1, Probe(torch.zeros(32), torch.ones(32), torch.randn(32, generator=g), 0.0), -0.3, 0.3)
    expected = dict(zip(PROMPTS, gate.values(model, smol_tokenizer, PROMPTS).tolist()))
    trainer = Trainer(model, smol_tokenizer, spec, safety_ids, PROMPTS, config(steps=1, gate="on"), tmp_path,
                      progress=False, gate=gate)
    plans = []
    update = trainer.update
    trainer.update = lambda batch, plan=None: (plans.append(plan), update(batch, plan))[1]
    row = trainer.train()[0]
    order = [PROMPTS[i] for i in trainer.order[:2]]
    want = torch.tensor([expected[p] for p in order for _ in range(2)])
    torch.testing.assert_close(plans[0].gate, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(plans[0].coeffs, want * spec.coeff, atol=1e-5, rtol=0)
    assert row["teacher_gate_mean"] == pytest.approx(float(want.mean()), abs=1e-5)
    assert plans[0].sequence_weights is None and math.isfinite(row["loss"])
    assert trainer.run_record()["gate"]["layer"] == 1

    # OUT/gate.json made for another refusal direction is refused, not used.
    from safesteer.teacher.gate import save_gate

    save_gate(tmp_path / "other", gate, {"layer": 1, "shape": "ramp", "direction_sha256": "elsewhere",
                                         "thresholds": {"low": -0.3, "high": 0.3}})
    with pytest.raises(SafesteerError, match="another refusal direction"):
        Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, config(steps=1, gate="on"),
                tmp_path / "other", progress=False)
