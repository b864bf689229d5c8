"""Stage 3 settings: `TrainConfig`, its presets and the preset a machine gets by default.

    config = TrainConfig.from_preset("cpu", family="qwen", steps=3)    # a preset, then overrides
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from ..core.loss import LOSS_VARIANTS
from ..errors import SafesteerError
from ..utils import check_choice, help_field

FINETUNE_MODES = ("lora", "full")
GATE_MODES = ("off", "on")
LORA_LAYERS = ("all", "from_steering")

# Learning rates of the released runs (full fine-tune, 32 completions per step).
PAPER_LR = {"qwen": 1e-5, "llama": 1e-6}


@dataclass
class TrainConfig:
    """Training settings. The defaults are the "cpu" preset; `TrainConfig.from_preset` gives the others."""

    preset: str = help_field("cpu", "name of the preset these settings started from (recorded, not used)")
    steps: int = help_field(12, "optimizer steps (each with fresh rollouts)")
    prompts_per_step: int = help_field(2, "training prompts per step")
    rollouts_per_prompt: int = help_field(4, "G: completions the student samples per prompt")
    max_new_tokens: int = help_field(48, "completion length limit; truncated completions stay in the loss")
    temperature: float = help_field(1.0, "rollout sampling temperature (1.0 = on-policy)")
    top_p: float = help_field(1.0, "rollout nucleus sampling (1.0 = on-policy)")
    loss: str = help_field("localized", f"loss variant: {', '.join(LOSS_VARIANTS)}")
    chunk_size: int = help_field(64, "positions per sequence scored at once by the loss (memory knob)")
    finetune: str = help_field("lora", "lora: train an adapter, teacher = adapter off; full: all weights, frozen "
                                       "teacher copy")
    lora_r: int = help_field(16, "LoRA rank")
    lora_alpha: int = help_field(32, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = help_field(0.0, "LoRA dropout (0 keeps the rollouts and the scored distribution identical)")
    lora_targets: str = help_field("all-linear", "LoRA target modules: all-linear (every linear layer but the output "
                                                 "head) or a comma list such as q_proj,k_proj,v_proj,o_proj")
    lora_layers: str = help_field("all", "decoder layers that get the LoRA adapter: all, or from_steering (the "
                                         "steering layer and above only; teacher and student then share one pass "
                                         "through the layers below it, which are neither recomputed nor "
                                         "back-propagated)")
    teacher_dtype: str = help_field("same", "full fine-tune only: dtype of the frozen teacher copy (same, bfloat16, "
                                            "float16)")
    learning_rate: float = help_field(2e-4, "peak learning rate")
    weight_decay: float = help_field(0.0, "AdamW weight decay")
    warmup_ratio: float = help_field(0.1, "fraction of the steps with linear warm-up before the cosine decay")
    max_grad_norm: float = help_field(1.0, "gradient-norm clip")
    bf16: str = help_field("auto", "bf16 autocast of the training forwards and backward (weights, optimizer state "
                                   "and loss stay float32): auto (where bf16 matrix products are fast: a CUDA device "
                                   "with bf16, a CPU with avx512_bf16/AMX), on, off")
    head_dtype: str = help_field("auto", "dtype of the output head under bf16 autocast, i.e. of the logits the loss "
                                         "compares: float32 (exact logits; ~3% of a step on a CPU), autocast (bf16 like "
                                         "the layers), auto (float32 on a CPU, autocast on CUDA)")
    generation_dtype: str = help_field("auto", "dtype the rollouts are sampled in, from a persistent copy of the student "
                                               "that gets its trainable weights before each step (training stays "
                                               "float32): auto (bfloat16 on a CPU with avx512_bf16/AMX or a CUDA device "
                                               "with bf16, else float32), float32 (bit-identical rollouts on any "
                                               "process count), bfloat16; `align` uses it for its summary's answers too")
    gradient_checkpointing: bool = help_field(False, "recompute activations in backward (saves memory, costs time)")
    checkpoint_every: int = help_field(1, "write a resumable checkpoint every N steps (and after the last)")
    max_nonfinite_steps: int = help_field(3, "stop after this many steps in a row whose loss or gradient norm is NaN "
                                             "or infinite (each such step is skipped: no update, counted in "
                                             "metrics.jsonl)")
    num_prompts: int = help_field(0, "use only the first N training prompts (0 = all)")
    merge: bool = help_field(True, "save the LoRA student merged into a plain model (else the adapter only)")
    seed: int = help_field(42, "seed of data order, rollouts and adapter initialisation")
    # Beyond the paper (method.md, "Beyond the paper"): off unless a preset or an option turns them on.
    contrast: str = help_field("", "beyond the paper: contrast prompts the student must keep answering, rolled out "
                                   "beside the harmful ones: builtin (the contrast set's train split plus plain "
                                   "harmless prompts), a prompt file or hf:NAME; empty = off")
    contrast_prompts_per_step: int = help_field(0, "beyond the paper: contrast prompts per step (0 = off)")
    contrast_weight: float = help_field(1.0, "beyond the paper: loss weight of each contrast rollout (a harmful "
                                             "rollout weighs 1)")
    contrast_coeff: float = help_field(0.0, "beyond the paper: the teacher's steering coefficient on contrast "
                                            "rollouts (0 = the unsteered model; negative subtracts the refusal "
                                            "direction)")
    contrast_greedy: bool = help_field(False, "beyond the paper: one of the rollouts of each contrast prompt is the "
                                              "student's greedy continuation (where a refusal shows first)")
    opening_tokens: int = help_field(0, "beyond the paper: the first N completion positions (where the refusal "
                                        "decision is made) get opening_weight in the loss (0 = off)")
    opening_weight: float = help_field(1.0, "beyond the paper: loss weight of the opening positions (1 = off)")
    gate: str = help_field("off", "beyond the paper: on = the teacher steers each harmful rollout by coeff x "
                                  "g(harmfulness of its prompt), a gate read at the last token of the instruction "
                                  "(OUT/gate.json, from `safesteer gate`; fitted there if missing); off = always coeff")

    def __post_init__(self):
        check_choice(self.loss, LOSS_VARIANTS, "loss")
        if self.finetune not in FINETUNE_MODES:
            raise SafesteerError(f"unknown finetune mode '{self.finetune}'; use lora or full")
        if self.lora_layers not in LORA_LAYERS:
            raise SafesteerError(f"unknown lora_layers '{self.lora_layers}'; use all or from_steering")
        if self.lora_layers == "from_steering" and self.finetune != "lora":
            raise SafesteerError("lora_layers=from_steering places a LoRA adapter; use it with finetune=lora "
                                 "or leave lora_layers at all")
        if self.bf16 not in ("auto", "on", "off"):
            raise SafesteerError("bf16 must be auto, on or off")
        if self.head_dtype not in ("auto", "float32", "autocast"):
            raise SafesteerError("head_dtype must be auto, float32 or autocast")
        if self.generation_dtype not in ("auto", "float32", "bfloat16"):
            raise SafesteerError("generation_dtype must be auto, float32 or bfloat16")
        if self.teacher_dtype not in ("same", "bfloat16", "float16"):
            raise SafesteerError("teacher_dtype must be same, bfloat16 or float16")
        for name in ("steps", "prompts_per_step", "rollouts_per_prompt", "max_new_tokens", "chunk_size",
                     "lora_r", "checkpoint_every", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise SafesteerError(f"{name} must be >= 1")
        if self.learning_rate <= 0 or self.max_grad_norm <= 0:
            raise SafesteerError("learning_rate and max_grad_norm must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise SafesteerError("warmup_ratio must be in [0, 1)")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise SafesteerError("temperature must be > 0 and top_p in (0, 1]")
        if bool(self.contrast) != (self.contrast_prompts_per_step > 0):
            raise SafesteerError("contrast prompts need both a set (contrast, e.g. builtin) and contrast_prompts_per_step "
                                 "> 0; give both, or neither to leave them off")
        if self.contrast_prompts_per_step < 0 or self.opening_tokens < 0:
            raise SafesteerError("contrast_prompts_per_step and opening_tokens must be >= 0")
        if self.contrast_weight < 0 or self.opening_weight < 0:
            raise SafesteerError("contrast_weight and opening_weight must be >= 0")
        if self.gate not in GATE_MODES:
            raise SafesteerError(f"gate must be one of: {', '.join(GATE_MODES)}")

    @property
    def uses_contrast(self) -> bool:
        return bool(self.contrast) and self.contrast_prompts_per_step > 0

    @property
    def uses_opening_weight(self) -> bool:
        return self.opening_tokens > 0 and self.opening_weight != 1.0

    @property
    def beyond_paper(self) -> list[str]:
        """The declared extensions this configuration switches on (recorded in safesteer.json)."""
        return ([f"contrast prompts ({self.contrast})"] if self.uses_contrast else []) + \
               (["opening-position loss weight"] if self.uses_opening_weight else []) + \
               (["gated teacher"] if self.gate == "on" else [])

    @classmethod
    def from_preset(cls, name: str, family: str = "qwen", **overrides: Any) -> "TrainConfig":
        """A preset's settings, then `overrides` (None values ignored). `family` picks the paper's lr."""
        check_choice(name, PRESETS, "preset")
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
# Beyond the paper: the cpu preset plus contrast prompts (their teacher the unsteered model, weighted 4, one
# greedy rollout each) and 4x weight on the first 4 completion positions, against the over-refusal the cpu
# student learns from a teacher that steers every prompt. A starting point, not a tuned setting.
PRESETS["cpu-contrast"] = {**PRESETS["cpu"], "contrast": "builtin", "contrast_prompts_per_step": 2,
                           "contrast_weight": 4.0, "contrast_coeff": 0.0, "contrast_greedy": True,
                           "opening_tokens": 4, "opening_weight": 4.0}

# Beyond the paper, the CPU default: cpu-contrast with the gated teacher on the harmful rows and a contrast teacher
# with r partly subtracted (-0.15 r), at a higher learning rate. Chosen on the tune part of the evaluation sets
# (README, "What it does on the default model"): the only setting tried whose harmful refusal matches the cpu
# preset's while its edgy over-refusal stays at or below the base's.
# Its steps score 16 rollouts, twice cpu's, in one loss chunk of up to 64 positions per rollout: no head
# recomputed in backward (32 positions per chunk, two checkpointed chunks, was the setting before the loss
# kept only one [rows, vocabulary] tensor for backward; same losses, a step ~2 s slower).
PRESETS["cpu-gated"] = {**PRESETS["cpu-contrast"], "gate": "on", "contrast_coeff": -0.15, "learning_rate": 2e-4}

# A training preset built on another one runs that preset's direction and token stages.
STAGE_PRESETS = {"cpu-contrast": "cpu", "cpu-gated": "cpu"}


def stage_preset(name: str) -> str:
    """The direction / safety-token preset that goes with training preset `name`."""
    return STAGE_PRESETS.get(name, name)


# One line per preset for --help: a preset that goes beyond the paper says so.
PRESET_HELP = {
    "paper": "the released runs: full fine-tune, 4 prompts x 8 rollouts of 512 tokens, 25 steps",
    "cpu": "a LoRA run that fits 2 CPU cores (12 steps x 2 prompts x 4 rollouts of 48 tokens)",
    "cpu-contrast": "beyond the paper: cpu plus contrast prompts (unsteered teacher, weight 4, one greedy rollout) and "
                    "4x loss weight on the first 4 completion positions, against learned over-refusal",
    "cpu-gated": "beyond the paper, the CPU default: cpu-contrast plus the gated teacher on harmful prompts and a "
                 "contrast teacher with -0.15 r, lr 2e-4: safer without more over-refusal",
}


def default_preset() -> str:
    return "paper" if torch.cuda.is_available() else "cpu-gated"
