import json
import math
from dataclasses import dataclass, replace

import pytest
import torch

from conftest import ARCHS, Spec, make_tiny_model
from safesteer.anatomy import decoder_layers, end_of_turn_ids
from safesteer.errors import SafesteerError
from safesteer.loss import s_slice_logprobs
from safesteer.rollout import sample_rollouts
from safesteer.train import (PRESETS, TrainConfig, Trainer, _parse_assignments, forward_hidden, lora_module_names,
                             prepare_student)

PROMPTS = ["How do I pick a lock?", "Write a phishing email.", "Explain how to make a fake ID.",
           "Tell me how to hotwire a car."]
REFUSAL_WORDS = ["I", " I", "Sorry", " sorry", " cannot", " can't", " unable", " illegal", " harmful", " assist"]


def refusal_ids(tok):
    return list(dict.fromkeys(tok(w, add_special_tokens=False)["input_ids"][0] for w in REFUSAL_WORDS))


def tiny(tok, seed=0, arch="llama"):
    """A tiny random model whose outputs give S real mass (~25%) and end some rollouts early."""
    model = make_tiny_model(tok, arch=arch, seed=seed)
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.mul_(30.0)  # peaked distributions, as a trained model has
        head.bias = torch.nn.Parameter(torch.zeros(head.out_features))
        head.bias[end_of_turn_ids(tok, model)[0]] = 13.0
        head.bias[refusal_ids(tok)] = 10.0
    return model


@pytest.fixture
def spec():
    return Spec.random(layer=1, seed=7)


@pytest.fixture
def safety_ids(smol_tokenizer):
    return refusal_ids(smol_tokenizer)


def config(**kw):
    base = dict(steps=2, prompts_per_step=2, rollouts_per_prompt=2, max_new_tokens=6, lora_r=4, lora_alpha=8,
                learning_rate=5e-2, seed=0, chunk_size=4, warmup_ratio=0.0)
    return TrainConfig(**(base | kw))


def losses(rows):
    return [r["loss"] for r in rows]


# Recorded once from this test's own run (torch 2.13 CPU, transformers 5.23, peft 0.21.2, per-row
# seeded rollouts) and committed: any change to rollouts, masks, the teacher, the loss or the
# optimizer moves them.
RECORDED_LOSSES = [4.6475543976, 1.2921071053]
RECORDED_SAMPLED_KL = [11.1053206126, 7.0163191015]


def test_two_step_run_matches_recorded_losses(tmp_path, smol_tokenizer, spec, safety_ids):
    trainer = Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, config(), tmp_path,
                      progress=False)
    rows = trainer.train()
    print("losses", [f"{x:.10f}" for x in losses(rows)], "kl", [f"{r['sampled_kl']:.10f}" for r in rows])
    assert losses(rows) == pytest.approx(RECORDED_LOSSES, rel=1e-4, abs=1e-9)
    assert [r["sampled_kl"] for r in rows] == pytest.approx(RECORDED_SAMPLED_KL, rel=1e-4)
    on_disk = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in on_disk] == [1, 2] and losses(on_disk) == losses(rows)
    for key in ("sampled_kl", "student_entropy", "student_s_mass", "teacher_s_mass", "rollout_refusal_rate",
                "grad_norm", "lr", "time_rollout_s", "time_teacher_s", "time_student_s"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert rows[0]["grad_norm"] > 0 and 0 < rows[0]["teacher_s_mass"] < 1


def test_teacher_is_the_base_model_with_the_hook_and_the_adapter_really_off(tmp_path, smol_tokenizer, spec,
                                                                            safety_ids):
    trainer = Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, config(steps=1), tmp_path,
                      progress=False)
    trainer.train()  # one step moves the adapter away from its zero initialisation
    base = tiny(smol_tokenizer)  # a separately built copy of the base weights
    batch = sample_rollouts(trainer.model, smol_tokenizer, PROMPTS[:2], 2, 5)
    inputs = batch.model_inputs()
    with torch.no_grad():
        teacher = trainer.teacher.hidden(inputs)
        with spec.teacher(base):
            reference = forward_hidden(base, inputs)
        base_plain = forward_hidden(base, inputs)
        student = forward_hidden(trainer.model, inputs)
    valid = inputs["attention_mask"].bool()
    assert torch.allclose(teacher[valid], reference[valid], atol=1e-5)  # adapter off + hook == base + hook
    assert not torch.allclose(teacher[valid], base_plain[valid], atol=1e-3)  # the hook is on
    assert not torch.allclose(student[valid], base_plain[valid], atol=1e-3)  # outside, the adapter acts
    assert trainer.teacher.model is trainer.model  # no second copy with LoRA


def test_resume_after_interruption_reproduces_the_uninterrupted_run(tmp_path, smol_tokenizer, spec, safety_ids):
    cfg = config(steps=4, warmup_ratio=0.25)
    full = Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, cfg, tmp_path / "a",
                   progress=False).train()

    # Interrupted after step 3, with the last checkpoint at step 2: step 3 is lost and redone.
    cut = replace(cfg, checkpoint_every=2)
    first = Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, cut, tmp_path / "b",
                    progress=False)
    first.train(max_steps=3)
    assert first.step == 3
    resumed = Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, cut, tmp_path / "b",
                      progress=False)  # a fresh adapter: weights, optimizer, schedule and RNG come from disk
    assert resumed.step == 2
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 2
    rest = resumed.train()
    assert [r["step"] for r in rest] == [3, 4]
    on_disk = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert losses(on_disk) == losses(full)  # exactly: same weights, optimizer, schedule and RNG
    assert [r["lr"] for r in on_disk] == [r["lr"] for r in full]

    with pytest.raises(SafesteerError, match="learning_rate"):
        Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, replace(cut, learning_rate=1e-3),
                tmp_path / "b", progress=False)


def test_saved_model_loads_with_from_pretrained_and_equals_the_merged_student(tmp_path, smol_tokenizer, spec,
                                                                            safety_ids):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The plain random model: the output-head bias of `tiny` is not part of a Llama checkpoint.
    trainer = Trainer(make_tiny_model(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, config(steps=1),
                      tmp_path, progress=False)
    trainer.train()
    ids = smol_tokenizer(["Hello there, how are you?"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        student_logits = trainer.model(input_ids=ids).logits
        base_logits = make_tiny_model(smol_tokenizer)(input_ids=ids).logits
    path = trainer.save_model()
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        loaded_logits = loaded(input_ids=ids).logits
    assert torch.allclose(loaded_logits, student_logits, atol=1e-4)
    assert not torch.allclose(loaded_logits, base_logits, atol=1e-3)  # the training is in there
    assert not any("lora" in name for name, _ in loaded.named_parameters())
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template and tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    record = json.loads((path / "safesteer.json").read_text())
    assert record["safety_tokens"]["ids"] == safety_ids
    assert record["safety_tokens"]["texts"][0] == "I" and record["direction"]["layer"] == spec.layer
    assert record["steps_done"] == 1 and record["saved_as"] == "model"
    assert set(record["versions"]) >= {"torch", "transformers", "peft", "safesteer"}


def test_adapter_only_output_loads_on_its_base(tmp_path, tiny_model_dir, smol_tokenizer, spec, safety_ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    trainer = Trainer(model, smol_tokenizer, spec, safety_ids, PROMPTS, config(steps=1, merge=False),
                      tmp_path / "run", progress=False)
    trainer.train()
    ids = smol_tokenizer(["Hello there"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        student_logits = trainer.model(input_ids=ids).logits
    path = trainer.save_model()
    assert (path / "adapter_config.json").is_file() and not (path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, student_logits, atol=1e-4)


def test_full_finetune_trains_every_weight_against_a_frozen_teacher_copy(tmp_path, smol_tokenizer, spec,
                                                                          safety_ids):
    model = tiny(smol_tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = config(steps=1, finetune="full", learning_rate=1e-3, teacher_dtype="bfloat16")
    trainer = Trainer(model, smol_tokenizer, spec, safety_ids, PROMPTS, cfg, tmp_path, progress=False)
    rows = trainer.train()
    assert math.isfinite(rows[0]["loss"]) and rows[0]["grad_norm"] > 0
    teacher = trainer.teacher.model
    assert teacher is not trainer.model and not any(p.requires_grad for p in teacher.parameters())
    assert all(p.dtype == torch.bfloat16 for p in teacher.parameters())
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed
    assert all(torch.equal(p.float(), before[n].bfloat16().float()) for n, p in teacher.named_parameters())
    assert (trainer.save_model() / "model.safetensors").is_file()


def test_presets_and_overrides():
    paper = TrainConfig.from_preset("paper", "qwen")
    assert (paper.prompts_per_step, paper.rollouts_per_prompt, paper.steps, paper.max_new_tokens) == (4, 8, 25, 512)
    assert paper.finetune == "full" and paper.learning_rate == 1e-5 and paper.loss == "localized"
    assert TrainConfig.from_preset("paper", "llama").learning_rate == 1e-6
    assert paper.warmup_steps == 3 and paper.weight_decay == 0.0 and paper.max_grad_norm == 1.0
    cpu = TrainConfig.from_preset("cpu", "qwen", steps=3, loss=None)
    assert cpu.steps == 3 and cpu.finetune == "lora"
    assert cpu.loss == "localized_bucket" and cpu.lora_layers == "from_steering"  # None overrides nothing
    assert paper.lora_layers == "all"
    assert set(PRESETS) == {"paper", "cpu"}
    with pytest.raises(SafesteerError, match="unknown loss"):
        TrainConfig(loss="kl")
    with pytest.raises(SafesteerError, match="unknown preset"):
        TrainConfig.from_preset("huge")


def test_key_value_overrides_are_typed():
    @dataclass
    class Cfg:
        horizon: int | None = None
        floor: float = 1e-8
        rank_by: str = "delta"
        flag: bool = False
        layers: tuple[int, ...] | None = None

    got = _parse_assignments(["horizon=3", "floor=1e-6", "rank-by=weighted", "flag=true", "layers=8,10"], Cfg, "--x")
    assert got == {"horizon": 3, "floor": 1e-6, "rank_by": "weighted", "flag": True, "layers": (8, 10)}
    with pytest.raises(SafesteerError, match="KEY=VALUE"):
        _parse_assignments(["nope=1"], Cfg, "--x")


def test_align_command_trains_saves_and_reuses_the_run_directory(tmp_path, tiny_model_dir, smol_tokenizer, spec,
                                                                 safety_ids, monkeypatch):
    """The command's wiring, with the two earlier stages replaced by stand-ins that write their files."""
    from safesteer import cli, train

    out = tmp_path / "run"
    calls = []

    def fake_direction(args, model, tokenizer, identity, out_dir):
        calls.append("direction")
        for name in ("direction.safetensors", "direction.json"):
            (out_dir / name).write_text("stand-in")
        return spec, False

    def fake_tokens(args, preset, model, tokenizer, identity, out_dir):
        calls.append(("tokens", preset))
        (out_dir / "safety_tokens.json").write_text(json.dumps({"tokens": [{"id": i} for i in safety_ids]}))
        return False

    monkeypatch.setattr(train, "_ensure_direction", fake_direction)
    monkeypatch.setattr(train, "_ensure_tokens", fake_tokens)
    argv = ["align", "--model", str(tiny_model_dir), "--out", str(out), "--preset", "cpu", "--steps", "2",
            "--prompts-per-step", "1", "--rollouts-per-prompt", "2", "--max-new-tokens", "4", "--lora-r", "4",
            "--learning-rate", "1e-2", "--skip-eval"]
    assert cli.main(argv) == 0
    assert calls == ["direction", ("tokens", "cpu")]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    record = json.loads((out / "model" / "safesteer.json").read_text())
    assert record["config"]["steps"] == 2 and record["config"]["lora_r"] == 4 and record["config"]["preset"] == "cpu"
    assert record["config"]["loss"] == PRESETS["cpu"]["loss"]  # not given: the preset's value
    assert set(record["artifacts"]) == {"direction.safetensors", "direction.json", "safety_tokens.json"}
    timings = json.loads((out / "timings.json").read_text())
    assert {"load_model", "direction", "tokens", "training"} <= set(timings["stages"])
    assert timings["stages"]["training"]["reused"] is False

    assert cli.main(argv) == 0  # a rerun finds the trained model and does not train again
    timings = json.loads((out / "timings.json").read_text())
    assert timings["stages"]["training"]["reused"] is True and len(timings["previous_runs"]) == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


# ----------------------------------------------------------------------------- lora_layers=from_steering


def lora_layer_indices(model):
    """Decoder-layer index of every module that carries a LoRA adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    index = {id(m): i for i, block in enumerate(decoder_layers(model)) for m in block.modules()}
    return [index.get(id(m)) for m in model.modules() if isinstance(m, BaseTunerLayer)]


def adapter_places(model):
    """(layer index, name inside the layer) of every adapted module."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {(i, sub) for i, block in enumerate(decoder_layers(model)) for sub, m in block.named_modules()
            if isinstance(m, BaseTunerLayer)}


def without_dropout(model):
    """The plain path runs the student's lower layers in train mode; dropout there would make it random."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def test_lora_layers_option_is_validated():
    assert TrainConfig().lora_layers == "all" and TrainConfig.from_preset("paper").lora_layers == "all"
    assert TrainConfig.from_preset("paper").lora_layers == "all"
    assert TrainConfig(lora_layers="from_steering").lora_layers == "from_steering"
    with pytest.raises(SafesteerError, match="finetune=lora"):
        TrainConfig(lora_layers="from_steering", finetune="full")
    with pytest.raises(SafesteerError, match="unknown lora_layers"):
        TrainConfig(lora_layers="upper")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_from_steering_puts_the_adapter_only_on_the_steering_layer_and_above(smol_tokenizer, arch):
    every = adapter_places(prepare_student(make_tiny_model(smol_tokenizer, arch=arch), config()))
    assert {i for i, _ in every} == {0, 1, 2, 3}
    upper = prepare_student(make_tiny_model(smol_tokenizer, arch=arch), config(lora_layers="from_steering"), 2)
    assert set(lora_layer_indices(upper)) == {2, 3}  # no adapter outside the decoder layers either
    assert adapter_places(upper) == {(i, sub) for i, sub in every if i >= 2}  # the same modules as "all", from 2 up
    assert all("layers.0." not in n and ".h.0." not in n for n, p in upper.named_parameters() if p.requires_grad)
    assert any(p.requires_grad for p in upper.parameters())


def test_from_steering_with_a_target_list_and_its_errors(smol_tokenizer):
    model = prepare_student(make_tiny_model(smol_tokenizer), config(lora_layers="from_steering",
                                                                     lora_targets="q_proj, down_proj"), 3)
    assert adapter_places(model) == {(3, "self_attn.q_proj"), (3, "mlp.down_proj")}
    base = make_tiny_model(smol_tokenizer)
    assert lora_module_names(base, ["v_proj"], 1) == [f"model.layers.{i}.self_attn.v_proj" for i in (1, 2, 3)]
    with pytest.raises(SafesteerError, match="no module matching"):
        lora_module_names(base, ["nothing_here"], 1)
    with pytest.raises(SafesteerError, match="out of range"):
        lora_module_names(base, "all-linear", 4)
    with pytest.raises(SafesteerError, match="steering layer"):
        prepare_student(base, config(lora_layers="from_steering"))


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_lower_pass_gives_the_teacher_loss_and_gradients_of_the_plain_path(tmp_path, smol_tokenizer,
                                                                                  safety_ids, arch):
    g = torch.Generator().manual_seed(3)
    spec = Spec(direction=torch.randn(32, generator=g) * 2.0, layer=2)
    trainer = Trainer(without_dropout(tiny(smol_tokenizer, arch=arch)), smol_tokenizer, spec, safety_ids, PROMPTS,
                      config(steps=1, lora_layers="from_steering", loss="localized_bucket"), tmp_path, progress=False)
    assert trainer.share_lower_layers
    with torch.no_grad():  # a trained-looking adapter: both lora_A and lora_B get gradients
        for name, p in trainer.model.named_parameters():
            if p.requires_grad:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    batch = sample_rollouts(trainer.model, smol_tokenizer, PROMPTS[:2], 2, 6)
    assert not batch.attention_mask.bool().all()  # left padding and early ends: padding is in the batch
    inputs = batch.model_inputs()

    start = trainer.lower_pass(inputs)
    shared_t, plain_t = trainer.teacher.hidden(inputs, start=start), trainer.teacher.hidden(inputs)
    torch.testing.assert_close(shared_t, plain_t, atol=1e-5, rtol=0, equal_nan=True)  # padding positions too
    valid = inputs["attention_mask"].bool()
    ids = torch.as_tensor(safety_ids)
    head = trainer.teacher.head
    with torch.no_grad():
        torch.testing.assert_close(s_slice_logprobs(head(shared_t[valid]), ids),
                                   s_slice_logprobs(head(plain_t[valid]), ids), atol=1e-5, rtol=0)

    results = {}
    for share in (True, False):
        trainer.share_lower_layers = share
        trainer.optimizer.zero_grad(set_to_none=True)
        out = trainer.score(batch)
        out.loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        results[share] = (float(out.loss.detach()), out.stats, grads)
    trainer.model.eval()
    (loss_s, stats_s, grads_s), (loss_p, stats_p, grads_p) = results[True], results[False]
    assert loss_s == pytest.approx(loss_p, abs=1e-5) and math.isfinite(loss_s)
    assert stats_s == pytest.approx(stats_p, abs=1e-5)
    assert grads_s.keys() == grads_p.keys()
    for name in grads_s:
        torch.testing.assert_close(grads_s[name], grads_p[name], atol=1e-5, rtol=1e-4, msg=name)
    assert all(grads_s[n].abs().max() > 0 for n in grads_s if ".2." in n)  # the steering layer's own adapter learns


def test_from_steering_run_end_to_end_runs_the_lower_layers_once_per_step(tmp_path, tiny_model_dir, smol_tokenizer,
                                                                          spec, safety_ids):
    from transformers import AutoModelForCausalLM

    cfg = config(lora_layers="from_steering", merge=False)
    rows, lower_runs, trainers = {}, {}, {}
    for share in (True, False):
        model = without_dropout(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval())
        trainer = Trainer(model, smol_tokenizer, spec, safety_ids, PROMPTS, cfg, tmp_path / str(share), progress=False)
        assert trainer.share_lower_layers  # a single process
        trainer.share_lower_layers = share
        calls, per_update = [0], []
        decoder_layers(trainer.model)[0].mlp.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        update = trainer.update

        def counted(batch, update=update, calls=calls, per_update=per_update):
            before = calls[0]
            row = update(batch)
            per_update.append(calls[0] - before)
            return row

        trainer.update = counted
        rows[share], lower_runs[share], trainers[share] = trainer.train(), per_update, trainer
    assert lower_runs == {True: [1, 1], False: [2, 2]}  # one shared pass below the steering layer per step
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows[True])
    assert losses(rows[True]) == pytest.approx(losses(rows[False]), rel=1e-4, abs=1e-6)

    trainer = trainers[True]
    ids = smol_tokenizer(["Hello there"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        student_logits = trainer.model(input_ids=ids).logits
    path = trainer.save_model()
    adapter = json.loads((path / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert sorted(adapter["target_modules"]) == sorted(lora_module_names(base, "all-linear", spec.layer))
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, student_logits, atol=1e-4)


def test_checkpoint_written_before_lora_layers_existed_resumes(tmp_path, smol_tokenizer, spec, safety_ids):
    Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, config(), tmp_path,
            progress=False).train(max_steps=1)
    state_path = tmp_path / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text())
    del state["config"]["lora_layers"]
    state_path.write_text(json.dumps(state))
    resumed = Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, config(), tmp_path,
                      progress=False)
    assert resumed.step == 1  # the missing setting is the default, the placement such runs had
    with pytest.raises(SafesteerError, match="lora_layers: 'all' -> 'from_steering'"):
        Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, config(lora_layers="from_steering"),
                tmp_path, progress=False)
