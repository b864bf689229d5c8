import pytest
import torch

from conftest import ARCHS, make_tiny_model
from safesteer.core.anatomy import output_head
from safesteer.core.forward import final_hidden_states, positions_from_mask


@pytest.mark.parametrize("arch", ARCHS)
def test_final_hidden_states_and_head_reproduce_logits(smol_tokenizer, arch):
    model = make_tiny_model(smol_tokenizer, arch, n_layers=2)
    ids = torch.randint(0, len(smol_tokenizer), (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    hidden = final_hidden_states(model, ids, mask)
    logits = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(output_head(model)(hidden)[1], logits[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(output_head(model)(hidden)[0, 3:], logits[0, 3:], atol=1e-5, rtol=1e-4)


def test_final_hidden_states_with_explicit_positions_equal_the_left_padded_forward(smol_tokenizer):
    model = make_tiny_model(smol_tokenizer, "gpt2", n_layers=2)  # absolute positions: padding would shift them
    ids = torch.randint(0, len(smol_tokenizer), (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    padded = final_hidden_states(model, ids, mask, positions_from_mask(mask))
    alone = final_hidden_states(model, ids[:1, 2:], mask[:1, 2:])
    torch.testing.assert_close(padded[0, 2:], alone[0], atol=1e-5, rtol=1e-4)


def test_positions_count_real_tokens_and_put_padding_at_zero():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]
    assert positions_from_mask(mask.bool()).dtype == torch.long
