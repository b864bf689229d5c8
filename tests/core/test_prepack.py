"""core.prepack: linear layers with weights reordered once for oneDNN give the plain layers' outputs (bf16: exactly,
float32: to rounding), and every weight comes back afterwards."""

from unittest import mock

import pytest
import torch

from conftest import make_tiny_model
from safesteer.core import prepack
from safesteer.core.prepack import packable, prepack_available, prepack_linears, prepacked_linears

pytestmark = pytest.mark.skipif(not prepack_available(), reason="this torch build has no oneDNN weight reorder")


def _bf16_model(tok, tie: bool = False):
    model = make_tiny_model(tok, n_layers=2, hidden=64).to(torch.bfloat16)
    if tie:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    return model.eval()


def _linears(model):
    return {name: m for name, m in model.named_modules() if type(m) is torch.nn.Linear}


def test_packed_forward_and_greedy_generation_are_bit_identical(smol_tokenizer):
    tok = smol_tokenizer
    model = _bf16_model(tok)
    ids = torch.randint(0, len(tok), (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        plain_logits = model(input_ids=ids, attention_mask=mask).logits
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                               pad_token_id=tok.pad_token_id)
        with prepacked_linears(model) as n:
            assert n == len(_linears(model))  # every projection and the head
            packed_logits = model(input_ids=ids, attention_mask=mask).logits
            packed = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                    pad_token_id=tok.pad_token_id)
    assert torch.equal(packed_logits, plain_logits)
    assert torch.equal(packed, plain)


def test_weights_come_back_exactly_and_the_layers_are_plain_again(smol_tokenizer):
    model = _bf16_model(smol_tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    with prepacked_linears(model):
        q = model.model.layers[0].self_attn.q_proj
        assert q.weight.numel() == 0 and "forward" in q.__dict__  # not held twice while packed
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameter objects
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_a_tied_head_is_packed_without_emptying_the_embedding(smol_tokenizer):
    tok = smol_tokenizer
    model = _bf16_model(tok, tie=True)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight is embed.weight
    ids = torch.randint(0, len(tok), (2, 5))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with prepacked_linears(model):
            assert "forward" in head.__dict__ and embed.weight.numel() > 0
            assert torch.equal(model(input_ids=ids).logits, plain)
    assert head.weight is embed.weight


def test_skip_nesting_hooks_and_what_is_packable(smol_tokenizer):
    """Skipped names stay plain, a second pack packs nothing, forward hooks on a packed layer still run; plain
    bf16 and float32 linear layers are packable, fp16 ones and other module types are not."""
    model = _bf16_model(smol_tokenizer)
    skip = {"model.layers.0.mlp.down_proj"}
    seen = []
    handle = model.model.layers[1].mlp.up_proj.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    with prepacked_linears(model, skip=skip) as n:
        assert n == len(_linears(model)) - 1
        assert "forward" not in model.model.layers[0].mlp.down_proj.__dict__
        assert len(prepack_linears(model, skip=skip)) == 0  # nested: already packed or emptied
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3]]))
    handle.remove()
    assert seen and seen[0][-1] == model.config.intermediate_size
    assert packable(torch.nn.Linear(4, 4)) and packable(torch.nn.Linear(4, 4).to(torch.bfloat16))
    assert not packable(torch.nn.Linear(4, 4).to(torch.float16))
    assert not packable(torch.nn.Embedding(4, 4)) and not packable(torch.nn.Conv1d(4, 4, 1))


def test_generation_precision_packs_the_cast_layers_and_puts_the_float32_originals_back(smol_tokenizer):
    from safesteer.core.generation import generation_precision

    model = make_tiny_model(smol_tokenizer, n_layers=2, hidden=64).eval()
    originals = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    ids = torch.randint(0, len(smol_tokenizer), (2, 6))
    with torch.no_grad():
        with mock.patch.object(prepack, "prepack_available", lambda: False), generation_precision(model, torch.bfloat16):
            plain = model(input_ids=ids).logits
        with generation_precision(model, torch.bfloat16):
            q = model.model.layers[0].self_attn.q_proj
            assert "forward" in q.__dict__ and q.weight.numel() == 0
            packed = model(input_ids=ids).logits
    assert torch.equal(packed, plain)
    for n, p in model.named_parameters():  # float32 again: the very same storage and values
        assert p.dtype == torch.float32 and p.data_ptr() == originals[n][0] and torch.equal(p, originals[n][1]), n
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_without_the_reorder_nothing_is_packed(smol_tokenizer):
    model = _bf16_model(smol_tokenizer)
    with mock.patch.object(prepack, "prepack_available", lambda: False), prepacked_linears(model) as n:
        assert n == 0


def test_float32_layers_agree_to_rounding_and_come_back_bit_for_bit(smol_tokenizer):
    tok = smol_tokenizer
    model = make_tiny_model(tok, n_layers=2, hidden=64).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, len(tok), (3, 9))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with prepacked_linears(model) as n:
            assert n == len(_linears(model))
            packed = model(input_ids=ids).logits
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)  # oneDNN's order of summation, not MKL's
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_packed_copy_computes_the_layer_and_leaves_it_alone():
    from torch import nn

    from safesteer.core.prepack import packed_copy

    torch.manual_seed(0)
    layer = nn.Linear(16, 40, bias=True)
    weight = layer.weight.detach().clone()
    run = packed_copy(layer)
    x = torch.randn(5, 16)
    torch.testing.assert_close(run(x), layer(x), rtol=1e-5, atol=1e-5)  # oneDNN's float32 rounding, not MKL's
    assert torch.equal(layer.weight, weight) and "forward" not in layer.__dict__  # nothing packed in place
    assert packed_copy(nn.Linear(4, 4).to(torch.float16)) is None and packed_copy(nn.Embedding(4, 4)) is None
