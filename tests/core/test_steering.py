"""Reference tests for the steering hooks on tiny random models of several architectures."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safesteer.core.anatomy import decoder_layers  # noqa: E402
from safesteer.errors import SafesteerError  # noqa: E402
from safesteer.core.steering import ablate_direction, add_direction, attention_and_mlp  # noqa: E402

V = 128
D = 32
_SMALL = dict(hidden_size=D, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=V)


def _config(arch: str):
    T = transformers
    if arch == "llama":
        return T.LlamaConfig(num_key_value_heads=2, **_SMALL)
    if arch == "qwen2":
        return T.Qwen2Config(num_key_value_heads=2, **_SMALL)
    if arch == "qwen3":
        return T.Qwen3Config(num_key_value_heads=2, head_dim=8, **_SMALL)
    if arch == "mistral":
        return T.MistralConfig(num_key_value_heads=2, **_SMALL)
    if arch == "gemma":
        return T.GemmaConfig(num_key_value_heads=2, head_dim=8, **_SMALL)
    if arch == "gemma2":  # post-attention / post-feed-forward norms before the residual add
        return T.Gemma2Config(num_key_value_heads=2, head_dim=8, **_SMALL)
    if arch == "phi3":
        return T.Phi3Config(num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, **_SMALL)
    if arch == "gpt2":
        return T.GPT2Config(n_embd=D, n_layer=3, n_head=4, n_positions=64, vocab_size=V, bos_token_id=1, eos_token_id=2)
    if arch == "gpt_neox":
        return T.GPTNeoXConfig(**_SMALL)
    raise AssertionError(arch)


ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox"]
_CACHE: dict = {}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(arch: str):
    if arch not in _CACHE:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(_config(arch)).eval()
        # Trained norms have uneven per-channel scales; the default all-ones init would hide any
        # bug that only shows when a norm rotates a vector out of the ablated subspace.
        with torch.no_grad():
            for module in model.modules():
                if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
                    module.weight.uniform_(0.5, 1.5)
        _CACHE[arch] = model
    return _CACHE[arch]


def batch(seed: int = 0):
    """Three rows; rows 1 and 2 are left-padded (the layout every safesteer stage uses)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :4] = 0
    ids[mask == 0] = 0
    return ids, mask


def logits(model, ids, mask):
    with torch.no_grad():
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits


def direction(seed: int = 1, scale: float = 3.0):
    return scale * torch.randn(D, generator=torch.Generator().manual_seed(seed))


@contextmanager
def layer_hooks(model, register):
    """The hooks `register(i, layer)` adds to each decoder layer, removed on exit."""
    handles = [register(i, layer) for i, layer in enumerate(decoder_layers(model))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_inputs(model):
    """Pre-hooks that record every decoder layer's hidden-states input (as they see it)."""
    seen: dict[int, torch.Tensor] = {}

    def make(i):
        def hook(_m, args, kwargs):
            h = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs["hidden_states"]
            seen[i] = h.detach().clone()
        return hook

    with layer_hooks(model, lambda i, layer: layer.register_forward_pre_hook(make(i), with_kwargs=True)):
        yield seen


def no_hooks_left(model) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


# ----------------------------------------------------------------------------- add_direction


@pytest.mark.parametrize("arch", ARCHS)
def test_add_changes_exactly_one_layer_input_by_coeff_r(arch):
    model = tiny(arch)
    ids, mask = batch()
    r, coeff, target = direction(), 2.5, 1
    with capture_inputs(model) as plain:
        logits(model, ids, mask)
    with capture_inputs(model) as before:  # registered first: sees each input before the steering hook
        with add_direction(model, r, target, coeff):
            with capture_inputs(model) as after:  # registered after: sees the steered input
                logits(model, ids, mask)
    real = mask.bool()
    for i in range(len(decoder_layers(model))):
        delta = after[i] - before[i]
        if i == target:
            expected = (coeff * r).expand_as(delta[real])
            torch.testing.assert_close(delta[real], expected, atol=1e-5, rtol=0)
            assert torch.equal(after[i][~real], before[i][~real]), "padding positions must stay untouched"
        else:
            assert torch.equal(after[i], before[i]), f"layer {i} input was modified by a hook for layer {target}"
        if i <= target:  # everything up to the steered layer's input is the un-steered computation
            assert torch.equal(before[i], plain[i])
    assert not torch.equal(after[target + 1], plain[target + 1])  # the change propagates downstream


@pytest.mark.parametrize("arch", ARCHS)
def test_exit_restores_logits_bit_for_bit(arch):
    model = tiny(arch)
    ids, mask = batch()
    reference = logits(model, ids, mask)
    for ctx in (lambda: add_direction(model, direction(), 1), lambda: ablate_direction(model, direction())):
        with ctx():
            assert not torch.equal(logits(model, ids, mask), reference)
        assert torch.equal(logits(model, ids, mask), reference)
        assert no_hooks_left(model)


@pytest.mark.parametrize("make", [lambda m: add_direction(m, direction(), 0), lambda m: ablate_direction(m, direction())])
def test_hooks_removed_after_an_exception(make):
    model = tiny("llama")
    ids, mask = batch()
    reference = logits(model, ids, mask)
    with pytest.raises(RuntimeError, match="boom"):
        with make(model):
            logits(model, ids, mask)
            raise RuntimeError("boom")
    assert no_hooks_left(model)
    assert torch.equal(logits(model, ids, mask), reference)


def _greedy_reference(model, ids, mask, steps):
    """Greedy decoding by full recomputation (no KV cache) under whatever hooks are active."""
    for _ in range(steps):
        nxt = logits(model, ids, mask)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gpt2", "gpt_neox"])
def test_add_works_under_generate_with_kv_cache(arch):
    model = tiny(arch)
    ids, mask = batch(3)
    r = direction(scale=20.0)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None, min_new_tokens=5,
                  temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        with add_direction(model, r, 1):
            cached = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **kwargs)
            reference = _greedy_reference(model, ids, mask, 5)
        plain = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **kwargs)
    assert torch.equal(cached, reference), "the hook must steer every cached decoding step like a full forward"
    assert not torch.equal(cached, plain)


def _one_row(ids, mask, b):
    """Row b alone, without its left padding."""
    keep = mask[b].bool()
    return ids[b:b + 1, keep], mask[b:b + 1, keep]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_per_row_coefficients_equal_each_row_steered_alone(arch):
    model = tiny(arch)
    ids, mask = batch()
    r, coeffs = direction(), torch.tensor([1.5, 0.0, -0.7])
    with add_direction(model, r, 1, coeffs):
        mixed = logits(model, ids, mask)
    for b, c in enumerate(coeffs.tolist()):
        one_ids, one_mask = _one_row(ids, mask, b)
        with add_direction(model, r, 1, c):
            alone = logits(model, one_ids, one_mask)
        torch.testing.assert_close(mixed[b, mask[b].bool()], alone[0], atol=1e-4, rtol=1e-4)
    with add_direction(model, r, 1, torch.full((3,), 2.0)):  # the same coefficient everywhere: bit-for-bit
        same = logits(model, ids, mask)
    with add_direction(model, r, 1, 2.0):
        assert torch.equal(same, logits(model, ids, mask))
    with add_direction(model, r, 1, torch.zeros(3)):  # 0 on a row is exactly the unsteered model
        zero = logits(model, ids, mask)
    assert torch.equal(zero, logits(model, ids, mask))
    with pytest.raises(SafesteerError, match="one coefficient per row"):
        with add_direction(model, r, 1, torch.ones(2)):
            logits(model, ids, mask)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_per_row_coefficients_hold_under_generate_with_kv_cache(arch):
    model = tiny(arch)
    ids, mask = batch(3)
    r, coeffs = direction(scale=20.0), torch.tensor([1.0, 0.0, -1.0])
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None, min_new_tokens=5,
                  temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        with add_direction(model, r, 1, coeffs):
            cached = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **kwargs)
            reference = _greedy_reference(model, ids, mask, 5)
        called = []

        def later():  # a callable is asked at every forward
            called.append(1)
            return coeffs

        with add_direction(model, r, 1, later):
            assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **kwargs), cached)
        assert len(called) == 5
        for b, c in enumerate(coeffs.tolist()):
            one_ids, one_mask = _one_row(ids, mask, b)
            with add_direction(model, r, 1, c):
                alone = model.generate(input_ids=one_ids, attention_mask=one_mask, use_cache=True, **kwargs)
            assert torch.equal(cached[b, -5:], alone[0, -5:]), b
    assert torch.equal(cached, reference)


def test_nested_add_hooks_add_both():
    model = tiny("qwen2")
    ids, mask = batch()
    r1, r2 = direction(1), direction(2)
    real = mask.bool()
    with capture_inputs(model) as before:
        with add_direction(model, r1, 1, 0.5), add_direction(model, r2, 1, -2.0), add_direction(model, r2, 2, 1.0):
            with capture_inputs(model) as after:
                logits(model, ids, mask)
    torch.testing.assert_close((after[1] - before[1])[real], (0.5 * r1 - 2.0 * r2).expand(int(real.sum()), -1),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close((after[2] - before[2])[real], r2.expand(int(real.sum()), -1), atol=1e-5, rtol=0)
    assert torch.equal(after[0], before[0])
    assert no_hooks_left(model)


def test_add_rejects_wrong_shape_and_layer():
    model = tiny("llama")
    with pytest.raises(SafesteerError, match="hidden size"):
        with add_direction(model, torch.ones(D + 1), 0):
            pass
    with pytest.raises(SafesteerError, match="out of range"):
        with add_direction(model, torch.ones(D), 3):
            pass
    assert no_hooks_left(model)


# ----------------------------------------------------------------------------- ablate_direction


def _along(x: torch.Tensor, unit: torch.Tensor) -> float:
    """Largest |component along unit| relative to the vector's norm, over all positions."""
    x = x.detach().double()
    return float(((x @ unit.double()).abs() / x.norm(dim=-1).clamp(min=1e-12)).max())


@pytest.mark.parametrize("arch", ARCHS)
def test_ablation_leaves_no_component_along_r(arch):
    model = tiny(arch)
    ids, mask = batch()
    r = direction()
    unit = r / r.norm()
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    with ablate_direction(model, r):
        with capture_inputs(model) as inputs:
            for i, block in enumerate(decoder_layers(model)):
                for kind, module in zip(("attn", "mlp"), attention_and_mlp(block)):
                    def hook(_m, _a, out, key=f"{kind}{i}"):
                        outputs[key] = out[0] if isinstance(out, tuple) else out
                    handles.append(module.register_forward_hook(hook))

                def block_hook(_m, _a, out, key=f"block{i}"):
                    outputs[key] = out[0] if isinstance(out, tuple) else out
                handles.append(block.register_forward_hook(block_hook))
            try:
                logits(model, ids, mask)
            finally:
                for h in handles:
                    h.remove()
    assert len(inputs) == len(decoder_layers(model))
    for i, x in inputs.items():
        assert _along(x, unit) < 1e-5, f"layer {i} input keeps a component along r"
    for key, x in outputs.items():
        # Block outputs include what the last block hands to the final norm: nothing may carry r there.
        assert _along(x, unit) < 1e-5, f"{key} output keeps a component along r"


def test_ablation_nests_with_add():
    model = tiny("llama")
    ids, mask = batch()
    r = direction()
    unit = r / r.norm()
    with ablate_direction(model, r), add_direction(model, r, 1):
        with capture_inputs(model) as inputs:
            logits(model, ids, mask)
    # The add hook was registered after the ablation hook, so layer 1 sees the projected input plus r.
    assert _along(inputs[0], unit) < 1e-5
    real = mask.bool()
    torch.testing.assert_close((inputs[1][real].double() @ unit.double()),
                               torch.full((int(real.sum()),), float(r.norm()), dtype=torch.float64), atol=1e-4, rtol=0)
    assert no_hooks_left(model)


# ----------------------------------------------------------------------------- PEFT


def test_nests_with_peft_disable_adapter():
    peft = pytest.importorskip("peft")
    base = tiny("llama")
    reference_model = copy.deepcopy(base)
    torch.manual_seed(5)
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                                    init_lora_weights=False))
    lora.eval()
    ids, mask = batch()
    r = direction()
    real = mask.bool()
    with add_direction(reference_model, r, 1):
        teacher_ref = logits(reference_model, ids, mask)
    student_plain = logits(lora, ids, mask)
    assert not torch.allclose(student_plain, logits(reference_model, ids, mask), atol=1e-4)  # the adapter is live

    with lora.disable_adapter(), add_direction(lora, r, 1):
        torch.testing.assert_close(logits(lora, ids, mask), teacher_ref, atol=1e-5, rtol=1e-5)
    with add_direction(lora, r, 1):
        with lora.disable_adapter():
            torch.testing.assert_close(logits(lora, ids, mask), teacher_ref, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(logits(lora, ids, mask), teacher_ref, atol=1e-4)  # adapter back on, still steered
    with capture_inputs(lora) as before:
        with add_direction(lora, r, 1):
            with capture_inputs(lora) as after:
                logits(lora, ids, mask)
    assert torch.equal(after[1][~real], before[1][~real]), "padding must stay untouched through the PEFT wrapper"
    assert torch.equal(logits(lora, ids, mask), student_plain)
    assert no_hooks_left(lora)


# ----------------------------------------------------------------------------- starting a forward at a layer

from safesteer.core.steering import LayerInput, capture_layer_input, start_at_layer  # noqa: E402


def _forward_kwargs(ids, mask):
    return dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=False)


@contextmanager
def count_block_work(model):
    """Calls of each decoder layer's attention module: a layer handed through does not run it."""
    counts = [0] * len(decoder_layers(model))

    def make(i):
        def hook(*_):
            counts[i] += 1
        return hook

    with layer_hooks(model, lambda i, block: attention_and_mlp(block)[0].register_forward_hook(make(i))):
        yield counts


def no_forward_shadowed(model) -> bool:
    return all("forward" not in block.__dict__ for block in decoder_layers(model))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_start_at_layer_reproduces_the_full_forward_with_the_steering_added_once(arch, layer):
    model = tiny(arch)
    ids, mask = batch()
    r = direction()
    with add_direction(model, r, layer, 1.5):
        steered = logits(model, ids, mask)
    plain = logits(model, ids, mask)
    with torch.no_grad(), count_block_work(model) as lower:
        with add_direction(model, r, layer, 1.5):  # a steering hook already open does not leak into the capture
            start = capture_layer_input(model, layer, **_forward_kwargs(ids, mask))
    assert lower == [1] * layer + [0] * (len(lower) - layer)  # nothing at or above the layer ran
    with capture_inputs(model) as seen:
        logits(model, ids, mask)
    assert torch.equal(start.hidden, seen[layer]) and start.layer == layer

    with count_block_work(model) as counts:
        with start_at_layer(model, start):
            torch.testing.assert_close(logits(model, ids, mask), plain, atol=1e-6, rtol=0)
            with add_direction(model, r, layer, 1.5):  # hook registered after the substitution
                torch.testing.assert_close(logits(model, ids, mask), steered, atol=1e-6, rtol=0)
        with add_direction(model, r, layer, 1.5), start_at_layer(model, start):  # and before it
            torch.testing.assert_close(logits(model, ids, mask), steered, atol=1e-6, rtol=0)
    assert counts[:layer] == [0] * layer and counts[layer:] == [3] * (len(counts) - layer)
    assert no_hooks_left(model) and no_forward_shadowed(model)
    assert torch.equal(logits(model, ids, mask), plain)


def _grouped_rows(group=3, prompt_len=5, width=9, seed=0):
    """Two left-padded prompts, each repeated `group` times with its own continuations (some ended early)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (2 * group, width), generator=g)
    mask = torch.ones(2 * group, width, dtype=torch.long)
    prompts = torch.randint(3, V, (2, prompt_len), generator=g)
    ids[:, :prompt_len] = prompts.repeat_interleave(group, 0)
    mask[group:, :2] = 0  # the second prompt is shorter
    mask[1, -2:] = 0  # a continuation that ended early
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
def test_grouped_capture_equals_the_plain_capture(arch):
    from safesteer.core.steering import capture_layer_input_grouped

    model = tiny(arch)
    ids, mask = _grouped_rows()
    kwargs = _forward_kwargs(ids, mask)
    kwargs.pop("use_cache")
    shapes = []
    handle = decoder_layers(model)[0].register_forward_pre_hook(
        lambda _m, args, kw: shapes.append(tuple((args[0] if args else kw["hidden_states"]).shape[:2])), with_kwargs=True)
    try:
        with torch.no_grad():
            plain = capture_layer_input(model, 2, **kwargs, use_cache=False)
            grouped = capture_layer_input_grouped(model, 2, 3, 5, **kwargs)
            other = ids.clone()
            other[1, 4] = (other[1, 4] + 1) % V  # one row's prompt differs from its group's
            ungrouped = capture_layer_input_grouped(model, 2, 3, 5, **{**kwargs, "input_ids": other})
    finally:
        handle.remove()
    assert shapes[0] == (6, 9)
    assert shapes[1:3] == [(2, 5), (6, 4)], shapes  # each prompt ran once, then the rest per row
    assert shapes[-1] == (6, 9)  # rows whose prompts differ: the plain capture
    assert grouped.layer == plain.layer == 2 and grouped.output_arity == plain.output_arity
    valid = mask.bool()
    torch.testing.assert_close(grouped.hidden[valid], plain.hidden[valid], atol=1e-5, rtol=1e-5)
    full = logits(model, ids, mask)
    with start_at_layer(model, grouped):  # a forward can start from it
        torch.testing.assert_close(logits(model, ids, mask)[valid], full[valid], atol=1e-5, rtol=1e-5)
    assert ungrouped.hidden.shape == plain.hidden.shape
    assert no_hooks_left(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_grouped_scored_hidden_equals_the_full_forward_with_steering_and_gradients(arch):
    from safesteer.core.steering import scored_hidden_grouped

    model = copy.deepcopy(tiny(arch))
    ids, mask = _grouped_rows()
    kwargs = _forward_kwargs(ids, mask)
    kwargs.pop("use_cache")
    with torch.no_grad():
        start = capture_layer_input(model, 1, **kwargs, use_cache=False)
    r = direction()
    coeffs = torch.tensor([1.5, 1.5, 1.5, -0.5, -0.5, -0.5])  # per row, equal within each prompt's group
    params = [p for p in model.parameters() if p.dim() == 2][-3:]  # upper weights get gradients

    def run(grouped: bool):
        model.zero_grad(set_to_none=True)
        if grouped:
            hidden = scored_hidden_grouped(model, start, 3, 5, **kwargs,
                                           context=lambda rows: add_direction(model, r, 1, coeffs[rows]))
        else:
            with add_direction(model, r, 1, coeffs), start_at_layer(model, start):
                hidden = model(**kwargs, output_hidden_states=True, use_cache=False).hidden_states[-1][:, 4:]
        valid = mask[:, 4:].bool()
        (hidden[valid] * torch.linspace(-1, 1, hidden.shape[-1])).sum().backward()
        return hidden.detach(), [p.grad.clone() for p in params if p.grad is not None]

    (h_full, g_full) = run(False)
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]  # transformers' own too
    (h_group, g_group) = run(True)
    valid = mask[:, 4:].bool()
    assert h_group.shape == h_full.shape == (6, 5, D)
    torch.testing.assert_close(h_group[valid], h_full[valid], atol=1e-5, rtol=1e-5)
    assert len(g_group) == len(g_full) > 0
    for a, b in zip(g_group, g_full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    other = ids.clone()
    other[4, 0] = (other[4, 0] + 1) % V
    assert scored_hidden_grouped(model, start, 3, 5, **{**kwargs, "input_ids": other}) is None  # not grouped
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()] == hooks
    assert no_forward_shadowed(model)


def test_start_at_layer_keeps_padding_positions_as_the_full_forward():
    model = tiny("qwen2")
    ids, mask = batch()
    with torch.no_grad():
        full = model(**_forward_kwargs(ids, mask), output_hidden_states=True).hidden_states[-1]
        start = capture_layer_input(model, 2, **_forward_kwargs(ids, mask))
        with start_at_layer(model, start):
            shared = model(**_forward_kwargs(ids, mask), output_hidden_states=True).hidden_states[-1]
    assert not mask.bool().all()
    torch.testing.assert_close(shared, full, atol=1e-6, rtol=0, equal_nan=True)  # every position, padding included


def test_start_at_layer_restores_the_model_after_an_exception():
    model = tiny("llama")
    ids, mask = batch()
    reference = logits(model, ids, mask)
    with torch.no_grad():
        start = capture_layer_input(model, 2, **_forward_kwargs(ids, mask))
    with pytest.raises(RuntimeError, match="boom"):
        with start_at_layer(model, start):
            logits(model, ids, mask)
            raise RuntimeError("boom")
    assert no_hooks_left(model) and no_forward_shadowed(model)
    with pytest.raises(SafesteerError, match="same inputs"):  # an error inside the forward, other inputs
        with start_at_layer(model, start):
            logits(model, ids[:2], mask[:2])
    assert no_hooks_left(model) and no_forward_shadowed(model)
    handle = decoder_layers(model)[0].register_forward_pre_hook(_raise_boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):  # an error inside the capture's forward
            capture_layer_input(model, 2, **_forward_kwargs(ids, mask))
    finally:
        handle.remove()
    assert no_hooks_left(model) and no_forward_shadowed(model)
    assert torch.equal(logits(model, ids, mask), reference)


def _raise_boom(*_):
    raise RuntimeError("boom")


def test_start_at_layer_restores_a_forward_set_on_the_instance():
    """Device-placement wrappers (accelerate) put their own `forward` on the layer objects."""
    model = copy.deepcopy(tiny("llama"))
    ids, mask = batch()
    block = decoder_layers(model)[0]
    calls = []
    original = block.forward

    def wrapped(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    block.forward = wrapped
    with torch.no_grad():
        start = capture_layer_input(model, 1, **_forward_kwargs(ids, mask))
        with start_at_layer(model, start):
            logits(model, ids, mask)
    assert calls == [1]  # the capture ran the wrapper, the shared forward did not
    assert block.__dict__["forward"] is wrapped


def test_start_at_layer_rejects_bad_layers():
    model = tiny("llama")
    ids, mask = batch()
    with pytest.raises(SafesteerError, match="out of range"):
        capture_layer_input(model, 3, **_forward_kwargs(ids, mask))
    with pytest.raises(SafesteerError, match="out of range"):
        with start_at_layer(model, LayerInput(layer=-1, hidden=torch.zeros(1))):
            pass
    with pytest.raises(SafesteerError, match="capture_layer_input"):
        with start_at_layer(model, LayerInput(layer=1, hidden=torch.zeros(1))):
            pass
    assert no_hooks_left(model) and no_forward_shadowed(model)


class _TupleBlock(torch.nn.Module):
    """A decoder layer of the older convention: a tuple with the hidden states first."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.Linear(D, D)

    def forward(self, hidden_states, attention_mask=None):
        return hidden_states + torch.tanh(self.attn(hidden_states)), None


class _TupleLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = transformers.PretrainedConfig(num_hidden_layers=3, hidden_size=D)
        self.embed = torch.nn.Embedding(V, D)
        self.layers = torch.nn.ModuleList(_TupleBlock() for _ in range(3))

    def forward(self, input_ids, attention_mask=None):
        hidden = self.embed(input_ids)
        for layer in self.layers:
            outputs = layer(hidden, attention_mask=attention_mask)
            hidden = outputs[0]  # indexing a bare tensor here would silently take the first row
        return hidden


def test_start_at_layer_follows_a_tuple_returning_layer_convention():
    torch.manual_seed(0)
    model = _TupleLM()
    ids, mask = batch()
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        start = capture_layer_input(model, 2, input_ids=ids, attention_mask=mask)
        assert start.output_arity == 2
        with start_at_layer(model, start):
            torch.testing.assert_close(model(ids, attention_mask=mask), full, atol=1e-6, rtol=0)
