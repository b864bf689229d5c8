"""The representation shift's forwards: work the base model shares with the teacher and the aligned model runs once."""

import numpy as np
import torch

from conftest import perturbed_copy
from safesteer.core.anatomy import decoder_layers
from safesteer.core.steering import add_direction
from safesteer.report.representation import prompt_states, representation_shift

PROMPTS = ["Say hello.", "What is the capital of France?", "Name three colours, please."]


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
    separate = representation_shift(tiny_model, smol_tokenizer, teacher, aligned, PROMPTS, batch_size=2)
    for name in ("teacher", "aligned"):
        assert shared["shift"][name] == separate["shift"][name]
    np.testing.assert_array_equal(np.array(shared["coords"]["base"]), np.array(separate["coords"]["base"]))
    # and the separate run is what full forwards give
    dist = np.linalg.norm(full["aligned"] - full["base"], axis=1).mean()
    assert separate["shift"]["aligned"]["mean_l2"] == dist
