import json
import math

import pytest
import torch

from conftest import ARCHS, Spec, make_tiny_model
from conftest import TRAIN_PROMPTS as PROMPTS
from conftest import peaked_tiny_model as tiny
from conftest import tiny_train_config as config
from safesteer.core.anatomy import decoder_layers
from safesteer.core.forward import final_hidden_states
from safesteer.core.loss import s_slice_logprobs
from safesteer.errors import SafesteerError
from safesteer.train.rollout import sample_rollouts
from safesteer.train.trainer import Trainer, lora_module_names, prepare_student


def losses(rows):
    return [r["loss"] for r in rows]


# Recorded once from this test's own run (torch 2.13 CPU, transformers 5.23, peft 0.21.2, per-row
# seeded inverse-CDF rollouts in float32) and committed: any change to rollouts, masks, the teacher,
# the loss or the optimizer moves them.
RECORDED_LOSSES = [4.4128394127, 0.1248790398]
RECORDED_SAMPLED_KL = [11.5615882874, 6.2584407443]


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
            reference = final_hidden_states(base, **inputs)
        base_plain = final_hidden_states(base, **inputs)
        student = final_hidden_states(trainer.model, **inputs)
    valid = inputs["attention_mask"].bool()
    assert torch.allclose(teacher[valid], reference[valid], atol=1e-5)  # adapter off + hook == base + hook
    assert not torch.allclose(teacher[valid], base_plain[valid], atol=1e-3)  # the hook is on
    assert not torch.allclose(student[valid], base_plain[valid], atol=1e-3)  # outside, the adapter acts
    assert trainer.teacher.model is trainer.model  # no second copy with LoRA


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

    start = trainer.lower_pass(inputs, batch)  # grouped: each prompt's positions ran once for its 2 rollouts
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
        decoder_layers(trainer.model)[0].mlp.register_forward_hook(  # positions layer 0 computes
            lambda _m, _i, out, calls=calls: calls.__setitem__(0, calls[0] + out.shape[0] * out.shape[1]))
        update = trainer.update

        def counted(batch, update=update, calls=calls, per_update=per_update):
            before = calls[0]
            row = update(batch)
            per_update.append(calls[0] - before)
            return row

        trainer.update = counted
        rows[share], lower_runs[share], trainers[share] = trainer.train(), per_update, trainer
    # Plain: teacher and student each run every position through the lower layers. Shared: one pass, with each
    # prompt's positions run once for its rollouts, so less than half of the plain path's work.
    assert all(0 < shared < plain / 2 for shared, plain in zip(lower_runs[True], lower_runs[False])), lower_runs
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




@pytest.mark.parametrize("fast", [True, False])
def test_bf16_auto_follows_the_hardware_and_keeps_the_heads_float32_on_a_cpu(tmp_path, smol_tokenizer, spec, safety_ids,
                                                                           monkeypatch, fast):
    import safesteer.train.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "fast_bf16", lambda device: fast)
    trainer = Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS, config(bf16="auto"), tmp_path,
                      progress=False)
    assert trainer.precision == ({"autocast": "bfloat16", "head": "float32"} if fast
                                 else {"autocast": "off", "head": "float32"})
    assert trainer.float32_head is fast
    assert trainer.run_record()["precision"] == trainer.precision


def test_bf16_autocast_with_float32_heads_scores_closer_to_float32_than_bf16_heads(tmp_path, smol_tokenizer, spec,
                                                                                   safety_ids):
    """Under bf16 autocast the logits the loss compares come from float32 heads (head_dtype auto on a CPU): the
    same rollouts then give a loss nearer the float32 one than with the heads in bf16 too."""
    results = {}
    for name, kw in {"float32": dict(bf16="off"), "bf16, float32 heads": dict(bf16="on"),
                     "bf16 heads": dict(bf16="on", head_dtype="autocast")}.items():
        trainer = Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS,
                          config(steps=1, lora_layers="from_steering", loss="localized_bucket", **kw),
                          tmp_path / name.replace(" ", "_").replace(",", ""), progress=False)
        with torch.no_grad():  # the same trained-looking adapter in all three
            g = torch.Generator().manual_seed(5)
            for _, p in sorted(trainer.model.named_parameters()):
                if p.requires_grad:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
        if name == "float32":
            batch = sample_rollouts(trainer.model, smol_tokenizer, PROMPTS[:2], 2, 6)
        logits_dtypes = []
        # The loss calls the head on [positions, hidden] (the model's own forward on [batch, 1, hidden]).
        handle = trainer.student_head.register_forward_hook(
            lambda m, args, out: logits_dtypes.append(out.dtype) if args[0].dim() == 2 else None)
        out = trainer.score(batch)
        out.loss.backward()
        handle.remove()
        grad = torch.cat([p.grad.flatten() for _, p in sorted(trainer.model.named_parameters()) if p.requires_grad])
        results[name] = (float(out.loss.detach()), grad, set(logits_dtypes))
    exact_loss, exact_grad, dtypes = results["float32"]
    assert dtypes == {torch.float32}
    assert results["bf16, float32 heads"][2] == {torch.float32} and results["bf16 heads"][2] == {torch.bfloat16}
    loss_err = {k: abs(v[0] - exact_loss) for k, v in results.items()}
    grad_err = {k: float((v[1] - exact_grad).norm() / exact_grad.norm()) for k, v in results.items()}
    print("loss error", loss_err, "gradient error", grad_err)
    assert 0 < loss_err["bf16, float32 heads"] < loss_err["bf16 heads"]
    # On this 32-wide model the bf16 layers dominate the gradient's error either way (on the default model: 3.5% with
    # float32 heads, 8.8% without, README "Time and memory"); it stays a rounding-sized error.
    assert 0 < grad_err["bf16, float32 heads"] < 0.1


def test_student_with_lora_dropout_scores_each_rollout_on_its_own(tmp_path, smol_tokenizer, spec, safety_ids, monkeypatch):
    """Grouping a prompt's rollouts would share one dropout draw over the prompt's positions: not with dropout."""
    import safesteer.train.trainer as trainer_module

    groups = []
    real = trainer_module.scored_hidden_grouped

    def spy(model, start, group, *args, **kwargs):
        groups.append(group)
        return real(model, start, group, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "scored_hidden_grouped", spy)
    for dropout in (0.0, 0.1):
        trainer = Trainer(tiny(smol_tokenizer), smol_tokenizer, spec, safety_ids, PROMPTS,
                          config(steps=1, lora_layers="from_steering", lora_dropout=dropout), tmp_path / str(dropout),
                          progress=False)
        assert trainer.share_lower_layers
        groups.clear()
        rows = trainer.train()
        assert math.isfinite(rows[-1]["loss"])
        # Teacher (eval mode, no dropout) then student: the student groups only without dropout.
        assert groups == ([2, 2] if dropout == 0.0 else [2, 1]), (dropout, groups)
