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
