"""The command line: every command's settings come from its config dataclass the same way, and the
stages run one by one get the presets `align` uses."""

from dataclasses import dataclass

import pytest

from safesteer import pipeline
from safesteer.cli import build_parser, config_option, config_values, resolve_preset, stage_options, value_parser
from safesteer.errors import SafesteerError
from safesteer.eval.suites import EvalConfig
from safesteer.teacher.direction import DirectionConfig
from safesteer.teacher.tokens import TOKEN_PRESETS, SafetyTokenConfig
from safesteer.train.config import default_preset, stage_preset


def test_values_are_read_by_their_field_types():
    @dataclass
    class Cfg:
        n: int = 1
        floor: float | None = None
        layers: tuple[int, ...] | None = None
        names: tuple[str, ...] = ()
        flag: bool = False

    hints = {"n": int, "floor": float | None, "layers": tuple[int, ...] | None, "names": tuple[str, ...], "flag": bool}
    assert value_parser(hints["n"])("3") == 3
    assert value_parser(hints["floor"])("1e-3") == 1e-3 and value_parser(hints["floor"])("none") is None
    assert value_parser(hints["layers"])("6-8,10") == (6, 7, 8, 10)
    assert value_parser(hints["names"])("a, b") == ("a", "b")
    assert value_parser(hints["flag"])("yes") is True and value_parser(hints["flag"])("off") is False
    with pytest.raises(ValueError):
        value_parser(hints["flag"])("maybe")


def test_tokens_direction_and_align_resolve_the_same_presets():
    parser = build_parser()
    tokens = parser.parse_args(["tokens", "--out", "x", "--preset", "cpu"])
    align = parser.parse_args(["align", "--out", "x", "--preset", "cpu"])
    from_tokens = SafetyTokenConfig.from_preset(resolve_preset(tokens.preset), **config_values(tokens, SafetyTokenConfig))
    from_align = SafetyTokenConfig.from_preset(align.preset, **pipeline.stage_settings(align, SafetyTokenConfig, "tokens"))
    assert from_tokens == from_align
    assert (from_tokens.min_steered_prob, from_tokens.top_k_per_position) == (1e-3, 10)
    paper = parser.parse_args(["tokens", "--out", "x", "--preset", "paper", "--n-tokens", "20"])
    config = SafetyTokenConfig.from_preset(paper.preset, **config_values(paper, SafetyTokenConfig))
    assert (config.min_steered_prob, config.top_k_per_position, config.n_tokens) == (None, 200, 20)
    for command in ("tokens", "direction", "align"):
        assert resolve_preset(parser.parse_args([command, "--out", "x"]).preset) == default_preset()
    # The stage commands' `auto` is the stage preset of align's default (cpu-gated trains on cpu's stages), and a
    # default run's stage settings are those of `--preset cpu`.
    for command in ("tokens", "direction"):
        auto = resolve_preset(parser.parse_args([command, "--out", "x"]).preset, stage=True)
        assert auto == stage_preset(default_preset()) and auto in ("paper", "cpu")
    auto_align = parser.parse_args(["align", "--out", "x"])
    auto_align.preset = resolve_preset(auto_align.preset)
    assert SafetyTokenConfig.from_preset(pipeline._stage(auto_align.preset, TOKEN_PRESETS)) == \
        SafetyTokenConfig.from_preset(stage_preset(default_preset()))


def test_align_takes_stage_settings_as_options_and_as_key_value():
    args = build_parser().parse_args([
        "align", "--out", "x", "--direction", "elsewhere", "--direction.layers", "6-8", "--no-direction.filter-prompts",
        "--direction-config", "n_val=8", "--tokens.n-tokens", "20", "--tokens-config", "rank-by=weighted"])
    assert args.direction == "elsewhere"  # --direction DIR is not shadowed by --direction.FIELD
    assert pipeline.stage_settings(args, DirectionConfig, "direction") == {
        "n_val": 8, "layers": (6, 7, 8), "filter_prompts": False}
    assert pipeline.stage_settings(args, SafetyTokenConfig, "tokens") == {"rank_by": "weighted", "n_tokens": 20}
    args.tokens_config = ["n_tokens=oops"]
    with pytest.raises(SafesteerError, match="n_tokens=oops"):
        pipeline.stage_settings(args, SafetyTokenConfig, "tokens")


def test_stage_errors_name_options_both_commands_accept():
    """A stage's error cannot tell `safesteer STAGE` from `safesteer align`; the options it names parse in each."""
    assert stage_options("direction", "kl_threshold", "layers") == (
        "`safesteer direction` --kl-threshold, --layers; `safesteer align` --direction.kl-threshold, --direction.layers")
    parser = build_parser()
    for stage, config_cls, name, value, parsed in (("direction", DirectionConfig, "kl_threshold", "0.5", 0.5),
                                                   ("tokens", SafetyTokenConfig, "horizon", "3", 3)):
        own = parser.parse_args([stage, "--out", "x", config_option(name), value])
        assert config_values(own, config_cls)[name] == parsed
        align = parser.parse_args(["align", "--out", "x", config_option(name, f"{stage}."), value])
        assert pipeline.stage_settings(align, config_cls, stage)[name] == parsed


def test_eval_takes_only_the_options_given_and_keeps_its_flag_names():
    parser = build_parser()
    assert config_values(parser.parse_args(["eval", "--out", "x"]), EvalConfig) == {}
    args = parser.parse_args(["eval", "--out", "x", "--model", "a", "--model", "b", "--harmful", "x,y.csv",
                              "--edgy", "e.csv", "--suites", "safety,drift", "--no-builtin", "--n-mmlu", "all",
                              "--field", "q", "--no-progress", "--sample", "--lm-eval-tasks", "mmlu,gsm8k"])
    assert args.model == ["a", "b"]
    assert config_values(args, EvalConfig) == {
        "harmful_sets": ("x,y.csv",), "overrefusal_sets": ("e.csv",), "suites": ("safety", "drift"),
        "builtin": False, "n_mmlu": None, "field_name": "q", "progress": False, "sample": True,
        "lm_eval_tasks": ("mmlu", "gsm8k")}


def test_compare_takes_the_evaluation_options_of_eval_and_its_points():
    from safesteer.eval.compare import CompareConfig
    from safesteer.eval.suites import eval_config_from_args

    parser = build_parser()
    options = ["--part", "tune", "--n-harmful", "64", "--n-edgy", "all", "--quick", "--no-builtin", "--edgy", "x,y.csv"]
    compare = parser.parse_args(["compare", "--out", "x", "--run", "cpu=runs/a,b", "--run", "b=runs/b", "--teacher",
                                 "runs/a", "--no-reuse-run-answers", *options])
    assert eval_config_from_args(compare) == eval_config_from_args(parser.parse_args(["eval", "--out", "x", *options]))
    assert eval_config_from_args(compare).part == "tune" and eval_config_from_args(compare).n_mmlu == 0  # --quick
    assert config_values(compare, CompareConfig) == {"runs": ("cpu=runs/a,b", "b=runs/b"), "teachers": ("runs/a",),
                                                     "gated": None, "reuse_run_answers": False}
    default = parser.parse_args(["compare", "--out", "x", "--run", "cpu=runs/a"])
    assert eval_config_from_args(default).part == "report"


def test_every_command_builds_and_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"generate", "direction", "tokens", "chat", "align", "eval", "compare", "report", "memory"} <= set(commands)
    for name, sub in commands.items():
        assert sub.description and sub.format_help(), name
