"""Stage 3 rollouts: the student answers each training prompt G times, and the masks say what counts.

    batch = sample_rollouts(student, tokenizer, instructions, rollouts_per_prompt=8, max_new_tokens=512)
    inputs = batch.model_inputs()      # what to run through student and teacher
    mask, targets = batch.completion_mask, batch.completion_ids

Sampling is plain ancestral sampling from the student (temperature 1, top_p 1, no top-k, no
repetition penalty from the model's generation config: `core.sampling.plain_sampling`), without
steering: the method is on-policy.

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
        out = generate_batch(model, tokenizer, formatted, config, eot_ids=eot_ids)
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
