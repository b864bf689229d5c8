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
    assert set(PRESETS) == {"paper", "cpu", "cpu-contrast", "cpu-gated"}
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


def test_beyond_paper_settings_are_off_in_paper_and_cpu_and_on_in_cpu_contrast():
    from safesteer.train.config import PRESET_HELP, stage_preset

    for name in ("paper", "cpu"):
        c = TrainConfig.from_preset(name)
        assert not c.uses_contrast and not c.uses_opening_weight and c.gate == "off" and c.beyond_paper == []
    c = TrainConfig.from_preset("cpu-contrast")
    cpu = TrainConfig.from_preset("cpu")
    assert (c.contrast, c.contrast_prompts_per_step, c.contrast_weight, c.contrast_coeff, c.contrast_greedy,
            c.opening_tokens, c.opening_weight) == ("builtin", 2, 4.0, 0.0, True, 4, 4.0)
    same = {k: v for k, v in vars(c).items() if not k.startswith(("contrast", "opening")) and k != "preset"}
    assert same == {k: v for k, v in vars(cpu).items() if k in same}  # otherwise the cpu preset
    assert c.beyond_paper and "beyond the paper" in PRESET_HELP["cpu-contrast"]
    assert stage_preset("cpu-contrast") == "cpu" and stage_preset("paper") == "paper"
    # The CPU default: cpu-contrast plus the gated teacher and a contrast teacher with r partly subtracted.
    g = TrainConfig.from_preset("cpu-gated")
    assert (g.gate, g.contrast_coeff, g.learning_rate) == ("on", -0.15, 2e-4) and stage_preset("cpu-gated") == "cpu"
    changed = ("gate", "contrast_coeff", "learning_rate", "preset")
    assert {k: v for k, v in vars(g).items() if k not in changed} == {k: v for k, v in vars(c).items() if k not in changed}
    assert g.beyond_paper == ["contrast prompts (builtin)", "opening-position loss weight", "gated teacher"]
    assert set(PRESET_HELP) == set(PRESETS)
    with pytest.raises(SafesteerError, match="give both"):
        TrainConfig(contrast="builtin")
    with pytest.raises(SafesteerError, match="give both"):
        TrainConfig(contrast_prompts_per_step=2)
    with pytest.raises(SafesteerError, match="gate must be"):
        TrainConfig(gate="maybe")
    with pytest.raises(SafesteerError, match=">= 0"):
        TrainConfig(contrast="builtin", contrast_prompts_per_step=1, contrast_weight=-1.0)
