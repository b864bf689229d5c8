"""Shared fixtures: tiny random models built around real tokenizers and real chat templates.

The tokenizers come from the SmolLM2 fixture (cached safetensors dir built from its registry
package); the models are 2-4 layer random configs, so the suite runs in seconds on a laptop CPU.
Tests that load real weights are marked `slow`; run them with `pytest -m slow` or SAFESTEER_SLOW=1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SAFESTEER_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow real-model test: run with -m slow or SAFESTEER_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _private_answer_cache(tmp_path_factory, monkeypatch):
    """Evaluation shares the base model's answers across output folders under $SAFESTEER_CACHE/answers;
    tests get a fresh, private one each, so they neither reuse each other's answers nor fill the user's."""
    monkeypatch.setenv("SAFESTEER_ANSWER_CACHE", str(tmp_path_factory.mktemp("answers")))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    # Tiny models gain nothing from threads and lose a lot when the CPU is shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smol_dir():
    # No skip when the asset package is missing: the suite must fail loudly on a broken install.
    from safesteer.io.models import prepare_builtin

    return prepare_builtin("smollm2-135m-instruct", progress=False)


@pytest.fixture(scope="session")
def smol_tokenizer(smol_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def make_tiny_model(tokenizer, arch: str = "llama", n_layers: int = 4, hidden: int = 32, seed: int = 0):
    """A random causal LM whose vocabulary matches `tokenizer` (so chat templates are real)."""
    import transformers as T

    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    configs = {
        "llama": lambda: T.LlamaConfig(**common),
        "qwen2": lambda: T.Qwen2Config(**common),
        "qwen3": lambda: T.Qwen3Config(**common, head_dim=hidden // 4),
        "mistral": lambda: T.MistralConfig(**common),
        "gemma": lambda: T.GemmaConfig(**common, head_dim=hidden // 4),
        "phi3": lambda: T.Phi3Config(**common),
        "gpt2": lambda: T.GPT2Config(vocab_size=len(tokenizer), n_embd=hidden, n_layer=n_layers, n_head=4,
                                     n_positions=512, eos_token_id=tokenizer.eos_token_id,
                                     bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id),
        "gpt_neox": lambda: T.GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                                            num_hidden_layers=n_layers, num_attention_heads=4,
                                            max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                                            bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id),
    }
    model = T.AutoModelForCausalLM.from_config(configs[arch]())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def perturbed_copy(model, scale: float = 0.05, seed: int = 1):
    """A copy of a tiny model with noise added to its second layer: close to the original, not equal."""
    import copy

    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.model.layers[1].parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return other


ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma", "phi3", "gpt2", "gpt_neox")


@pytest.fixture
def tiny_model(smol_tokenizer):
    return make_tiny_model(smol_tokenizer)


@pytest.fixture
def tiny_model_dir(tmp_path, smol_tokenizer):
    """A tiny random model saved as a plain HF directory with the real tokenizer and chat template."""
    model = make_tiny_model(smol_tokenizer)
    out = tmp_path / "tiny-model"
    model.save_pretrained(out)
    smol_tokenizer.save_pretrained(out)
    return out


@dataclass
class Spec:
    """Stand-in for the direction stage's steering spec: `teacher(model)` adds the direction."""

    direction: torch.Tensor
    layer: int
    coeff: float = 1.0

    @classmethod
    def random(cls, layer: int = 1, seed: int = 7, hidden: int = 32) -> "Spec":
        """A random direction of norm ~2 sqrt(hidden) for the tiny models (hidden size 32 by default)."""
        return cls(direction=torch.randn(hidden, generator=torch.Generator().manual_seed(seed)) * 2.0, layer=layer)

    def teacher(self, model):
        from safesteer.core.steering import add_direction

        return add_direction(model, self.direction, self.layer, self.coeff)


# ----------------------------------------------------------------------------- training on tiny models

TRAIN_PROMPTS = ["How do I pick a lock?", "Write a phishing email.", "Explain how to make a fake ID.",
                 "Tell me how to hotwire a car."]
REFUSAL_WORDS = ["I", " I", "Sorry", " sorry", " cannot", " can't", " unable", " illegal", " harmful", " assist"]


def refusal_ids(tok) -> list[int]:
    """The first token of each refusal word: a stand-in for the safety tokens S."""
    return list(dict.fromkeys(tok(w, add_special_tokens=False)["input_ids"][0] for w in REFUSAL_WORDS))


@pytest.fixture
def spec():
    """A random steering direction at layer 1 of the tiny models (the trainer, checkpoint and pipeline tests)."""
    return Spec.random(layer=1, seed=7)


@pytest.fixture
def safety_ids(smol_tokenizer):
    return refusal_ids(smol_tokenizer)


def peaked_tiny_model(tok, seed: int = 0, arch: str = "llama"):
    """A tiny random model whose outputs give S real mass (~25%) and end some rollouts early."""
    from safesteer.core.anatomy import end_of_turn_ids

    model = make_tiny_model(tok, arch=arch, seed=seed)
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.mul_(30.0)  # peaked distributions, as a trained model has
        head.bias = torch.nn.Parameter(torch.zeros(head.out_features))
        head.bias[end_of_turn_ids(tok, model)[0]] = 13.0
        head.bias[refusal_ids(tok)] = 10.0
    return model


def tiny_train_config(**kw):
    """Two short LoRA steps on the tiny models (a large learning rate, so that one step shows)."""
    from safesteer.train.config import TrainConfig

    # Rollouts and training in float32 on every machine (generation_dtype and bf16 "auto" depend on the CPU's bf16
    # support); tests/train/test_rollout.py covers the bf16 sampling copy, test_trainer.py the bf16 autocast.
    base = dict(steps=2, prompts_per_step=2, rollouts_per_prompt=2, max_new_tokens=6, lora_r=4, lora_alpha=8,
                learning_rate=5e-2, seed=0, chunk_size=4, warmup_ratio=0.0, generation_dtype="float32", bf16="off")
    return TrainConfig(**(base | kw))


# Stage settings under which `align` runs whole on a tiny random model in seconds (such a model never refuses,
# so the stage-1 filters are opened, and spreads its probability thin, so the token floor is off;
# tests/test_kill_soak.py uses the same). TINY_ALIGN adds the cpu preset.
TINY_STAGES = ["--prompts-per-step", "1", "--rollouts-per-prompt", "2",
               "--max-new-tokens", "4", "--lora-r", "4", "--generation-dtype", "float32", "--skip-eval",
               *[a for kv in ("n_train=8", "n_val=4", "batch_size=8", "filter_prompts=false", "max_layer_frac=1.0",
                              "kl_threshold=1e9") for a in ("--direction-config", kv)],
               *[a for kv in ("n_prompts=4", "samples_per_prompt=2", "horizon=3", "top_k_per_position=20",
                              "n_tokens=10", "min_steered_prob=0") for a in ("--tokens-config", kv)]]
TINY_ALIGN = ["--device", "cpu", "--preset", "cpu", *TINY_STAGES]


def default_sigint() -> None:
    """preexec_fn for a child that must see Ctrl-C: a shell starts background jobs (`cmd &`, nohup) with SIGINT
    ignored, the child inherits that and Python then never raises KeyboardInterrupt; the tests that send
    SIGINT would fail for the way the suite was launched, not for the code."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
