"""The representation shift: the PCA it draws, and forwards whose work shared with the base model runs once."""

import numpy as np
import pytest
import torch

from conftest import perturbed_copy
from safesteer.core.anatomy import decoder_layers
from safesteer.core.steering import add_direction
from safesteer.report.representation import (pca_coordinates, prompt_states, representation_shift,
                                             states_sharing_layers)

PROMPTS = ["Say hello.", "What is the capital of France?", "Name three colours, please."]


def test_pca_projects_onto_the_direction_of_largest_variance():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(50, 8)) * np.array([5.0, 1, 1, 1, 1, 1, 1, 0.1])
    coords, ratio = pca_coordinates({"base": base, "moved": base + np.eye(8)[7] * 100}, ["base"])
    pc1 = np.array(coords["base"])[:, 0]
    assert abs(np.corrcoef(pc1, base[:, 0])[0, 1]) > 0.99 and ratio[0] > 0.5
    # fitted on both, the shift along the low-variance axis becomes the first component
    coords, _ = pca_coordinates({"base": base, "moved": base + np.eye(8)[7] * 100}, ["base", "moved"])
    gap = np.array(coords["moved"])[:, 0].mean() - np.array(coords["base"])[:, 0].mean()
    assert abs(gap) == pytest.approx(100, rel=1e-6)


def test_shared_layers_give_the_states_of_full_forwards(tiny_model, smol_tokenizer):
    """Teacher (steered at layer 2) and aligned model (differs from layer 1 up) start from the base model's layer
    inputs: their states equal those of their own full forwards, and their lower layers do not run."""
    aligned = perturbed_copy(tiny_model)
    r = 2.0 * torch.randn(tiny_model.config.hidden_size, generator=torch.Generator().manual_seed(0))

    def teacher():
        return add_direction(tiny_model, r, 2, 1.0)

    calls = {"base": [0] * 4, "aligned": [0] * 4}

    def count(name, i):
        def hook(*_):
            calls[name][i] += 1
        return hook

    handles = [block.self_attn.register_forward_hook(count(name, i))
               for name, model in (("base", tiny_model), ("aligned", aligned))
               for i, block in enumerate(decoder_layers(model))]
    shared = representation_shift(tiny_model, smol_tokenizer, teacher, aligned, PROMPTS, teacher_layer=2, batch_size=2)
    for h in handles:
        h.remove()
    assert calls == {"base": [2, 2, 4, 4], "aligned": [0, 2, 2, 2]}  # two batches; base + teacher above layer 2
    with torch.no_grad():
        full = {"base": prompt_states(tiny_model, smol_tokenizer, PROMPTS, batch_size=2),
                "teacher": prompt_states(tiny_model, smol_tokenizer, PROMPTS, batch_size=2, context=teacher),
                "aligned": prompt_states(aligned, smol_tokenizer, PROMPTS, batch_size=2)}
    states = states_sharing_layers(tiny_model, smol_tokenizer, PROMPTS, batch_size=2,
                                   others={"teacher": (tiny_model, teacher, 2), "aligned": (aligned, None, 1)})
    for name in ("base", "teacher", "aligned"):
        np.testing.assert_array_equal(states[name], full[name])  # bit for bit what full forwards give
    for name in ("teacher", "aligned"):
        dist = np.linalg.norm(full[name] - full["base"], axis=1).mean()
        assert shared["shift"][name]["mean_l2"] == dist
