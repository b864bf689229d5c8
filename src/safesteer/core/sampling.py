"""Where the randomness of a run comes from: per-row seeded sampling and per-step seeds.

    seeds = rollout_seeds(seed, positions, per_prompt=8)     # one stream per completion
    with plain_sampling(model), seeded_sampling(model, seeds, temperature, top_p):
        model.generate(..., do_sample=True)                  # row i draws from its own stream
    step_seed(seed, step)                                    # python/numpy/torch before a training step

Rollouts are seeded per completion: completion g of the prompt at data-order position i uses its
own random stream, seeded from (seed, i, g). A prompt therefore gets the same rollouts whichever
process samples it, whatever else is in the batch and whichever run it is resumed in: 1 process and
N processes train on the same samples. The global generators are reseeded at every training step
from (seed, process, step), so they never carry state from one step to the next and a resumed run
needs no saved RNG state.
"""

from __future__ import annotations

import hashlib
import random
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from ..errors import SafesteerError
from ..parallel import rank, synced_generation
from .anatomy import unwrap_model


def step_seed(seed: int, step: int) -> None:
    """Seed python, numpy and torch for one step from (seed, process, step).

    The global generators then never carry state from step to step: a resumed run draws what an
    uninterrupted one on as many processes would (dropout, if enabled), and one resumed on another
    process count draws from well-defined streams. Rollouts do not use them at all (`seeded_sampling`).
    """
    import numpy as np

    value = _mix("step", seed, rank(), step)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


def _mix(*parts: Any) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def rollout_seed(seed: int, position: int, sample: int) -> int:
    """Seed of completion `sample` of the prompt at data-order `position` (unique per step and prompt)."""
    return _mix("rollout", seed, position, sample)


def rollout_seeds(seed: int, positions: Sequence[int], per_prompt: int) -> list[int]:
    """Seeds for a prompt-major rollout batch (rows g = 0..per_prompt-1 of each prompt in turn)."""
    return [rollout_seed(seed, p, g) for p in positions for g in range(per_prompt)]


def _gumbel_choice(logits: torch.Tensor, generators: Sequence[torch.Generator], temperature: float,
                   top_p: float) -> torch.Tensor:
    """One token per row, drawn from softmax(logits / T) restricted to the top-p nucleus, by Gumbel-max.

    argmax(log p + G) with G ~ Gumbel(0, 1) is an exact sample of p. Each row's noise comes from its
    own generator, so a row's draw does not depend on the other rows of the batch. The nucleus is the
    one transformers' top-p warper keeps: the smallest set of most probable tokens whose mass reaches
    top_p (at least one token).
    """
    scores = logits.double() / temperature  # float64 noise: float32 would cut off the Gumbel tail near 17
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1)
        mass = sorted_scores.softmax(-1).cumsum(-1)
        drop = mass <= 1 - top_p
        drop[..., -1] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    noise = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device, dtype=torch.float64)
                         for g in generators])
    gumbel = -torch.log(-torch.log(noise))  # u = 0 gives -inf: that token is simply never drawn
    return (scores + gumbel).argmax(-1)


@contextmanager
def seeded_sampling(model: Any, seeds: Sequence[int], temperature: float = 1.0, top_p: float = 1.0) -> Iterator[None]:
    """Make `model.generate(do_sample=True)` sample row i from its own stream seeded with seeds[i].

    A forward hook on the causal LM draws each row's next token (`_gumbel_choice`) and hands
    `generate` logits that put all the mass on it, so the sampler that follows can only pick that
    token. The distribution is unchanged (same temperature and nucleus); what changes is that the
    randomness belongs to the row, not to the batch. Used around `train.rollout.sample_rollouts`.
    """
    base = unwrap_model(model)
    seeds = list(seeds)
    generators: list[torch.Generator] = []

    def hook(_module, _args, output):
        logits = output.logits[:, -1]
        if logits.shape[0] != len(seeds):
            raise SafesteerError(f"seeded sampling got {logits.shape[0]} rows but {len(seeds)} seeds")
        if not generators:
            generators.extend(torch.Generator(device=logits.device).manual_seed(s) for s in seeds)
        chosen = _gumbel_choice(logits, generators, temperature, top_p)
        onehot = torch.full_like(logits, float("-inf"))
        onehot.scatter_(-1, chosen[:, None], 0.0)
        output.logits = onehot[:, None, :]
        return output

    handle = base.register_forward_hook(hook)
    try:
        with synced_generation(model):
            yield
    finally:
        handle.remove()


@contextmanager
def plain_sampling(model: Any) -> Iterator[None]:
    """Sample from the model's own distribution: hide generation-config extras such as a repetition
    penalty or min_p that a hub model ships with, which would make the rollouts off-policy."""
    from transformers import GenerationConfig as HFGenerationConfig

    base = unwrap_model(model)
    saved = base.generation_config
    base.generation_config = HFGenerationConfig(
        bos_token_id=saved.bos_token_id, eos_token_id=saved.eos_token_id, pad_token_id=saved.pad_token_id
    )
    try:
        yield
    finally:
        base.generation_config = saved
