"""Stage 3: localized on-policy distillation from the steered teacher into the student.

    trainer = Trainer(model, tokenizer, spec, safety_ids, prompts, TrainConfig.from_preset("cpu"), "runs/demo")
    trainer.train()                      # resumes from runs/demo/checkpoint if it exists
    trainer.save_model()                 # runs/demo/model: a plain Hugging Face model directory

One optimizer step, as the method prescribes:
  1. rollouts  the student (no steering) samples G completions for each of the step's prompts;
  2. teacher   the same weights with the LoRA adapter switched off (or a frozen copy when fully
               fine-tuning) plus the steering hook score them under no_grad: final hidden states only;
  3. student   the student scores them with grad, and `loss.distillation_loss` compares the two
               distributions on the safety tokens S, a chunk of positions at a time;
  4. update    AdamW (no weight decay), cosine schedule with warm-up, grad-norm clip.
With lora_layers=from_steering the adapter sits only on the steering layer and above, so below it the
two models are the same function: one no-grad pass there serves both, and 2. and 3. start at that layer.
Every step appends a row to OUT/metrics.jsonl; every `checkpoint_every` steps the adapter (or model),
optimizer, scheduler, RNG states and data order go to OUT/checkpoint atomically, so a rerun on the
same OUT continues exactly where the last checkpoint left off.

`safesteer align` (bottom of this file) chains direction -> tokens -> training -> summary.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch

from . import distributed
from .errors import SafesteerError
from .loss import LOSS_VARIANTS
from .utils import (append_jsonl, read_json, read_jsonl, seed_everything, sha256_file, sha256_texts,
                    temp_dir_in, write_json_atomic, write_text_atomic)

FINETUNE_MODES = ("lora", "full")
LORA_LAYERS = ("all", "from_steering")
CHECKPOINT_FORMAT = 1

# Learning rates of the released runs (full fine-tune, 32 completions per step).
PAPER_LR = {"qwen": 1e-5, "llama": 1e-6}


def _help(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class TrainConfig:
    """Training settings. The defaults are the "cpu" preset; `TrainConfig.from_preset` gives the others."""

    preset: str = _help("cpu", "name of the preset these settings started from (recorded, not used)")
    steps: int = _help(12, "optimizer steps (each with fresh rollouts)")
    prompts_per_step: int = _help(2, "training prompts per step")
    rollouts_per_prompt: int = _help(4, "G: completions the student samples per prompt")
    max_new_tokens: int = _help(48, "completion length limit; truncated completions stay in the loss")
    temperature: float = _help(1.0, "rollout sampling temperature (1.0 = on-policy)")
    top_p: float = _help(1.0, "rollout nucleus sampling (1.0 = on-policy)")
    loss: str = _help("localized", f"loss variant: {', '.join(LOSS_VARIANTS)}")
    chunk_size: int = _help(64, "positions per sequence scored at once by the loss (memory knob)")
    finetune: str = _help("lora", "lora: train an adapter, teacher = adapter off; full: all weights, frozen teacher copy")
    lora_r: int = _help(16, "LoRA rank")
    lora_alpha: int = _help(32, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = _help(0.0, "LoRA dropout (0 keeps the rollouts and the scored distribution identical)")
    lora_targets: str = _help("all-linear", "LoRA target modules: all-linear (every linear layer but the output head) "
                                            "or a comma list such as q_proj,k_proj,v_proj,o_proj")
    lora_layers: str = _help("all", "decoder layers that get the LoRA adapter: all, or from_steering (the steering "
                                    "layer and above only; teacher and student then share one pass through the "
                                    "layers below it, which are neither recomputed nor back-propagated)")
    teacher_dtype: str = _help("same", "full fine-tune only: dtype of the frozen teacher copy (same, bfloat16, float16)")
    learning_rate: float = _help(2e-4, "peak learning rate")
    weight_decay: float = _help(0.0, "AdamW weight decay")
    warmup_ratio: float = _help(0.1, "fraction of the steps with linear warm-up before the cosine decay")
    max_grad_norm: float = _help(1.0, "gradient-norm clip")
    bf16: str = _help("auto", "bf16 autocast: auto (on CUDA with bf16 support), on, off")
    gradient_checkpointing: bool = _help(False, "recompute activations in backward (saves memory, costs time)")
    checkpoint_every: int = _help(1, "write a resumable checkpoint every N steps (and after the last)")
    num_prompts: int = _help(0, "use only the first N training prompts (0 = all)")
    merge: bool = _help(True, "save the LoRA student merged into a plain model (else the adapter only)")
    seed: int = _help(42, "seed of data order, rollouts and adapter initialisation")

    def __post_init__(self):
        if self.loss not in LOSS_VARIANTS:
            raise SafesteerError(f"unknown loss '{self.loss}'; use one of: {', '.join(LOSS_VARIANTS)}")
        if self.finetune not in FINETUNE_MODES:
            raise SafesteerError(f"unknown finetune mode '{self.finetune}'; use lora or full")
        if self.lora_layers not in LORA_LAYERS:
            raise SafesteerError(f"unknown lora_layers '{self.lora_layers}'; use all or from_steering")
        if self.lora_layers == "from_steering" and self.finetune != "lora":
            raise SafesteerError("lora_layers=from_steering places a LoRA adapter; use it with finetune=lora "
                                 "or leave lora_layers at all")
        if self.bf16 not in ("auto", "on", "off"):
            raise SafesteerError("bf16 must be auto, on or off")
        if self.teacher_dtype not in ("same", "bfloat16", "float16"):
            raise SafesteerError("teacher_dtype must be same, bfloat16 or float16")
        for name in ("steps", "prompts_per_step", "rollouts_per_prompt", "max_new_tokens", "chunk_size",
                     "lora_r", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise SafesteerError(f"{name} must be >= 1")
        if self.learning_rate <= 0 or self.max_grad_norm <= 0:
            raise SafesteerError("learning_rate and max_grad_norm must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise SafesteerError("warmup_ratio must be in [0, 1)")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise SafesteerError("temperature must be > 0 and top_p in (0, 1]")

    @classmethod
    def from_preset(cls, name: str, family: str = "qwen", **overrides: Any) -> "TrainConfig":
        """A preset's settings, then `overrides` (None values ignored). `family` picks the paper's lr."""
        if name not in PRESETS:
            raise SafesteerError(f"unknown preset '{name}'; use one of: {', '.join(PRESETS)}")
        values = dict(PRESETS[name], preset=name)
        if name == "paper":
            values["learning_rate"] = PAPER_LR.get(family, PAPER_LR["qwen"])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def warmup_steps(self) -> int:
        return math.ceil(self.warmup_ratio * self.steps)


PRESETS: dict[str, dict[str, Any]] = {
    # The released runs: 4 prompts x 8 rollouts, one pass over 100 prompts, 512 new tokens, full
    # fine-tune, seed 42 (the learning rate is set per family in TrainConfig.preset).
    "paper": dict(steps=25, prompts_per_step=4, rollouts_per_prompt=8, max_new_tokens=512, finetune="full",
                  gradient_checkpointing=True, checkpoint_every=5, bf16="auto"),
    # The embedded default on 2 CPU cores: a LoRA student on the steering layer and above, small rollouts.
    # On the 0.5B default the paper's loss with the paper's S barely moves the model (harmful refusal
    # 58% -> 62%, n=64), so this preset uses the proper divergence over S plus one bucket for the rest
    # of the vocabulary and a low learning rate (58% -> 84%, over-refusal 27% -> 44%; see README).
    "cpu": {**{f.name: f.default for f in fields(TrainConfig) if f.name != "preset"},
            "lora_layers": "from_steering", "loss": "localized_bucket", "learning_rate": 5e-5},
}


def default_preset() -> str:
    return "paper" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- model plumbing


def forward_hidden(model: Any, inputs: dict) -> Any:
    """Last-layer hidden states (after the final norm) for every input position, [B, T, d].

    Like anatomy.final_hidden_states, but with explicit position ids (see RolloutBatch.model_inputs).
    Only one position of logits is computed, so no [B, T, V] tensor is built here.
    """
    out = model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    return out.hidden_states[-1]


def lora_module_names(model: Any, targets: str | Sequence[str], first_layer: int) -> list[str]:
    """Full names of the modules that `targets` selects inside decoder layers `first_layer` and above.

    `targets` is "all-linear" (every linear layer, GPT-2's Conv1D included) or module names matched
    as PEFT does, by the last name components. An explicit list keeps the placement independent of
    PEFT's guess at which number in a module name is the layer index.
    """
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from .anatomy import decoder_layers, unwrap_model

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
        from .anatomy import output_head

        return output_head(self.model)

    def hidden(self, inputs: dict, autocast: Any = contextlib.nullcontext, start: Any = None) -> torch.Tensor:
        """Final hidden states; with `start` (a steering.LayerInput) the forward begins at its layer."""
        adapter_off = self.model.disable_adapter() if self.shared else contextlib.nullcontext()
        self.model.eval()
        with torch.no_grad(), adapter_off, self.spec.teacher(self.model), _starting_at(self.model, start), autocast():
            return forward_hidden(self.model, inputs)


def _starting_at(model: Any, start: Any) -> Any:
    from .steering import start_at_layer

    return contextlib.nullcontext() if start is None else start_at_layer(model, start)


def data_order(n_prompts: int, config: TrainConfig) -> list[int]:
    """Prompt indices for every step: seeded shuffles of the prompt list, one after another."""
    needed = config.steps * config.prompts_per_step
    order: list[int] = []
    epoch = 0
    while len(order) < needed:
        perm = list(range(n_prompts))
        random.Random(config.seed * 1000 + epoch).shuffle(perm)
        order += perm
        epoch += 1
    return order[:needed]


def _rng_state() -> dict:
    """Python, numpy and torch RNG states as tensors and plain lists (loadable with weights_only)."""
    import numpy as np

    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    nps = state["numpy"]
    np.random.set_state(("MT19937", nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Settings that may change between an interrupted run and its resumption without changing the math.
_RESUME_FREE = ("checkpoint_every", "merge", "preset")


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """Localized on-policy distillation of `spec`'s steered teacher into `model` on the safety tokens."""

    def __init__(self, model: Any, tokenizer: Any, spec: Any, safety_ids: Sequence[int], prompts: Sequence[Any],
                 config: TrainConfig, out_dir: str | Path, run_info: dict | None = None, progress: bool = True):
        from transformers import get_cosine_schedule_with_warmup

        from .anatomy import end_of_turn_ids, output_head

        self.config, self.tokenizer, self.spec = config, tokenizer, spec
        self.out = Path(out_dir)
        self.run_info = dict(run_info or {})
        self.progress = progress
        texts = [getattr(p, "text", p) for p in prompts]
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
        # teacher keeps the unwrapped module (see distributed.py). In a single process nothing changes.
        self.accelerator = distributed.accelerator()
        distributed.check_trainable(self.accelerator, config.prompts_per_step, config.finetune == "lora" and config.merge)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(self.model, self.optimizer, self.scheduler)
        self.params = [p for p in self.model.parameters() if p.requires_grad]  # FSDP swaps in sharded parameters
        device = next(self.model.parameters()).device
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
        from .judges import is_refusal
        from .rollout import sample_rollouts

        cfg = self.config
        if positions is None:
            positions = range(self.step * cfg.prompts_per_step, self.step * cfg.prompts_per_step + len(instructions))
        t0 = time.perf_counter()
        student = self.accelerator.unwrap_model(self.model)  # sampling needs no gradient synchronisation
        seeds = distributed.rollout_seeds(cfg.seed, positions, cfg.rollouts_per_prompt)
        with distributed.seeded_sampling(student, seeds, cfg.temperature, cfg.top_p):
            batch = sample_rollouts(student, self.tokenizer, instructions, cfg.rollouts_per_prompt, cfg.max_new_tokens,
                                    cfg.temperature, cfg.top_p, self.eot_ids)
        row = {"step": self.step + 1, "time_rollout_s": time.perf_counter() - t0, **self.update(batch)}
        self.step += 1
        n_tokens = batch.n_tokens
        row.update(rollout_refusal_rate=sum(map(is_refusal, batch.responses)) / len(batch.responses),
                   completion_tokens=sum(n_tokens) / len(n_tokens),
                   finished_rate=sum(batch.finished) / len(batch.finished),
                   time_step_s=time.perf_counter() - t0, example=batch.responses[0][:160])
        return distributed.reduce_metrics(row, len(batch.responses), sum(n_tokens))

    def lower_pass(self, inputs: dict) -> Any:
        """The residual stream entering the steering layer (a steering.LayerInput), computed once per batch.

        Valid for teacher and student alike only because no adapter sits below that layer
        (lora_layers=from_steering). It runs in eval mode like the teacher: a base model with dropout
        would, in the unshared path, drop units in the student's lower layers, here it does not.
        """
        from .steering import capture_layer_input

        self.model.eval()
        with torch.no_grad(), self.autocast():
            return capture_layer_input(self.model, self.spec.layer, **inputs, use_cache=False)

    def score(self, batch: Any, timings: dict | None = None) -> Any:
        """The loss between teacher and student on the rollouts (a loss.DistillationOutput), not back-propagated.

        With `share_lower_layers` the layers below the steering layer run once, under no_grad, and
        both models start at the steering layer from their output; otherwise each runs every layer.
        `timings`, if given, receives the teacher's seconds (shared pass included) and when it ended.
        """
        from .loss import distillation_loss

        cfg = self.config
        inputs = batch.model_inputs()
        t0 = time.perf_counter()
        start = self.lower_pass(inputs) if self.share_lower_layers else None
        teacher_hidden = batch.scored_hidden(self.teacher.hidden(inputs, self.autocast, start))
        t1 = time.perf_counter()
        self.model.train()
        with self.autocast():
            with _starting_at(self.model, start):
                student_hidden = batch.scored_hidden(forward_hidden(self.model, inputs))
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
        self.accelerator.backward(out.loss * distributed.loss_weight(len(batch.responses)))
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
            positions = distributed.shard(range(at, at + cfg.prompts_per_step))  # this process's part of the step
            instructions = [self.prompts[self.order[i]] for i in positions]
            distributed.step_seed(cfg.seed, self.step)
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
        return self.out / "checkpoint"

    def _trainable_state(self) -> dict:
        return distributed.trainable_state(self.accelerator.unwrap_model(self.model))

    def _state_record(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "step": self.step, "order": self.order, "config": asdict(self.config),
                "prompts_sha256": sha256_texts(self.prompts), "safety_ids": self.safety_ids.tolist()}

    def save_checkpoint(self) -> Path:
        """Every process gathers the full state (FSDP needs all of them); the main process writes it."""
        weights = self._trainable_state()
        optimizer = distributed.optimizer_state(self.accelerator.unwrap_model(self.model), self.optimizer)
        if self.accelerator.is_main_process:
            self._write_checkpoint(weights, optimizer)
        self.accelerator.wait_for_everyone()
        return self.checkpoint_dir

    def _write_checkpoint(self, weights: dict, optimizer: dict | None) -> None:
        """Write the checkpoint to a temporary folder, then swap it in: a crash leaves the old one whole."""
        from safetensors.torch import save_file

        self.out.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir_in(self.out, ".checkpoint.")
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optimizer, tmp / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        write_json_atomic(tmp / "state.json", self._state_record())  # last: marks the folder complete
        old = self.out / ".checkpoint.old"
        if old.exists():
            shutil.rmtree(old)
        if self.checkpoint_dir.exists():
            os.replace(self.checkpoint_dir, old)
        os.replace(tmp, self.checkpoint_dir)
        shutil.rmtree(old, ignore_errors=True)

    def _resume(self) -> None:
        from safetensors.torch import load_file

        ckpt = self.checkpoint_dir
        if not (ckpt / "state.json").is_file() and (self.out / ".checkpoint.old" / "state.json").is_file():
            ckpt = self.out / ".checkpoint.old"  # a crash between the two renames of save_checkpoint
        main = self.accelerator.is_main_process  # every process reads the checkpoint; only the main one tidies
        for stale in self.out.glob(".checkpoint.*"):
            if main and stale != ckpt and stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        if not (ckpt / "state.json").is_file():
            if main:
                (self.out / "metrics.jsonl").unlink(missing_ok=True)  # rows of a run that never reached a checkpoint
            return
        state = read_json(ckpt / "state.json")
        mine = self._state_record()
        if state.get("format") != CHECKPOINT_FORMAT:
            raise SafesteerError(f"{ckpt} was written by another safesteer version; use a new --out")
        # A setting added after the checkpoint was written counts as its default, the behaviour it had then.
        before = {f.name: f.default for f in fields(TrainConfig)} | state["config"]
        changed = [k for k in mine["config"] if k not in _RESUME_FREE and before.get(k) != mine["config"][k]]
        if changed:
            diff = ", ".join(f"{k}: {before.get(k)!r} -> {mine['config'][k]!r}" for k in changed)
            raise SafesteerError(f"{self.out} holds a run with other settings ({diff}); "
                                 f"pass the same options to resume it, or use a new --out")
        if state["prompts_sha256"] != mine["prompts_sha256"] or state["safety_ids"] != mine["safety_ids"]:
            raise SafesteerError(f"{self.out} holds a run with other training prompts or safety tokens; use a new --out")
        weights = load_file(str(ckpt / "trainable.safetensors"))
        student = self.accelerator.unwrap_model(self.model)
        params = dict(student.named_parameters())
        if set(weights) != {n for n in params if params[n].requires_grad}:
            raise SafesteerError(f"{ckpt} does not match this model's trainable weights; use a new --out")
        distributed.load_trainable_state(student, weights)
        distributed.load_optimizer_state(student, self.optimizer,
                                         torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu"))
        self.scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        _set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True))
        self.step, self.order = int(state["step"]), list(state["order"])
        # Steps after the checkpoint are rerun, so their rows go.
        rows = [r for r in read_jsonl(self.out / "metrics.jsonl") if r.get("step", 0) <= self.step]
        if main:
            write_text_atomic(self.out / "metrics.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    # -- output --------------------------------------------------------------------------------

    def run_record(self) -> dict:
        import transformers

        from . import __version__

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
        state_dict = distributed.full_model_state(self.accelerator, self.model)  # sharded weights: gathered by all
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


def output_is_complete(out_dir: str | Path) -> bool:
    return (Path(out_dir) / "model" / "safesteer.json").is_file()


# ----------------------------------------------------------------------------- safesteer align

# Token-stage settings the CPU preset uses on top of the paper's (chosen by measurement on the
# default model; the "paper" preset keeps safety_tokens' own defaults).
ALIGN_TOKEN_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    # The paper's vote over the default model's teacher admits mostly rare tokens (code fragments, CJK,
    # "abort") that carry ~1-2% of the probability on the student's rollouts. A floor on the mean steered
    # probability (1e-3) and a narrower vote (K' = 10) keep the tokens the teacher actually emits and
    # boosts: "Unfortunately", " unable", "Sorry", " sorry", " cannot", "I", ... (~20% of the mass).
    "cpu": {"min_steered_prob": 1e-3, "top_k_per_position": 10},
}


def _int_list(text: str) -> tuple[int, ...]:
    """'8,10,12' or '6-9' (inclusive) or '-1,-2' -> a tuple of ints."""
    values: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-") if not part.strip().startswith("-") else (part, "", "")
        values.extend(range(int(first), int(last) + 1) if dash else [int(part)])
    return tuple(values)


def _parse_assignments(items: Sequence[str], config_cls: type, flag: str) -> dict:
    """KEY=VALUE strings -> typed overrides for a config dataclass (types taken from its defaults)."""
    known = {f.name: f for f in fields(config_cls)}
    out = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in known:
            raise SafesteerError(f"{flag} {item!r}: use KEY=VALUE with KEY one of {', '.join(known)}")
        default = known[key].default
        if raw.lower() in ("none", "null"):
            out[key] = None
        elif "tuple" in str(known[key].type) or "," in raw:  # a list setting: layers=8,10,12 or layers=6-9
            out[key] = _int_list(raw)
        elif isinstance(default, bool):
            out[key] = raw.lower() in ("1", "true", "yes", "on")
        elif isinstance(default, int):
            out[key] = int(raw)
        elif isinstance(default, float) or default is None:
            try:
                out[key] = int(raw) if raw.lstrip("-").isdigit() else float(raw)
            except ValueError:
                out[key] = raw
        else:
            out[key] = raw
    return out


def _record_timing(out: Path, timings: dict) -> None:
    path = out / "timings.json"
    previous = read_json(path) if path.is_file() else {}
    history = previous.pop("previous_runs", [])
    if previous:
        history.append(previous)
    write_json_atomic(path, {**timings, "previous_runs": history})


def _mtime(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.is_file() else None


def _ensure_direction(args, model, tokenizer, identity, out: Path) -> tuple[Any, bool]:
    """Stage 1 (run_direction_stage reuses a matching result). Returns (steering spec, reused?)."""
    from .direction import DIRECTION_PRESETS, META_FILE, DirectionConfig, load_direction, run_direction_stage
    from .prompts import builtin_splits

    if args.direction:  # a teacher made elsewhere, used as it is
        return load_direction(args.direction, model), True
    splits = builtin_splits(args.split_seed)
    values = {"seed": args.split_seed}  # DirectionConfig.seed names the built-in split it was given
    values.update(_parse_assignments(args.direction_config, DirectionConfig, "--direction-config"))
    # The align presets carry the direction presets of the same name (cpu: the relative induce filter).
    config = DirectionConfig.from_preset(args.preset if args.preset in DIRECTION_PRESETS else "paper", **values)
    before = _mtime(out / META_FILE)
    spec = run_direction_stage(model, tokenizer, identity, out, splits["harmful"]["direction_train"],
                               splits["harmless"]["direction_train"], splits["harmful"]["direction_val"],
                               splits["harmless"]["direction_val"], config)
    return spec, before is not None and _mtime(out / META_FILE) == before


def _ensure_tokens(args, preset: str, model, tokenizer, identity, out: Path) -> bool:
    """Stage 2; run_token_stage itself reuses a matching safety_tokens.json. Returns True if reused."""
    from .prompts import builtin_splits
    from .safety_tokens import JSON_NAME, SafetyTokenConfig, filter_harmless, run_token_stage

    values = dict(ALIGN_TOKEN_PRESETS.get(preset, {}))
    values.update(_parse_assignments(args.tokens_config, SafetyTokenConfig, "--tokens-config"))
    config = SafetyTokenConfig(**values)
    before = _mtime(out / JSON_NAME)
    prompts = filter_harmless(model, tokenizer, builtin_splits(args.split_seed)["harmless"]["direction_val"],
                              config.n_prompts)
    run_token_stage(model, tokenizer, identity, args.direction or out, out, prompts, config, progress=True)
    return before is not None and _mtime(out / JSON_NAME) == before


def _train_config_from_args(args, family: str) -> TrainConfig:
    overrides = {f.name: getattr(args, f.name, None) for f in fields(TrainConfig) if f.name != "preset"}
    if args.adapter_only:
        overrides["merge"] = False
    return TrainConfig.from_preset(args.preset, family, **overrides)


def load_aligned(args: argparse.Namespace, out: Path) -> tuple[Any, Any]:
    """The trained model from OUT/model: a merged model directory, or the base model plus the adapter."""
    from .cli import load_model_from_args

    model_dir = out / "model"
    if (model_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        base, tokenizer = load_model_from_args(args)
        return PeftModel.from_pretrained(base, str(model_dir)).eval(), tokenizer
    return tuple(load_model_from_args(args, str(model_dir)))


def summarize(args: argparse.Namespace, out: Path) -> dict:
    """The evaluation summary at the end of `align`: evaluate.align_summary when available, else built in.

    This is the one call site: the trained model is in OUT/model, the base model is `args.model`.
    """
    try:
        from .evaluate import align_summary
    except ImportError:
        align_summary = None
    if align_summary is not None:
        return align_summary(run_dir=out, base_model=args.model, aligned_dir=out / "model", args=args)
    return builtin_summary(args, out)


def builtin_summary(args: argparse.Namespace, out: Path) -> dict:
    """Refusal rates (keyword judge, greedy) of base and aligned model on held-out harmful and edgy prompts."""
    import gc

    from .cli import load_model_from_args
    from .distributed import generate_responses  # several processes: each answers a share
    from .generation import GenerationConfig
    from .judges import KeywordRefusalJudge
    from .prompts import builtin_splits
    from .stats import Rate

    splits = builtin_splits(args.split_seed)
    sets = {"harmful (held-out AdvBench)": splits["harmful"]["eval"][: args.eval_limit],
            "edgy (over-refusal)": splits["edgy"]["eval"][: args.eval_limit]}
    gen = GenerationConfig(max_new_tokens=args.eval_max_new_tokens, batch_size=16)
    judge = KeywordRefusalJudge()
    rates: dict[str, dict] = {name: {} for name in sets}
    # One model in memory at a time; responses are cached, so a rerun only generates what is missing.
    for label, load in (("base", lambda: load_model_from_args(args)), ("aligned", lambda: load_aligned(args, out))):
        model, tokenizer = load()
        for i, (name, prompts) in enumerate(sets.items()):
            rows = generate_responses(model, tokenizer, prompts, gen, out_path=out / "summary" / f"{label}-{i}.jsonl",
                                      desc=f"{label}: {name}")
            verdicts = judge.judge([r["prompt"] for r in rows], [r["response"] for r in rows])
            rates[name][label] = Rate(sum(bool(v.refused) for v in verdicts), len(verdicts))
        del model
        gc.collect()
    print(f"\nrefusal rate, keyword judge, greedy {args.eval_max_new_tokens} new tokens:")
    for name, by in rates.items():
        print(f"  {name:<28} base {by['base']}  ->  aligned {by['aligned']}")
    summary = {"judge": judge.name, "max_new_tokens": args.eval_max_new_tokens,
               "rates": {name: {k: v.to_dict() for k, v in by.items()} for name, by in rates.items()}}
    write_json_atomic(out / "summary.json", summary)
    return summary


def _cmd_align(args: argparse.Namespace) -> int:
    import gc

    from .cli import load_model_from_args
    from .models import model_family
    from .prompts import load_prompts, stage_prompts
    from .safety_tokens import load_safety_tokens

    distributed.init()  # launched on several processes: join them before the model is loaded onto this one's GPU
    out = Path(args.out)
    direction_dir = Path(args.direction) if args.direction else out
    out.mkdir(parents=True, exist_ok=True)
    args.preset = args.preset if args.preset != "auto" else default_preset()
    if args.prompts:
        prompts = load_prompts(args.prompts, field=args.field)
    else:
        prompts = stage_prompts(None, "train", "harmful", args.split_seed)
    stages: dict[str, dict] = {}
    t_start = time.time()

    def timed(name: str, fn, *a):
        t0 = time.time()
        try:
            return fn(*a)
        finally:  # a failed stage is recorded too, with the time it took to fail
            stages[name] = {"seconds": round(time.time() - t0, 2)}

    try:
        loaded = timed("load_model", load_model_from_args, args)
        model, tokenizer, identity = loaded.model, loaded.tokenizer, loaded.identity
        del loaded
        config = _train_config_from_args(args, model_family(model))
        print(f"preset {args.preset}: {config.steps} steps x {config.prompts_per_step} prompts x "
              f"{config.rollouts_per_prompt} rollouts, {config.max_new_tokens} new tokens, {config.finetune}, "
              f"loss {config.loss}, lr {config.learning_rate:g}")
        spec, reused = timed("direction", _ensure_direction, args, model, tokenizer, identity, out)
        stages["direction"]["reused"] = reused
        reused = timed("tokens", _ensure_tokens, args, args.preset, model, tokenizer, identity, out)
        stages["tokens"]["reused"] = reused
        if distributed.world_size() > 1:  # all processes go on with the same stage files, whichever wrote them last
            from .direction import load_direction

            distributed.barrier()
            spec = load_direction(out, model)
        if output_is_complete(out):
            print(f"{out / 'model'} already holds the trained model; skipping training")
            stages["training"] = {"seconds": 0.0, "reused": True}
        else:
            t0 = time.time()
            info = {"base_model": identity,
                    "data": {"train_prompts_source": args.prompts or "builtin:harmful/train",
                             "split_seed": args.split_seed},
                    "artifacts": {name: sha256_file(folder / name) for folder, name in (
                        (direction_dir, "direction.safetensors"), (direction_dir, "direction.json"),
                        (out, "safety_tokens.json"))}}
            trainer = Trainer(model, tokenizer, spec, load_safety_tokens(out), prompts, config, out, run_info=info)
            resumed_at = trainer.step
            if resumed_at:
                print(f"resuming from step {resumed_at} of {config.steps}")
            trainer.train()
            print(f"wrote {trainer.save_model()}")
            trainer.accelerator.free_memory()  # drop Accelerate's references, so the student can be freed
            stages["training"] = {"seconds": round(time.time() - t0, 2), "reused": False, "resumed_at_step": resumed_at}
            del trainer
        del model
        gc.collect()
        if not args.skip_eval:
            timed("summary", summarize, args, out)
    finally:
        if distributed.is_main_process():
            _record_timing(out, {"preset": args.preset, "stages": stages, "total_s": round(time.time() - t_start, 2),
                                 "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    print("wall-clock: " + ", ".join(f"{k} {v.get('seconds', 0):.0f} s" + (" (reused)" if v.get("reused") else "")
                                     for k, v in stages.items()) + f"; total {time.time() - t_start:.0f} s")
    return 0


def add_cli(subparsers) -> None:
    from .cli import add_config_args, add_model_args

    p = subparsers.add_parser(
        "align", help="direction -> safety tokens -> training -> summary, in one run directory",
        description="Safety-align a model end to end. Every stage writes its artifacts to --out and reuses them on a "
                    "rerun; training resumes from its last checkpoint. Presets: cpu (a LoRA run that fits 2 CPU "
                    "cores), paper (the released runs: full fine-tune, 4x8 rollouts of 512 tokens, 25 steps); every "
                    "setting below overrides the preset.")
    add_model_args(p)
    p.add_argument("--out", required=True, help="run directory (created; reused and resumed if it exists)")
    p.add_argument("--preset", choices=("auto", *PRESETS), default="auto",
                   help="auto: paper on a CUDA device, cpu otherwise")
    p.add_argument("--prompts", default=None, help="training prompts (default: the built-in harmful training split)")
    p.add_argument("--field", default=None, help="field/column holding the prompt text in a file or dataset")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the built-in prompt splits")
    p.add_argument("--direction", default=None, metavar="DIR",
                   help="use the refusal direction in DIR (direction.safetensors/.json) instead of running stage 1")
    p.add_argument("--direction-config", action="append", default=[], metavar="KEY=VALUE",
                   help="stage-1 setting (DirectionConfig field), repeatable")
    p.add_argument("--tokens-config", action="append", default=[], metavar="KEY=VALUE",
                   help="stage-2 setting (SafetyTokenConfig field, e.g. rank_by=weighted), repeatable")
    g = p.add_argument_group("training (default: the preset's value)")
    choices = {"loss": LOSS_VARIANTS, "finetune": FINETUNE_MODES, "bf16": ("auto", "on", "off"),
               "teacher_dtype": ("same", "bfloat16", "float16")}
    add_config_args(g, TrainConfig, [f.name for f in fields(TrainConfig) if f.name not in ("preset", "merge")],
                    default=None, choices=choices)  # merge: see --adapter-only
    g.add_argument("--adapter-only", action="store_true", help="save the LoRA adapter instead of a merged model")
    e = p.add_argument_group("summary")
    e.add_argument("--eval-limit", type=int, default=64, help="held-out prompts per set in the summary")
    e.add_argument("--eval-max-new-tokens", type=int, default=48)
    e.add_argument("--skip-eval", action="store_true", help="stop after training")
    p.set_defaults(func=_cmd_align)
