import pytest

from safesteer.errors import SafesteerError
from safesteer.train.config import PRESETS, TrainConfig


def test_presets_and_overrides():
    paper = TrainConfig.from_preset("paper", "qwen")
    assert (paper.prompts_per_step, paper.rollouts_per_prompt, paper.steps, paper.max_new_tokens) == (4, 8, 25, 512)
    assert paper.finetune == "full" and paper.learning_rate == 1e-5 and paper.loss == "localized"
    assert TrainConfig.from_preset("paper", "llama").learning_rate == 1e-6
    assert paper.warmup_steps == 3 and paper.weight_decay == 0.0 and paper.max_grad_norm == 1.0
    cpu = TrainConfig.from_preset("cpu", "qwen", steps=3, loss=None)
    assert cpu.steps == 3 and cpu.finetune == "lora"
    assert cpu.loss == "localized_bucket" and cpu.lora_layers == "from_steering"  # None overrides nothing
    assert paper.lora_layers == "all"
    assert set(PRESETS) == {"paper", "cpu"}
    with pytest.raises(SafesteerError, match="unknown loss"):
        TrainConfig(loss="kl")
    with pytest.raises(SafesteerError, match="unknown preset"):
        TrainConfig.from_preset("huge")


def test_lora_layers_option_is_validated():
    assert TrainConfig().lora_layers == "all" and TrainConfig.from_preset("paper").lora_layers == "all"
    assert TrainConfig.from_preset("paper").lora_layers == "all"
    assert TrainConfig(lora_layers="from_steering").lora_layers == "from_steering"
    with pytest.raises(SafesteerError, match="finetune=lora"):
        TrainConfig(lora_layers="from_steering", finetune="full")
    with pytest.raises(SafesteerError, match="unknown lora_layers"):
        TrainConfig(lora_layers="upper")
