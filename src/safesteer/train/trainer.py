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
Precision: weights, optimizer state and loss are float32; with bf16 autocast (`bf16`, auto where bf16 matrix
products are fast) the decoder layers of 2. and 3. run in bf16, and on a CPU the output heads, whose logits
the loss compares, stay float32 (`head_dtype`).
With lora_layers=from_steering the adapter sits only on the steering layer and above, so below it the
two models are the same function: one no-grad pass there serves both, and 2. and 3. start at that layer.

Beyond the paper (method.md, all off in the paper preset): contrast prompts, rolled out in the same batch
as the harmful ones and scored by a teacher with its own steering coefficient (0: the unsteered model),
weighted in the loss, one rollout each optionally greedy; extra loss weight on the first completion
positions; a gated teacher that steers each harmful prompt by coeff x g(its harmfulness) (teacher/gate.py).

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
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import parallel
from ..core.forward import final_hidden_states, model_device
from ..core.generation import fast_bf16
from ..core.sampling import rollout_seeds, seeded_sampling, step_seed
from ..core.steering import scored_hidden_grouped, starting_at
from ..errors import SafesteerError
from ..io.prompts import prompt_texts
from ..utils import (append_jsonl, disk_full_error, is_disk_full, phase, read_json, read_jsonl, release_freed_memory,
                     replace_dir, seed_everything, sha256_texts, temp_dir_in, write_json_atomic)
from .checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_NAME, check_resumable, data_order, drop_metrics_after,
                         find_checkpoint, require_finite, write_checkpoint)
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

    def hidden(self, inputs: dict, autocast: Any = contextlib.nullcontext, start: Any = None,
               coeffs: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states; with `start` (a core.steering.LayerInput) the forward begins at its layer.

        `coeffs` ([N], beyond the paper) gives each row its own steering coefficient instead of the spec's.
        """
        self.model.eval()
        with torch.no_grad(), self.base(), self.steering(coeffs), starting_at(self.model, start), autocast():
            return final_hidden_states(self.model, **inputs)

    def scored_hidden(self, inputs: dict, batch: Any, group: int, autocast: Any = contextlib.nullcontext,
                      start: Any = None, coeffs: torch.Tensor | None = None) -> torch.Tensor:
        """`batch.scored_hidden(self.hidden(...))`; from `start`, each prompt's columns run once for its `group`
        rollouts (`core.steering.scored_hidden_grouped`), the steering coefficients sliced to match."""
        if start is not None:
            self.model.eval()
            with torch.no_grad(), self.base(), autocast():
                hidden = scored_hidden_grouped(self.model, start, group, batch.prompt_len, **inputs,
                                               context=lambda rows: self.steering(None if coeffs is None else coeffs[rows]))
            if hidden is not None:
                return hidden
        return batch.scored_hidden(self.hidden(inputs, autocast, start, coeffs))

    def base(self) -> Any:
        """The base weights: the LoRA adapter switched off (the frozen copy needs nothing)."""
        return self.model.disable_adapter() if self.shared else contextlib.nullcontext()

    def steering(self, coeffs: torch.Tensor | None = None) -> Any:
        if coeffs is None:
            return self.spec.teacher(self.model)
        from ..core.steering import add_direction

        if hasattr(self.spec, "check"):
            self.spec.check(self.model)
        return add_direction(self.model, self.spec.direction, self.spec.layer, coeffs)


def in_float32(head: Any) -> Any:
    """`head` applied outside autocast to float32 hidden states: float32 logits under a bf16 autocast."""
    def run(hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            return head(hidden.float())
    return run


@dataclass
class RowPlan:
    """Beyond the paper: what each rollout row of a step gets (None everywhere = the method as published).

    coeffs: [N] teacher steering coefficient per row (None: the spec's coefficient on every row);
    sequence_weights: [N] loss weight per row; position_weights: [N, L] loss weight per completion position;
    contrast: [N] bool, the rows that answer contrast prompts; gate: [N] g of each row's prompt (gated teacher).
    """

    coeffs: torch.Tensor | None = None
    sequence_weights: torch.Tensor | None = None
    position_weights: torch.Tensor | None = None
    contrast: torch.Tensor | None = None
    gate: torch.Tensor | None = None


@contextlib.contextmanager
def greedy_rows(model: Any, rows: Sequence[int]):
    """Rows `rows` of a sampled `generate` take their argmax token at every step (beyond the paper: the
    greedy continuation among a contrast prompt's rollouts, where a refusal shows first).

    A forward hook on the causal LM leaves those rows only their argmax; entered before
    `core.sampling.seeded_sampling`, whose hook then runs second and can only draw that token.
    """
    from ..core.anatomy import unwrap_model

    if not rows:
        yield
        return
    index = torch.as_tensor(list(rows), dtype=torch.long)

    def hook(_module, _args, output):
        last = output.logits[:, -1].clone()
        idx = index.to(last.device)
        forced = torch.full_like(last[idx], float("-inf"))
        forced.scatter_(-1, last[idx].argmax(-1, keepdim=True), 0.0)
        last[idx] = forced
        output.logits = last[:, None, :]
        return output

    handle = unwrap_model(model).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """Localized on-policy distillation of `spec`'s steered teacher into `model` on the safety tokens."""

    def __init__(self, model: Any, tokenizer: Any, spec: Any, safety_ids: Sequence[int], prompts: Sequence[Any],
                 config: TrainConfig, out_dir: str | Path, run_info: dict | None = None, progress: bool = True,
                 contrast_prompts: Sequence[Any] | None = None, gate: Any = None, split_seed: int | None = None):
        """`contrast_prompts` and `gate` (beyond the paper) default to what `config` asks for: the contrast set
        named by config.contrast (built-in splits by `split_seed`, default: run_info's data.split_seed, else 0)
        and, with config.gate on, OUT/gate.json (fitted there first if missing)."""
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
        if split_seed is None:
            split_seed = int(self.run_info.get("data", {}).get("split_seed", 0) or 0)
        self.contrast: list[str] = []
        if config.uses_contrast:
            from ..io.prompts import contrast_prompts as load_contrast

            chosen = contrast_prompts if contrast_prompts is not None else load_contrast(config.contrast, split_seed)
            self.contrast = prompt_texts(chosen)
            if not self.contrast:
                raise SafesteerError("contrast prompts are switched on but the contrast set is empty")
        self.gate = None
        self.gate_values: dict[str, float] = {}  # g of each harmful prompt, read once from the base model
        if config.gate == "on":
            self.gate = gate if gate is not None else self._gate(model, tokenizer, split_seed)
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
        use_bf16 = config.bf16 == "on" or (config.bf16 == "auto" and fast_bf16(device))
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
        # Under autocast the output heads make the logits the loss compares. In float32 they stay exact: on a CPU
        # that costs ~3% of a step (bf16 pays off in the decoder layers), on CUDA the bf16 head is kept.
        head_choice = config.head_dtype if config.head_dtype != "auto" else "autocast" if device.type == "cuda" else "float32"
        weights_dtype = getattr(getattr(self.student_head, "weight", None), "dtype", None)
        self.float32_head = use_bf16 and head_choice == "float32" and weights_dtype == torch.float32
        if self.float32_head or not use_bf16:
            head_runs_in = str(weights_dtype).replace("torch.", "")
        else:
            head_runs_in = "bfloat16"
        self.precision = {"autocast": "bfloat16" if use_bf16 else "off", "head": head_runs_in}
        # With the adapter only from the steering layer up, student and teacher agree below it, so one pass
        # there serves both. Only in a single process: a DDP/FSDP wrapper must see the student's whole forward.
        self.share_lower_layers = (config.lora_layers == "from_steering" and self.accelerator.num_processes == 1
                                   and self.accelerator.unwrap_model(self.model) is self.model)
        self.step = 0
        self.order = data_order(len(self.prompts), config)
        self.contrast_order = (data_order(len(self.contrast), config, config.contrast_prompts_per_step, "contrast")
                               if self.contrast else [])
        self.merged = False
        # Steps skipped because their loss or gradient norm was NaN or infinite: in all, and the current run
        # of them (kept in the checkpoint, so a resumed run stops after as many in a row as one that ran through).
        self.nonfinite_skips = self.nonfinite_in_a_row = 0
        self._resume()

    def _gate(self, model: Any, tokenizer: Any, split_seed: int) -> Any:
        """OUT/gate.json if there is one (made by `safesteer gate` for this direction), else fitted there now."""
        from ..teacher.gate import GATE_META, GateConfig, direction_sha, load_gate, run_gate_stage

        if (self.out / GATE_META).is_file():
            gate = load_gate(self.out, model)
            if gate.meta.get("direction_sha256") != direction_sha(self.spec) or gate.layer > self.spec.layer:
                raise SafesteerError(f"{self.out / GATE_META} was fitted for another refusal direction; rerun "
                                     f"`safesteer gate --out {self.out} --force`")
            return gate
        if parallel.world_size() > 1:
            raise SafesteerError(f"gate=on needs {self.out / GATE_META}; run `safesteer gate --out {self.out}` first")
        print(f"[gate] no gate in {self.out}: fitting one (`safesteer gate` does this stage alone, and also measures "
              f"its separation on evaluation-only prompts)")
        # The held-out measurements change nothing in the gate and are half of the forwards: training skips them.
        gate = run_gate_stage(model, tokenizer, self.run_info.get("base_model", {}), self.out, self.spec,
                              GateConfig(seed=split_seed, evaluate=False), progress=self.progress)
        release_freed_memory()  # the fit's bf16 weight copy and batches: training's peak should not sit on them
        return gate

    # -- one step ------------------------------------------------------------------------------

    def train_step(self, instructions: list[str], positions: Sequence[int] | None = None,
                   contrast: Sequence[str] = (), contrast_positions: Sequence[int] = ()) -> dict:
        """Rollouts for these prompts, then one update on them; returns the step's metrics.

        `positions` are the prompts' places in the data order (default: the step's first places); they
        seed the rollouts, so a prompt gets the same samples on any process. With several processes
        each passes its shard and the returned metrics are those of the whole step. `contrast` prompts
        (beyond the paper), at `contrast_positions` of their own order, join the same rollout batch after
        the harmful ones, seeded from a namespace of their own.
        """
        from ..eval.judges import is_refusal
        from .rollout import RolloutModel, rollout_dtype, sample_rollouts

        cfg = self.config
        if positions is None:
            positions = range(self.step * cfg.prompts_per_step, self.step * cfg.prompts_per_step + len(instructions))
        t0 = time.perf_counter()
        phase(f"rollout:{self.step + 1}")
        student = self.accelerator.unwrap_model(self.model)  # sampling needs no gradient synchronisation
        if getattr(self, "rollout_model", None) is None:  # a persistent bf16 copy to sample from (rollout.RolloutModel)
            self.rollout_model = RolloutModel(student, rollout_dtype(cfg.generation_dtype, student, self.accelerator))
        sampler = self.rollout_model.synced(student)  # the copy with this step's trainable weights, or the student
        seeds = rollout_seeds(cfg.seed, positions, cfg.rollouts_per_prompt)
        harmful, n_harmful = list(instructions), len(instructions) * cfg.rollouts_per_prompt
        if contrast:  # beyond the paper: the contrast prompts after the harmful ones, in the same batch
            seeds = seeds + rollout_seeds(f"contrast/{cfg.seed}", contrast_positions, cfg.rollouts_per_prompt)
            instructions = harmful + list(contrast)
        greedy = [n_harmful + j * cfg.rollouts_per_prompt for j in range(len(contrast))] if cfg.contrast_greedy else []
        with greedy_rows(sampler, greedy), seeded_sampling(sampler, seeds, cfg.temperature, cfg.top_p):
            batch = sample_rollouts(sampler, self.tokenizer, instructions, cfg.rollouts_per_prompt, cfg.max_new_tokens,
                                    cfg.temperature, cfg.top_p, self.eot_ids)
        plan = self.row_plan(batch, harmful)  # None: the method as published
        row = {"step": self.step + 1, "time_rollout_s": time.perf_counter() - t0,
               "rollout_dtype": self.rollout_model.dtype_name or str(next(student.parameters()).dtype)[6:],
               **(self.update(batch) if plan is None else self.update(batch, plan))}
        self.step += 1
        n_tokens = batch.n_tokens
        refused = [is_refusal(r) for r in batch.responses]
        rates = {"rollout_refusal_rate": sum(refused[:n_harmful]) / n_harmful}  # the harmful rollouts'
        if self.contrast:  # each group's own rates over all processes (they may hold unequal shares of a group)
            groups = {"rollout_refusal_rate": (sum(refused[:n_harmful]), n_harmful),
                      "contrast_refusal_rate": (sum(refused[n_harmful:]), len(refused) - n_harmful)}
            if cfg.contrast_greedy:
                groups["contrast_greedy_refusal_rate"] = (sum(refused[i] for i in greedy), len(greedy))
            rates = self._global_means(groups)
            row["contrast_example"] = batch.responses[n_harmful][:160] if len(refused) > n_harmful else ""
        row.update(**rates,
                   completion_tokens=sum(n_tokens) / len(n_tokens),
                   finished_rate=sum(batch.finished) / len(batch.finished),
                   time_step_s=time.perf_counter() - t0, example=batch.responses[0][:160])
        return parallel.reduce_metrics(row, len(batch.responses), sum(n_tokens))

    def lower_pass(self, inputs: dict, batch: Any) -> Any:
        """The residual stream entering the steering layer (a core.steering.LayerInput), computed once per batch.

        Valid for teacher and student alike only because no adapter sits below that layer
        (lora_layers=from_steering). It runs in eval mode like the teacher: a base model with dropout
        would, in the unshared path, drop units in the student's lower layers, here it does not.
        Each prompt's positions run once for its G rollouts (`capture_layer_input_grouped`).
        """
        from ..core.steering import capture_layer_input_grouped

        self.model.eval()
        with torch.no_grad(), self.autocast():
            return capture_layer_input_grouped(self.model, self.spec.layer, self.config.rollouts_per_prompt,
                                               batch.prompt_len, **inputs)

    def score(self, batch: Any, timings: dict | None = None, plan: RowPlan | None = None) -> Any:
        """The loss between teacher and student on the rollouts (a loss.DistillationOutput), not back-propagated.

        With `share_lower_layers` the layers below the steering layer run once, under no_grad, and
        both models start at the steering layer from their output; otherwise each runs every layer. From
        there on each prompt's positions run once for its rollouts (`core.steering.scored_hidden_grouped`),
        except in a student with LoRA dropout, whose rollouts must each draw their own dropout units.
        `timings`, if given, receives the teacher's seconds (shared pass included) and when it ended.
        `plan` (beyond the paper) gives rows their own teacher coefficients and loss weights.
        """
        from ..core.loss import distillation_loss

        plan = plan or RowPlan()
        cfg = self.config
        inputs = batch.model_inputs()
        t0 = time.perf_counter()
        start = self.lower_pass(inputs, batch) if self.share_lower_layers else None
        group = cfg.rollouts_per_prompt  # from the shared pass on, each prompt's columns run once for its rollouts
        teacher_hidden = self.teacher.scored_hidden(inputs, batch, group, self.autocast, start, plan.coeffs)
        t1 = time.perf_counter()
        self.model.train()
        with self.autocast():
            student_group = group if cfg.lora_dropout == 0 else 1  # 1: not grouped
            student_hidden = None if start is None else scored_hidden_grouped(self.model, start, student_group,
                                                                              batch.prompt_len, **inputs)
            if student_hidden is None:
                with starting_at(self.model, start):
                    student_hidden = batch.scored_hidden(final_hidden_states(self.model, **inputs))
            student_head, teacher_head = self.student_head, self.teacher.head
            if self.float32_head:
                student_head, teacher_head = in_float32(student_head), in_float32(teacher_head)
            out = distillation_loss(student_hidden, teacher_hidden, student_head, teacher_head,
                                    self.safety_ids, batch.completion_mask, variant=cfg.loss,
                                    chunk_size=cfg.chunk_size, target_ids=batch.completion_ids,
                                    sequence_weights=plan.sequence_weights, position_weights=plan.position_weights)
        if timings is not None:
            timings.update(teacher=t1 - t0, teacher_end=t1)
        return out

    def update(self, batch: Any, plan: RowPlan | None = None) -> dict:
        """Teacher and student score the rollouts; one optimizer step on the loss between them.

        A step whose loss or gradient norm is NaN or infinite (on any process) is skipped: no optimizer
        step and the gradients dropped, so weights and optimizer state stay as they were; the row says so
        (skipped_nonfinite) and counts them (nonfinite_skips). `train` stops after too many in a row.
        """
        cfg = self.config
        timings: dict = {}
        out = self.score(batch, timings, plan)
        t1 = timings["teacher_end"]
        lr = self.scheduler.get_last_lr()[0]
        grad_norm = math.nan
        # The same decision on every process: under DDP a backward on only some of them would hang the others.
        finite = self._finite_everywhere(out.loss.detach())
        if finite:
            # Through the accelerator: under DDP the student's forward and this backward synchronise the gradients.
            # (DeepSpeed steps inside its engine's backward: there only a non-finite loss is caught.)
            self.accelerator.backward(out.loss * self._loss_scale(len(batch.responses), plan))
            norm = self.accelerator.clip_grad_norm_(self.params, cfg.max_grad_norm)
            grad_norm = math.nan if norm is None else float(norm)  # DeepSpeed clips inside its engine
            finite = norm is None or self._finite_everywhere(norm)
        phase(f"optimizer-step:{self.step + 1}")
        if finite:
            self.optimizer.step()
        with warnings.catch_warnings():  # the schedule follows the step number, skipped steps included
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)  # a skipped step's NaN gradients go here
        self.model.eval()
        self.nonfinite_skips += not finite
        self.nonfinite_in_a_row = 0 if finite else self.nonfinite_in_a_row + 1
        return {"loss": float(out.loss.detach()), **out.stats, "grad_norm": grad_norm, "lr": lr,
                "skipped_nonfinite": not finite, "nonfinite_skips": self.nonfinite_skips,
                **self._plan_metrics(out.per_sequence, plan),
                "time_teacher_s": timings["teacher"], "time_student_s": time.perf_counter() - t1}

    @staticmethod
    def _finite_everywhere(value: Any) -> bool:
        """True when `value` (a number or a one-element tensor) is finite on every process."""
        bad = torch.tensor([0.0 if math.isfinite(float(value)) else 1.0])
        return float(parallel.all_reduce_sum(bad)[0]) == 0.0

    # -- beyond the paper: per-row teacher coefficients and loss weights ------------------------------

    def row_plan(self, batch: Any, harmful: Sequence[str]) -> RowPlan | None:
        """This step's rows (harmful first, then contrast): teacher coefficients and loss weights; None when
        no extension is on (the method as published). The same fields on every process, whatever its shard."""
        cfg = self.config
        if not (self.contrast or self.gate is not None or cfg.uses_opening_weight):
            return None
        n, n_harmful = len(batch.responses), len(harmful) * cfg.rollouts_per_prompt
        plan = RowPlan()
        if self.contrast or self.gate is not None:
            coeff = torch.full((n_harmful,), float(getattr(self.spec, "coeff", 1.0)))
            if self.gate is not None:
                plan.gate = self._gate_of(harmful).repeat_interleave(cfg.rollouts_per_prompt)
                coeff = coeff * plan.gate
            plan.coeffs = torch.cat([coeff, torch.full((n - n_harmful,), float(cfg.contrast_coeff))])
        if self.contrast:
            plan.contrast = torch.arange(n) >= n_harmful
            plan.sequence_weights = torch.where(plan.contrast, float(cfg.contrast_weight), 1.0)
        if cfg.uses_opening_weight:
            plan.position_weights = torch.ones(batch.completion_mask.shape)
            plan.position_weights[:, : cfg.opening_tokens] = cfg.opening_weight
        return plan

    def _gate_of(self, prompts: Sequence[str]) -> torch.Tensor:
        """g of each prompt, read from the base model (adapter off) once and remembered: it never changes."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self.gate_values]
        if missing:
            self.teacher.model.eval()
            with self.teacher.base():
                values = self.gate.values(self.teacher.model, self.tokenizer, missing)
            self.gate_values.update(zip(missing, values.tolist()))
        return torch.tensor([self.gate_values[p] for p in prompts], dtype=torch.float32)

    @staticmethod
    def _global_means(pairs: dict[str, tuple[float, float]]) -> dict[str, float]:
        """{name: (sum, count)} added up over processes -> {name: sum / count} (NaN without a count)."""
        flat = parallel.all_reduce_sum(torch.tensor([x for pair in pairs.values() for x in pair],
                                                    dtype=torch.float64)).tolist()
        return {k: flat[2 * i] / flat[2 * i + 1] if flat[2 * i + 1] else math.nan for i, k in enumerate(pairs)}

    def _loss_scale(self, n_rows: int, plan: RowPlan | None) -> float:
        """Factor on this process's loss so that DDP's gradient average is the gradient of the global loss:
        `parallel.loss_weight` for a mean over rows; for a weighted mean, this process's share of the weights."""
        if plan is None or plan.sequence_weights is None or parallel.world_size() == 1:
            return parallel.loss_weight(n_rows)
        local = float(plan.sequence_weights.sum())
        total = float(parallel.all_reduce_sum(torch.tensor([local], dtype=torch.float64))[0])
        return local * parallel.world_size() / total

    def _plan_metrics(self, per_sequence: torch.Tensor, plan: RowPlan | None) -> dict:
        """The harmful and contrast rows' own losses, and the gate's mean value on the harmful rows."""
        out: dict[str, float] = {}
        if plan is None:
            return out
        if plan.contrast is not None:
            loss = per_sequence.detach().double().cpu()
            has = ~torch.isnan(loss)
            groups = {}
            for name, rows in (("harmful_loss", ~plan.contrast & has), ("contrast_loss", plan.contrast & has)):
                groups[name] = (float(loss[rows].sum()), int(rows.sum()))
            out.update(self._global_means(groups))
        if plan.gate is not None:
            out.update(self._global_means({"teacher_gate_mean": (float(plan.gate.sum()), len(plan.gate))}))
        return out

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
            extra = {}
            if self.contrast:  # beyond the paper: this step's contrast prompts, from their own data order
                at = self.step * cfg.contrast_prompts_per_step
                c_positions = parallel.shard(range(at, at + cfg.contrast_prompts_per_step))
                extra = {"contrast": [self.contrast[self.contrast_order[i]] for i in c_positions],
                         "contrast_positions": c_positions}
            step_seed(cfg.seed, self.step)
            row = self.train_step(instructions, positions, **extra)
            if main:
                append_jsonl(self.out / "metrics.jsonl", [row])
            rows.append(row)
            if self.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                first = self.step - self.nonfinite_in_a_row + 1
                raise SafesteerError(f"training stopped: the loss or gradient norm was NaN or infinite in "
                                     f"{self.nonfinite_in_a_row} steps in a row (steps {first}-{self.step}, skipped "
                                     f"without changing the weights); lower --learning-rate, use --bf16 off or "
                                     f"--dtype float32, and start again with a new --out")
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
        record = {"format": CHECKPOINT_FORMAT, "step": self.step, "order": self.order, "config": asdict(self.config),
                  "prompts_sha256": sha256_texts(self.prompts), "safety_ids": self.safety_ids.tolist(),
                  "nonfinite_skips": self.nonfinite_skips, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                  # what the run trains from (base model, stage artifacts): align compares it before resuming
                  "run_info": self.run_info}
        if self.contrast:
            record.update(contrast_order=self.contrast_order, contrast_sha256=sha256_texts(self.contrast))
        return record

    def save_checkpoint(self) -> Path:
        """Every process gathers the full state (FSDP needs all of them); the main process writes it."""
        student = self.accelerator.unwrap_model(self.model)
        weights = parallel.trainable_state(student)
        optimizer = parallel.optimizer_state(student, self.optimizer)
        if not self.accelerator.is_main_process:
            # write_checkpoint refuses non-finite weights on the main process; the others check the same full
            # weights, so that all of them stop together instead of waiting for it.
            require_finite(weights, f"the checkpoint of step {self.step}")
        else:
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
        self.contrast_order = list(state.get("contrast_order", self.contrast_order))
        self.nonfinite_skips = int(state.get("nonfinite_skips", 0))  # absent in checkpoints from before the count
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
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
            "precision": self.precision,
            "steps_done": self.step,
            "saved_as": "adapter" if (self.config.finetune == "lora" and not self.config.merge) else "model",
            "train_prompts": {"n": len(self.prompts), "sha256": sha256_texts(self.prompts)},
            "direction": {"layer": getattr(self.spec, "layer", None), "coeff": getattr(self.spec, "coeff", None)},
            **self._beyond_paper_record(),
            "safety_tokens": {"ids": self.safety_ids.tolist(),
                              "texts": [self.tokenizer.decode([i]) for i in self.safety_ids.tolist()]},
            "final_metrics": metrics[-1] if metrics else None,
            "versions": {"safesteer": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "peft": peft_version},
            **self.run_info,
        }

    def _beyond_paper_record(self) -> dict:
        """The declared extensions of method.md this run uses (an empty list: the method as published)."""
        from .config import PRESET_HELP

        cfg = self.config
        record: dict[str, Any] = {"beyond_paper": cfg.beyond_paper, "preset_help": PRESET_HELP.get(cfg.preset)}
        if self.contrast:
            record["contrast_prompts"] = {"source": cfg.contrast, "n": len(self.contrast),
                                          "sha256": sha256_texts(self.contrast), "per_step": cfg.contrast_prompts_per_step,
                                          "weight": cfg.contrast_weight, "teacher_coeff": cfg.contrast_coeff,
                                          "greedy_rollout": cfg.contrast_greedy}
        if cfg.uses_opening_weight:
            record["opening_weight"] = {"tokens": cfg.opening_tokens, "weight": cfg.opening_weight}
        if self.gate is not None:
            meta = self.gate.meta or {}
            record["gate"] = {"layer": self.gate.layer, "shape": self.gate.shape, "kind": meta.get("kind"),
                              "thresholds": {"low": self.gate.low, "high": self.gate.high},
                              "chosen": meta.get("chosen"), "mean_gate": meta.get("mean_gate")}
        return record

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
        # Every process holding the weights checks them (with sharded weights only the main one holds them all).
        require_finite(state_dict if state_dict is not None else model.state_dict(), f"the model to {target}")
        if self.accelerator.is_main_process:
            for stale in self.out.glob(".model.*"):  # left by a run killed while saving
                shutil.rmtree(stale, ignore_errors=True)
            tmp = temp_dir_in(self.out, ".model.")
            try:
                model.eval()
                model.save_pretrained(tmp, state_dict=state_dict)
                self.tokenizer.save_pretrained(tmp)
                write_json_atomic(tmp / "safesteer.json", self.run_record())
                phase("model-files")
                old = self.out / ".model.old"
                if target.exists():  # moved aside in one rename: a kill never leaves a half-deleted OUT/model
                    os.replace(target, old)
                    phase("model-swap")  # no OUT/model now: a rerun saves it again from the final checkpoint
                replace_dir(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            except Exception as exc:
                if is_disk_full(exc, self.out):  # the partial files (removed below) still fill the disk
                    raise disk_full_error("the trained model", self.out) from exc
                raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return target
