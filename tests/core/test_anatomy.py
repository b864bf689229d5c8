import pytest
import torch

from conftest import ARCHS, make_tiny_model
from safesteer.core.anatomy import decoder_layers, end_of_turn_ids, format_prompts, post_instruction_length, unwrap_model
from safesteer.errors import SafesteerError


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_layers_found_for_every_architecture(smol_tokenizer, arch):
    model = make_tiny_model(smol_tokenizer, arch, n_layers=3)
    layers = decoder_layers(model)
    assert len(layers) == 3
    # The blocks found are the ones the forward pass runs through, in order.
    calls = []
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i, layer in enumerate(layers)]
    model(torch.tensor([[1, 2, 3]]))
    for h in handles:
        h.remove()
    assert calls == [0, 1, 2]


def test_unwrap_and_layers_through_peft(tiny_model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert unwrap_model(peft_model) is tiny_model
    assert decoder_layers(peft_model) is decoder_layers(tiny_model)


def test_unsteerable_architecture_gives_clear_error():
    class NoBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(SafesteerError, match="decoder-layer list"):
        decoder_layers(NoBlocks())


def test_post_instruction_tokens_come_from_the_template(smol_tokenizer):
    n = post_instruction_length(smol_tokenizer)
    text = format_prompts(smol_tokenizer, ["Name a fruit."])[0]
    ids = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
    suffix = smol_tokenizer.decode(ids[-n:])
    assert suffix == "<|im_end|>\n<|im_start|>assistant\n"
    assert "fruit" in smol_tokenizer.decode(ids[: -n])


def test_post_instruction_length_follows_a_changed_template(smol_tokenizer):
    import copy

    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\nAnswer:{% endif %}")
    assert post_instruction_length(tok) == post_instruction_length(smol_tokenizer) + len(
        tok("Answer:", add_special_tokens=False)["input_ids"])


def test_end_of_turn_ids_from_template(smol_tokenizer):
    ids = end_of_turn_ids(smol_tokenizer)
    assert smol_tokenizer.convert_tokens_to_ids("<|im_end|>") in ids


# ----------------------------------------------------------------------------- layers two models share


def test_identical_lower_layers_counts_the_equal_layers_from_the_bottom(smol_tokenizer):
    import copy

    from conftest import perturbed_copy
    from safesteer.core.anatomy import identical_lower_layers

    model = make_tiny_model(smol_tokenizer, "qwen2", n_layers=4)
    assert identical_lower_layers(model, copy.deepcopy(model)) == 3  # all but the last: a forward starts below it
    assert identical_lower_layers(model, perturbed_copy(model)) == 1  # noise in layer 1
    top_only = copy.deepcopy(model)
    with torch.no_grad():
        decoder_layers(top_only)[3].mlp.down_proj.weight.add_(1e-3)
    assert identical_lower_layers(model, top_only) == 3
    embedding = copy.deepcopy(model)
    with torch.no_grad():
        embedding.get_input_embeddings().weight[5, 0] += 1e-6  # one value, a rounding step
    assert identical_lower_layers(model, embedding) == 0
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert identical_lower_layers(model, half) == 0  # another dtype computes otherwise
    other_config = copy.deepcopy(model)
    other_config.config.rms_norm_eps = 1e-3
    assert identical_lower_layers(model, other_config) == 0
    assert identical_lower_layers(model, make_tiny_model(smol_tokenizer, "llama", n_layers=4)) == 0


def test_identical_lower_layers_sees_an_adapter_on_the_upper_layers(smol_tokenizer):
    import copy

    from peft import LoraConfig, get_peft_model

    from safesteer.core.anatomy import identical_lower_layers

    base = make_tiny_model(smol_tokenizer, "qwen2", n_layers=4)
    student = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                             layers_to_transform=[2, 3]))
    assert identical_lower_layers(base, student) == 2  # wrapped layers hold other parameters
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # a trained adapter (it starts at 0, i.e. equal to the base once merged)
    assert identical_lower_layers(base, student.merge_and_unload()) == 2
