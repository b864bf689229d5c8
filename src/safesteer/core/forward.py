"""Plain forwards every stage shares: final hidden states without full logits, position ids, the device.

    hidden = final_hidden_states(model, input_ids, attention_mask)              # [B, T, d], after the final norm
    hidden = final_hidden_states(model, **batch.model_inputs())                 # with explicit position ids
    positions = positions_from_mask(attention_mask)                             # left padding does not shift them
    ids, mask = left_padded(token_lists, pad_id)                                # [B, T] each, padding on the left
    n = shared_prefix_length(token_lists, keep=1)                               # the chat template's system turn
    cache = repeated_cache(prefix_cache, rows)                                  # one prefix pass serves every row
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch


def final_hidden_states(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Last-layer hidden states (after the final norm) for every position: [B, T, d].

    Goes through the model's own forward (so DDP/FSDP/PEFT wrappers see the call) but asks for a
    single position of logits, so the [B, T, V] logits tensor is never built here. `position_ids`
    (e.g. from `positions_from_mask`) is passed on only when given.
    """
    positions = {} if position_ids is None else {"position_ids": position_ids}
    out = model(input_ids=input_ids, attention_mask=attention_mask, **positions, output_hidden_states=True,
                logits_to_keep=1, use_cache=False)
    return out.hidden_states[-1]


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only: 0 at each row's first unmasked token, 0 on left padding.

    Explicit positions keep models with absolute position embeddings (GPT-2) from seeing shifted
    positions under left padding, exactly as generation numbered the tokens.
    """
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def model_device(model: Any) -> torch.device:
    """The device of the model's (first) parameters."""
    return next(model.parameters()).device


def left_padded(token_lists: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as one left-padded batch on the CPU: ids [B, T] (pad_id before each row's tokens) and the
    attention mask [B, T] (1 on the tokens)."""
    width = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        ids[row, width - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
        mask[row, width - len(tokens):] = 1
    return ids, mask


def shared_prefix_length(token_lists: Sequence[Sequence[int]], keep: int = 1, minimum: int = 2) -> int:
    """How many leading tokens all `token_lists` share (the chat template's system turn: 24 of the default
    model's ~43 prompt tokens), leaving each list at least `keep` tokens of its own so the positions read off
    its end are never inside the prefix; 0 when that is under `minimum` tokens."""
    if not token_lists:
        return 0
    first = token_lists[0]
    n = max(0, min(len(t) for t in token_lists) - keep)
    for tokens in token_lists[1:]:
        n = next((k for k in range(n) if tokens[k] != first[k]), n)
    return n if n >= minimum else 0


def repeated_cache(cache: Any, n: int) -> Any:
    """A copy of a KV cache (transformers' DynamicCache) with each of its rows repeated `n` times in a row;
    `cache` itself stays as it is, to serve the next batch."""
    out = copy.deepcopy(cache)
    out.batch_repeat_interleave(n)
    return out
