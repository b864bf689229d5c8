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


def test_left_padded_puts_the_padding_before_each_rows_tokens():
    from safesteer.core.forward import left_padded

    ids, mask = left_padded([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert ids.dtype == mask.dtype == torch.long


def test_shared_prefix_length():
    from safesteer.core.forward import shared_prefix_length

    system = list(range(100, 112))  # a 12-token system turn
    assert shared_prefix_length([system + [1, 2], system + [3], system + [1, 4, 5]]) == 12
    assert shared_prefix_length([system + [1, 2], system + [1, 3]]) == 13  # longer where the prompts agree further
    assert shared_prefix_length([system, system + [7, 8]]) == 11  # every prompt keeps a token of its own
    assert shared_prefix_length([system + [1, 2, 3], system + [4, 5, 6]], keep=4) == 11  # ... or `keep` of them
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5]], minimum=4) == 0  # under the minimum: not worth a pass
    assert shared_prefix_length([[9] + system, [8] + system]) == 0
    assert shared_prefix_length([[5]]) == 0 and shared_prefix_length([]) == 0


def test_repeated_cache_leaves_the_original_as_it_was():
    from transformers.cache_utils import DynamicCache

    from safesteer.core.forward import repeated_cache

    cache = DynamicCache()
    keys, values = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)
    cache.update(keys.clone(), values.clone(), 0)
    out = repeated_cache(cache, 3)
    assert out.layers[0].keys.shape[0] == 6 and torch.equal(out.layers[0].keys[3], keys[1])  # row-major repeats
    assert torch.equal(cache.layers[0].keys, keys) and cache.layers[0].keys.shape[0] == 2
