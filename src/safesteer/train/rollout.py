"""Stage 3 rollouts: the student answers each training prompt G times, and the masks say what counts.

    batch = sample_rollouts(student, tokenizer, instructions, rollouts_per_prompt=8, max_new_tokens=512)
    inputs = batch.model_inputs()      # what to run through student and teacher
    mask, targets = batch.completion_mask, batch.completion_ids

Sampling is plain ancestral sampling from the student (temperature 1, top_p 1, no top-k, no
repetition penalty from the model's generation config: `core.sampling.plain_sampling`), without
steering: the method is on-policy.

Precision: `RolloutModel` keeps a persistent low-precision copy of the student to sample from (bf16 on
hardware with fast bf16 matrix units, `TrainConfig.generation_dtype`); before each step's rollouts only
the trainable weights (the LoRA adapter, or every weight of a full fine-tune) are copied into it from
the float32 student. Training keeps float32 weights, optimizer state, output heads and loss (its decoder
layers run under bf16 autocast on the same hardware: `TrainConfig.bf16`, `head_dtype`). The rollouts are
then samples of the bf16 copy's distribution, which differs from the float32 student's by bf16
rounding; the loss scores them under the student as before.

Positions: a completion token at absolute position P + j is predicted by the hidden state at
P + j - 1. `model_inputs()` therefore drops the last column (its hidden state predicts nothing),
and `scored_hidden(hidden)` slices the L hidden states that predict completion tokens 0..L-1, so
that `hidden[b, j]`, `completion_ids[b, j]` and `completion_mask[b, j]` line up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from ..core.anatomy import end_of_turn_ids, format_prompts
from ..core.forward import positions_from_mask
from ..core.generation import GenerationConfig, generate_batch
from ..core.sampling import plain_sampling
from ..errors import SafesteerError


@dataclass
class RolloutBatch:
    """G completions for each of a step's prompts, prompt-major (rows g*0..G-1 answer prompt 0)."""

    sequences: Tensor  # [N, P + L]: left-padded prompt, then the completion (padding after its end)
    attention_mask: Tensor  # [N, P + L]: real prompt tokens and valid completion tokens
    completion_mask: Tensor  # [N, L]: 1 up to and including the first end-of-turn token
    prompt_len: int  # P
    prompt_index: list[int]  # which of the step's prompts each row answers
    responses: list[str]  # decoded completions without the end-of-turn token
    finished: list[bool]  # ended with an end-of-turn token (else truncated at max_new_tokens)

    @property
    def completion_ids(self) -> Tensor:
        """[N, L] the sampled tokens, the targets whose probabilities the loss reads."""
        return self.sequences[:, self.prompt_len:]

    @property
    def n_tokens(self) -> list[int]:
        return self.completion_mask.sum(1).tolist()

    def model_inputs(self) -> dict[str, Tensor]:
        """input_ids / attention_mask / position_ids for scoring, without the last (unscored) column.

        Position ids count real tokens only, as generation did with left padding, so the scores
        belong to exactly the distribution the tokens were sampled from (absolute-position models
        such as GPT-2 would otherwise see shifted positions).
        """
        attention = self.attention_mask[:, :-1]
        return {"input_ids": self.sequences[:, :-1], "attention_mask": attention,
                "position_ids": positions_from_mask(attention)}

    def scored_hidden(self, hidden: Tensor) -> Tensor:
        """[N, P + L - 1, d] hidden states of `model_inputs()` -> the [N, L, d] that predict the completion."""
        return hidden[:, self.prompt_len - 1:]


def _low_precision_copy(model: Any, dtype: torch.dtype) -> Any:
    """A frozen eval-mode deep copy of `model` whose floating-point parameters are `dtype`.

    The parameters are cast first and handed to deepcopy through its memo, so no second float32 copy
    of the weights is ever made and tied weights stay tied. Buffers are copied as they are.
    """
    import copy

    memo: dict = {}
    for p in model.parameters():
        if id(p) not in memo:
            data = p.detach().to(dtype) if p.is_floating_point() else p.detach().clone()
            memo[id(p)] = torch.nn.Parameter(data, requires_grad=False)
    clone = copy.deepcopy(model, memo)
    return clone.eval()


class RolloutModel:
    """The model the rollouts are sampled from: the student itself, or a persistent copy in `dtype`.

        rollout_model = RolloutModel(student, torch.bfloat16)
        sampler = rollout_model.synced(student)        # before each step's rollouts
        with seeded_sampling(sampler, seeds): batch = sample_rollouts(sampler, ...)

    With a copy, `synced` copies the student's trainable parameters into it (cast to `dtype`) and
    returns it; the frozen weights were copied once, at construction (and, bf16 on a CPU, prepacked:
    `core.prepack`). Without one (dtype None, or the student already in `dtype`) it returns the student.
    """

    def __init__(self, student: Any, dtype: torch.dtype | None):
        self.dtype = dtype
        self.copy = None
        weights = [p for p in student.parameters() if p.is_floating_point()]
        if dtype is not None and any(p.dtype != dtype for p in weights):
            from ..core.generation import contiguous_head_input
            from ..core.prepack import prepack_linears

            self.copy = _low_precision_copy(student, dtype)
            self._targets = dict(self.copy.named_parameters())
            contiguous_head_input(self.copy)  # frozen bf16 head: see there (4 s per prefill otherwise)
            # The frozen layers multiply with weights reordered once for oneDNN (core.prepack: the same samples,
            # faster); the layers `synced` updates (the adapter) stay plain.
            trained = {name.rpartition(".")[0] for name, p in student.named_parameters() if p.requires_grad}
            self.prepacked = prepack_linears(self.copy, skip=trained)

    @property
    def dtype_name(self) -> str | None:
        return None if self.copy is None else str(self.dtype).replace("torch.", "")

    @torch.no_grad()
    def synced(self, student: Any) -> Any:
        if self.copy is None:
            return student
        for name, p in student.named_parameters():
            if p.requires_grad:
                self._targets[name].copy_(p.detach())
        return self.copy


def rollout_dtype(setting: str, student: Any, accelerator: Any = None) -> torch.dtype | None:
    """The dtype of the sampling copy for `TrainConfig.generation_dtype`, or None to sample from the
    student itself: with weights sharded over processes (FSDP, ZeRO-3) no process can hold a copy."""
    from ..core.generation import resolve_generation_dtype
    from ..parallel import shards_weights

    if accelerator is not None and shards_weights(accelerator):
        return None
    return resolve_generation_dtype(setting, student)


def sample_rollouts(
    model: Any,
    tokenizer: Any,
    instructions: Sequence[str],
    rollouts_per_prompt: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eot_ids: Sequence[int] | None = None,
) -> RolloutBatch:
    """Sample `rollouts_per_prompt` completions for every instruction in one left-padded batch.

    The model is put in eval mode for sampling (and left there); the caller switches modes.
    """
    if rollouts_per_prompt < 1 or max_new_tokens < 1:
        raise SafesteerError("rollouts_per_prompt and max_new_tokens must both be >= 1")
    if not instructions:
        raise SafesteerError("no prompts to roll out")
    eot_ids = list(eot_ids or end_of_turn_ids(tokenizer, model))
    formatted = [text for text in format_prompts(tokenizer, list(instructions)) for _ in range(rollouts_per_prompt)]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=top_p,
                              batch_size=len(formatted))
    model.eval()
    with plain_sampling(model):
        out = generate_batch(model, tokenizer, formatted, config, eot_ids=eot_ids, rows_per_prompt=rollouts_per_prompt)
    prompt_attention = out["attention_mask"].to(out["sequences"].device)
    mask = out["completion_mask"].to(prompt_attention.dtype)
    return RolloutBatch(
        sequences=out["sequences"],
        attention_mask=torch.cat([prompt_attention, mask], dim=1),
        completion_mask=mask,
        prompt_len=out["prompt_len"],
        prompt_index=[i for i in range(len(instructions)) for _ in range(rollouts_per_prompt)],
        responses=out["responses"],
        finished=out["finished"],
    )
