"""Where the randomness of a run comes from: per-row seeded sampling and per-step seeds.

    seeds = rollout_seeds(seed, positions, per_prompt=8)     # one stream per completion
    with seeded_sampling(model, seeds, temperature, top_p):
        sample_rollouts(model, ...)                          # row i draws from its own stream
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
from transformers import LogitsProcessor

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


def _nucleus(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """-inf outside the top-p nucleus, as transformers' top-p warper keeps it: the smallest set of most
    probable tokens whose mass reaches top_p (at least one token)."""
    sorted_scores, order = torch.sort(scores, dim=-1)
    mass = sorted_scores.softmax(-1).cumsum(-1)
    drop = mass <= 1 - top_p
    drop[..., -1] = False
    return scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def inverse_cdf_choice(logits: torch.Tensor, generators: Sequence[torch.Generator], temperature: float,
                        top_p: float) -> torch.Tensor:
    """One token per row, drawn from softmax(logits / T) restricted to the top-p nucleus, by inverse CDF.

    Row i draws one uniform u from its own generator and takes the first token whose cumulative
    probability exceeds u * total, an exact sample of the row's distribution that does not depend on
    the other rows of the batch. Float64 cumulative sums: with 150k tokens float32 rounding of the
    running sum would shift the boundaries by ~1e-3 relative; a zero-probability token is never drawn
    (its cumulative value equals its predecessor's, and the first value > u wins).
    """
    scores = logits.double() / temperature
    if top_p < 1.0:
        scores = _nucleus(scores, top_p)
    cdf = scores.softmax(-1).cumsum(-1)
    u = torch.stack([torch.rand((), generator=g, device=scores.device, dtype=torch.float64) for g in generators])
    total = cdf[:, -1]
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # u * total < total
    return torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1)


class RowSampler(LogitsProcessor):
    """A transformers logits processor that samples row i from its own stream seeded with seeds[i].

    It draws each row's next token (`inverse_cdf_choice`, at the given temperature and nucleus) and
    returns scores that keep only that token, so generation run greedily emits exactly the sample.
    """

    def __init__(self, seeds: Sequence[int], temperature: float = 1.0, top_p: float = 1.0):
        self.seeds, self.temperature, self.top_p = list(seeds), temperature, top_p
        self.generators: list[torch.Generator] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.seeds):
            raise SafesteerError(f"seeded sampling got {scores.shape[0]} rows but {len(self.seeds)} seeds")
        if not self.generators:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        chosen = inverse_cdf_choice(scores, self.generators, self.temperature, self.top_p)
        onehot = torch.full_like(scores, float("-inf"))
        return onehot.scatter_(-1, chosen[:, None], 0.0)


_ACTIVE: dict[int, RowSampler] = {}  # id of the unwrapped model -> its sampler inside `seeded_sampling`


def active_row_sampler(model: Any) -> RowSampler | None:
    """The sampler `seeded_sampling` installed for this model, if any (read by `core.generation.generate_batch`)."""
    return _ACTIVE.get(id(unwrap_model(model)))


@contextmanager
def seeded_sampling(model: Any, seeds: Sequence[int], temperature: float = 1.0, top_p: float = 1.0) -> Iterator[None]:
    """Make sampled generation through `core.generation.generate_batch` draw row i from its own stream
    seeded with seeds[i].

    Installs a `RowSampler` for the model; `generate_batch` passes it to `generate` as a logits
    processor and decodes greedily, so each step's token is the row's own sample. The distribution is
    unchanged (same temperature and nucleus); what changes is that the randomness belongs to the row,
    not to the batch. Used around `train.rollout.sample_rollouts`. Fresh streams on every entry.
    """
    key = id(unwrap_model(model))
    if key in _ACTIVE:
        raise SafesteerError("seeded_sampling is already active for this model")
    _ACTIVE[key] = RowSampler(seeds, temperature, top_p)
    try:
        with synced_generation(model):
            yield
    finally:
        _ACTIVE.pop(key, None)


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
