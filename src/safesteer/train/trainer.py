"""Stage 3: localized on-policy distillation from the steered teacher into the student.

    trainer = Trainer(model, tokenizer, spec, safety_ids, prompts, TrainConfig.from_preset("cpu"), "runs/demo")
    trainer.train()                      # resumes from runs/demo/checkpoint if it exists
    trainer.save_model()                 # runs/demo/model: a plain Hugging Face model directory

One optimizer step, as the method prescribes:
  1. rollouts  the student (no steering) samples G completions for each of the step's prompts;
  2. teacher   the same weights with the LoRA adapter switched off (or a frozen copy when fully
               fine-tuning) plus the steering hook score them under no_grad: final hidden states only;
  3. student   the student scores them with grad, and `core.loss.distillation_loss` compares the two
               distributions on the safety tokens S, a chunk of positions at a time;
  4. update    AdamW (no weight decay), cosine schedule with warm-up, grad-norm clip.
With lora_layers=from_steering the adapter sits only on the steering layer and above, so below it the
two models are the same function: one no-grad pass there serves both, and 2. and 3. start at that layer.
Every step appends a row to OUT/metrics.jsonl; every `checkpoint_every` steps the adapter (or model),
optimizer, scheduler and data order go to OUT/checkpoint atomically (`checkpoint.py`), so a rerun on
the same OUT continues exactly where the last checkpoint left off.

`safesteer align` (`pipeline.py`) chains direction -> tokens -> training -> summary.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import parallel
from ..core.forward import final_hidden_states, model_device
from ..core.sampling import rollout_seeds, seeded_sampling, step_seed
from ..core.steering import starting_at
from ..errors import SafesteerError
from ..io.prompts import prompt_texts
from ..utils import append_jsonl, read_json, read_jsonl, seed_everything, sha256_texts, temp_dir_in, write_json_atomic
from .checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_NAME, check_resumable, data_order, drop_metrics_after,
                         find_checkpoint, write_checkpoint)
from .config import TrainConfig


# ----------------------------------------------------------------------------- model plumbing


def lora_module_names(model: Any, targets: str | Sequence[str], first_layer: int) -> list[str]:
    """Full names of the modules that `targets` selects inside decoder layers `first_layer` and above.

    `targets` is "all-linear" (every linear layer, GPT-2's Conv1D included) or module names matched
    as PEFT does, by the last name components. An explicit list keeps the placement independent of
    PEFT's guess at which number in a module name is the layer index.
    """
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from ..core.anatomy import decoder_layers, unwrap_model

    base = unwrap_model(model)
    layers = decoder_layers(base)
    if not 0 <= first_layer < len(layers):
        raise SafesteerError(f"steering layer {first_layer} is out of range for a model with {len(layers)} "
                             f"decoder layers")
    block_names = {id(m): name for name, m in base.named_modules()}
    names = []
    for block in layers[first_layer:]:
        for sub, module in block.named_modules():
            if not sub:
                continue
            if targets == "all-linear":
                hit = isinstance(module, (nn.Linear, Conv1D))
            else:
                hit = any(sub == t or sub.endswith("." + t) for t in targets)
            if hit:
                names.append(f"{block_names[id(block)]}.{sub}")
    if not names:
        raise SafesteerError(f"no module matching LoRA targets {targets!r} in decoder layers {first_layer} and above; "
                             f"check --lora-targets")
    return names


def prepare_student(model: Any, config: TrainConfig, steering_layer: int | None = None) -> Any:
    """Wrap the model with a LoRA adapter, or make every weight trainable for a full fine-tune.

    With `config.lora_layers == "from_steering"` the adapter goes only on decoder layers
    `steering_layer` and above.
    """
    if config.finetune == "lora":
        from peft import LoraConfig, get_peft_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        targets = config.lora_targets
        if targets != "all-linear":
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        if config.lora_layers == "from_steering":
            if steering_layer is None:
                raise SafesteerError("lora_layers=from_steering needs the steering layer; pass steering_layer")
            targets = lora_module_names(model, targets, steering_layer)
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=targets, bias="none", task_type="CAUSAL_LM")
        try:
            model = get_peft_model(model, lora)
        except ValueError as exc:
            raise SafesteerError(f"cannot apply LoRA with targets {config.lora_targets!r}: {exc}") from exc
        # The loss applies the output head after the teacher's adapter-off context has closed.
        if isinstance(model.get_output_embeddings(), BaseTunerLayer):
            raise SafesteerError("LoRA on the output head is not supported; leave lm_head out of --lora-targets")
    else:
        model.requires_grad_(True)
        if any(p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters()):
            import warnings

            warnings.warn("full fine-tune of half-precision weights: AdamW updates of lr ~1e-5 fall below bf16 "
                          "resolution and are lost; load the model with --dtype float32 (bf16 autocast still applies)",
                          stacklevel=2)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


class SteeredTeacher:
    """pi_t: the base weights plus the steering hook, scored without grad.

    With LoRA it is the student itself inside `disable_adapter()`, so no second copy exists. For a
    full fine-tune it is a frozen copy made before training starts (optionally in half precision).
    """

    def __init__(self, base_model: Any, spec: Any, config: TrainConfig):
        self.spec = spec
        self.shared = config.finetune == "lora"
        self.model = None
        if not self.shared:
            self.model = copy.deepcopy(base_model).requires_grad_(False).eval()
            if config.teacher_dtype != "same":
                self.model.to(getattr(torch, config.teacher_dtype))

    def bind(self, student: Any) -> None:
        if self.shared:
            self.model = student

    @property
    def head(self):
        from ..core.anatomy import output_head

        return output_head(self.model)

    def hidden(self, inputs: dict, autocast: Any = contextlib.nullcontext, start: Any = None) -> torch.Tensor:
        """Final hidden states; with `start` (a core.steering.LayerInput) the forward begins at its layer."""
        adapter_off = self.model.disable_adapter() if self.shared else contextlib.nullcontext()
        self.model.eval()
        with torch.no_grad(), adapter_off, self.spec.teacher(self.model), starting_at(self.model, start), autocast():
            return final_hidden_states(self.model, **inputs)


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """Localized on-policy distillation of `spec`'s steered teacher into `model` on the safety tokens."""

    def __init__(self, model: Any, tokenizer: Any, spec: Any, safety_ids: Sequence[int], prompts: Sequence[Any],
                 config: TrainConfig, out_dir: str | Path, run_info: dict | None = None, progress: bool = True):
        from transformers import get_cosine_schedule_with_warmup

        from ..core.anatomy import end_of_turn_ids, output_head

        self.config, self.tokenizer, self.spec = config, tokenizer, spec
        self.out = Path(out_dir)
        self.run_info = dict(run_info or {})
        self.progress = progress
        texts = prompt_texts(prompts)
        self.prompts = texts[: config.num_prompts] if config.num_prompts else texts
        if not self.prompts:
            raise SafesteerError("no training prompts")
        self.safety_ids = torch.as_tensor(list(safety_ids), dtype=torch.long)
        self.eot_ids = end_of_turn_ids(tokenizer, model)
        seed_everything(config.seed)

        self.teacher = SteeredTeacher(model, spec, config)  # a copy is taken before any weight moves
        self.model = prepare_student(model, config, getattr(spec, "layer", None))
        self.teacher.bind(self.model)
        self.student_head = output_head(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, config.warmup_steps, config.steps)
        # Several processes (accelerate launch / torchrun): DDP, FSDP or DeepSpeed wrap the student here, the
        # teacher keeps the unwrapped module (see parallel.py). In a single process nothing changes.
        self.accelerator = parallel.accelerator()
        parallel.check_trainable(self.accelerator, config.prompts_per_step, config.finetune == "lora" and config.merge)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(self.model, self.optimizer, self.scheduler)
        self.params = [p for p in self.model.parameters() if p.requires_grad]  # FSDP swaps in sharded parameters
        device = model_device(self.model)
        use_bf16 = config.bf16 == "on" or (config.bf16 == "auto" and device.type == "cuda"
                                           and torch.cuda.is_bf16_supported())
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
        # With the adapter only from the steering layer up, student and teacher agree below it, so one pass
        # there serves both. Only in a single process: a DDP/FSDP wrapper must see the student's whole forward.
        self.share_lower_layers = (config.lora_layers == "from_steering" and self.accelerator.num_processes == 1
                                   and self.accelerator.unwrap_model(self.model) is self.model)
        self.step = 0
        self.order = data_order(len(self.prompts), config)
        self.merged = False
        self._resume()

    # -- one step ------------------------------------------------------------------------------

    def train_step(self, instructions: list[str], positions: Sequence[int] | None = None) -> dict:
        """Rollouts for these prompts, then one update on them; returns the step's metrics.

        `positions` are the prompts' places in the data order (default: the step's first places); they
        seed the rollouts, so a prompt gets the same samples on any process. With several processes
        each passes its shard and the returned metrics are those of the whole step.
        """
        from ..eval.judges import is_refusal
        from .rollout import sample_rollouts

        cfg = self.config
        if positions is None:
            positions = range(self.step * cfg.prompts_per_step, self.step * cfg.prompts_per_step + len(instructions))
        t0 = time.perf_counter()
        student = self.accelerator.unwrap_model(self.model)  # sampling needs no gradient synchronisation
        seeds = rollout_seeds(cfg.seed, positions, cfg.rollouts_per_prompt)
        with seeded_sampling(student, seeds, cfg.temperature, cfg.top_p):
            batch = sample_rollouts(student, self.tokenizer, instructions, cfg.rollouts_per_prompt, cfg.max_new_tokens,
                                    cfg.temperature, cfg.top_p, self.eot_ids)
        row = {"step": self.step + 1, "time_rollout_s": time.perf_counter() - t0, **self.update(batch)}
        self.step += 1
        n_tokens = batch.n_tokens
        row.update(rollout_refusal_rate=sum(map(is_refusal, batch.responses)) / len(batch.responses),
                   completion_tokens=sum(n_tokens) / len(n_tokens),
                   finished_rate=sum(batch.finished) / len(batch.finished),
                   time_step_s=time.perf_counter() - t0, example=batch.responses[0][:160])
        return parallel.reduce_metrics(row, len(batch.responses), sum(n_tokens))

    def lower_pass(self, inputs: dict) -> Any:
        """The residual stream entering the steering layer (a core.steering.LayerInput), computed once per batch.

        Valid for teacher and student alike only because no adapter sits below that layer
        (lora_layers=from_steering). It runs in eval mode like the teacher: a base model with dropout
        would, in the unshared path, drop units in the student's lower layers, here it does not.
        """
        from ..core.steering import capture_layer_input

        self.model.eval()
        with torch.no_grad(), self.autocast():
            return capture_layer_input(self.model, self.spec.layer, **inputs, use_cache=False)

    def score(self, batch: Any, timings: dict | None = None) -> Any:
        """The loss between teacher and student on the rollouts (a loss.DistillationOutput), not back-propagated.

        With `share_lower_layers` the layers below the steering layer run once, under no_grad, and
        both models start at the steering layer from their output; otherwise each runs every layer.
        `timings`, if given, receives the teacher's seconds (shared pass included) and when it ended.
        """
        from ..core.loss import distillation_loss

        cfg = self.config
        inputs = batch.model_inputs()
        t0 = time.perf_counter()
        start = self.lower_pass(inputs) if self.share_lower_layers else None
        teacher_hidden = batch.scored_hidden(self.teacher.hidden(inputs, self.autocast, start))
        t1 = time.perf_counter()
        self.model.train()
        with self.autocast():
            with starting_at(self.model, start):
                student_hidden = batch.scored_hidden(final_hidden_states(self.model, **inputs))
            out = distillation_loss(student_hidden, teacher_hidden, self.student_head, self.teacher.head,
                                    self.safety_ids, batch.completion_mask, variant=cfg.loss,
                                    chunk_size=cfg.chunk_size, target_ids=batch.completion_ids)
        if timings is not None:
            timings.update(teacher=t1 - t0, teacher_end=t1)
        return out

    def update(self, batch: Any) -> dict:
        """Teacher and student score the rollouts; one optimizer step on the loss between them."""
        cfg = self.config
        timings: dict = {}
        out = self.score(batch, timings)
        t1 = timings["teacher_end"]
        # Through the accelerator: under DDP the student's forward and this backward synchronise the gradients.
        self.accelerator.backward(out.loss * parallel.loss_weight(len(batch.responses)))
        grad_norm = self.accelerator.clip_grad_norm_(self.params, cfg.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        grad_norm = math.nan if grad_norm is None else float(grad_norm)  # DeepSpeed clips inside its engine
        return {"loss": float(out.loss.detach()), **out.stats, "grad_norm": grad_norm, "lr": lr,
                "time_teacher_s": timings["teacher"], "time_student_s": time.perf_counter() - t1}

    def train(self, max_steps: int | None = None) -> list[dict]:
        """Run to `config.steps` (or stop after `max_steps` more steps); returns this call's metric rows."""
        from tqdm.auto import tqdm

        cfg = self.config
        stop = cfg.steps if max_steps is None else min(cfg.steps, self.step + max_steps)
        rows = []
        main = self.accelerator.is_main_process
        bar = tqdm(total=cfg.steps, initial=self.step, desc="training", unit="step", disable=not self.progress or not main)
        while self.step < stop:
            at = self.step * cfg.prompts_per_step
            positions = parallel.shard(range(at, at + cfg.prompts_per_step))  # this process's part of the step
            instructions = [self.prompts[self.order[i]] for i in positions]
            step_seed(cfg.seed, self.step)
            row = self.train_step(instructions, positions)
            if main:
                append_jsonl(self.out / "metrics.jsonl", [row])
            rows.append(row)
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.2e}", kl=f"{row['sampled_kl']:.3f}", S=f"{row['student_s_mass']:.3f}",
                            St=f"{row['teacher_s_mass']:.3f}", refuse=f"{row['rollout_refusal_rate']:.2f}",
                            gnorm=f"{row['grad_norm']:.2f}")
        bar.close()
        return rows

    @property
    def done(self) -> bool:
        return self.step >= self.config.steps

    # -- checkpoints ---------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / CHECKPOINT_NAME

    def _state_record(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "step": self.step, "order": self.order, "config": asdict(self.config),
                "prompts_sha256": sha256_texts(self.prompts), "safety_ids": self.safety_ids.tolist()}

    def save_checkpoint(self) -> Path:
        """Every process gathers the full state (FSDP needs all of them); the main process writes it."""
        student = self.accelerator.unwrap_model(self.model)
        weights = parallel.trainable_state(student)
        optimizer = parallel.optimizer_state(student, self.optimizer)
        if self.accelerator.is_main_process:
            write_checkpoint(self.out, weights, optimizer, self.scheduler.state_dict(), self._state_record())
        self.accelerator.wait_for_everyone()
        return self.checkpoint_dir

    def _resume(self) -> None:
        """Continue from OUT/checkpoint if there is one: weights, optimizer, schedule, step and data order."""
        from safetensors.torch import load_file

        main = self.accelerator.is_main_process  # every process reads the checkpoint; only the main one tidies
        ckpt = find_checkpoint(self.out, tidy=main)
        if ckpt is None:
            if main:
                (self.out / "metrics.jsonl").unlink(missing_ok=True)  # rows of a run that never reached a checkpoint
            return
        state = read_json(ckpt / "state.json")
        check_resumable(self.out, ckpt, state, self._state_record())
        weights = load_file(str(ckpt / "trainable.safetensors"))
        student = self.accelerator.unwrap_model(self.model)
        params = dict(student.named_parameters())
        if set(weights) != {n for n in params if params[n].requires_grad}:
            raise SafesteerError(f"{ckpt} does not match this model's trainable weights; use a new --out")
        parallel.load_trainable_state(student, weights)
        parallel.load_optimizer_state(student, self.optimizer,
                                      torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu"))
        self.scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        self.step, self.order = int(state["step"]), list(state["order"])
        if main:
            drop_metrics_after(self.out, self.step)

    # -- output --------------------------------------------------------------------------------

    def run_record(self) -> dict:
        import transformers

        from .. import __version__

        try:
            import peft

            peft_version = peft.__version__
        except ImportError:  # a full fine-tune does not need it
            peft_version = None
        metrics = read_jsonl(self.out / "metrics.jsonl")
        return {
            "format": 1,
            "method": "safesteer localized on-policy distillation",
            "config": asdict(self.config),
            "steps_done": self.step,
            "saved_as": "adapter" if (self.config.finetune == "lora" and not self.config.merge) else "model",
            "train_prompts": {"n": len(self.prompts), "sha256": sha256_texts(self.prompts)},
            "direction": {"layer": getattr(self.spec, "layer", None), "coeff": getattr(self.spec, "coeff", None)},
            "safety_tokens": {"ids": self.safety_ids.tolist(),
                              "texts": [self.tokenizer.decode([i]) for i in self.safety_ids.tolist()]},
            "final_metrics": metrics[-1] if metrics else None,
            "versions": {"safesteer": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "peft": peft_version},
            **self.run_info,
        }

    def save_model(self) -> Path:
        """OUT/model: the merged student (or the adapter), tokenizer with chat template, safesteer.json.

        Merging folds the adapter into the base weights in place: afterwards `self.model` is the plain
        merged model and the trainer cannot take further steps.
        """
        target = self.out / "model"
        state_dict = parallel.full_model_state(self.accelerator, self.model)  # sharded weights: gathered by all
        model = self.accelerator.unwrap_model(self.model)
        if self.config.finetune == "lora" and self.config.merge and not self.merged:
            model = model.merge_and_unload()
            self.model, self.merged = model, True
        if self.accelerator.is_main_process:
            tmp = temp_dir_in(self.out, ".model.")
            try:
                model.eval()
                model.save_pretrained(tmp, state_dict=state_dict)
                self.tokenizer.save_pretrained(tmp)
                write_json_atomic(tmp / "safesteer.json", self.run_record())
                if target.exists():
                    shutil.rmtree(target)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return target
