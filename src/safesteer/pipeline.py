"""`safesteer align`: direction -> safety tokens -> training -> evaluation summary, in one run directory.

    safesteer align --out runs/demo                 # every stage; a rerun reuses or resumes each one

The stages run in order on one loaded model. Each writes its artifacts to OUT and reuses them when a
rerun finds a matching result (`teacher.direction.run_direction_stage`, `teacher.tokens.run_token_stage`),
training resumes from its last checkpoint and is skipped when OUT/model is complete, and the summary
(`eval.suites.align_summary`) resumes from the answers already generated. Every stage's wall-clock
(and whether it was reused) goes to OUT/timings.json, earlier runs' timings kept under previous_runs.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

from . import parallel
from .core.loss import LOSS_VARIANTS
from .train.config import FINETUNE_MODES, PAPER_LR, PRESETS, TrainConfig, stage_preset
from .utils import read_json, sha256_file, write_json_atomic


def output_is_complete(out_dir: str | Path) -> bool:
    """True when OUT/model holds a finished trained model (its safesteer.json is written last)."""
    return (Path(out_dir) / "model" / "safesteer.json").is_file()


def stage_settings(args: argparse.Namespace, config_cls: type, stage: str) -> dict:
    """Stage-1/2 settings given to `align`: --STAGE-config KEY=VALUE items, then --STAGE.FIELD options."""
    from .cli import config_values, parse_assignments

    values = parse_assignments(getattr(args, f"{stage}_config"), config_cls, f"--{stage}-config")
    values.update({k: v for k, v in config_values(args, config_cls, prefix=f"{stage}.").items() if v is not None})
    return values


def _record_timing(out: Path, timings: dict) -> None:
    path = out / "timings.json"
    previous = read_json(path) if path.is_file() else {}
    history = previous.pop("previous_runs", [])
    if previous:
        history.append(previous)
    write_json_atomic(path, {**timings, "previous_runs": history})


def _mtime(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.is_file() else None


def _ensure_direction(args, model, tokenizer, identity, out: Path) -> tuple[Any, bool]:
    """Stage 1 (run_direction_stage reuses a matching result). Returns (steering spec, reused?)."""
    from .io.prompts import builtin_splits
    from .teacher.direction import DIRECTION_PRESETS, META_FILE, DirectionConfig, load_direction, run_direction_stage

    if args.direction:  # a teacher made elsewhere, used as it is
        return load_direction(args.direction, model), True
    splits = builtin_splits(args.split_seed)
    values = {"seed": args.split_seed}  # DirectionConfig.seed names the built-in split it was given
    values.update(stage_settings(args, DirectionConfig, "direction"))
    # The align presets carry the direction presets of the same name (cpu: the relative induce filter).
    config = DirectionConfig.from_preset(_stage(args.preset, DIRECTION_PRESETS), **values)
    before = _mtime(out / META_FILE)
    spec = run_direction_stage(model, tokenizer, identity, out, splits["harmful"]["direction_train"],
                               splits["harmless"]["direction_train"], splits["harmful"]["direction_val"],
                               splits["harmless"]["direction_val"], config)
    return spec, before is not None and _mtime(out / META_FILE) == before


def _stage(preset: str, stage_presets: dict) -> str:
    """The stage preset that goes with an align preset (cpu-contrast: cpu's), else the paper's."""
    name = stage_preset(preset)
    return name if name in stage_presets else "paper"


def _ensure_tokens(args, preset: str, model, tokenizer, identity, out: Path) -> bool:
    """Stage 2; run_token_stage itself reuses a matching safety_tokens.json. Returns True if reused."""
    from .io.prompts import builtin_splits
    from .teacher.tokens import JSON_NAME, TOKEN_PRESETS, SafetyTokenConfig, filter_harmless, run_token_stage

    # The align presets carry the token presets of the same name (cpu: floor 1e-3, K' = 10).
    config = SafetyTokenConfig.from_preset(_stage(preset, TOKEN_PRESETS),
                                           **stage_settings(args, SafetyTokenConfig, "tokens"))
    before = _mtime(out / JSON_NAME)
    prompts = filter_harmless(model, tokenizer, builtin_splits(args.split_seed)["harmless"]["direction_val"],
                              config.n_prompts)
    run_token_stage(model, tokenizer, identity, args.direction or out, out, prompts, config, progress=True)
    return before is not None and _mtime(out / JSON_NAME) == before


def _train_config_from_args(args, family: str) -> TrainConfig:
    overrides = {f.name: getattr(args, f.name, None) for f in fields(TrainConfig) if f.name != "preset"}
    if args.adapter_only:
        overrides["merge"] = False
    return TrainConfig.from_preset(args.preset, family, **overrides)


# Benign prompts whose final hidden states the representation shift compares (the drift suite's).
REPRESENTATION_PROMPTS = 32


def summarize(args: argparse.Namespace, out: Path) -> dict:
    """The evaluation summary at the end of `align`: base vs aligned model (`eval.suites.align_summary`),
    and, while both are loaded, the representation shift the report plots (OUT/representation.json).

    The trained model is in OUT/model, the base model is `args.model`.
    """
    from .eval.suites import align_summary, load_align_entries

    entries = load_align_entries(out, args.model, out / "model", args)
    if parallel.is_main_process():
        record_representation(args, out, entries[0], entries[-1])
    return align_summary(run_dir=out, args=args, entries=entries)


def record_representation(args: argparse.Namespace, out: Path, base: Any, aligned: Any) -> dict:
    """Where base model, steered teacher and aligned model put held-out benign prompts (final hidden
    states, `report.representation.representation_shift`), written to OUT/representation.json."""
    from .io.prompts import builtin_splits, seeded_subset
    from .report.representation import representation_shift
    from .teacher.direction import load_direction

    spec = load_direction(args.direction or out, base.model)
    prompts = seeded_subset(builtin_splits(args.split_seed)["benign"]["eval"], REPRESENTATION_PROMPTS, 0)
    result = representation_shift(base.model, base.tokenizer, lambda: spec.teacher(base.model), aligned.model, prompts,
                                  run_dir=out, base_ctx=base.context)
    print("representation shift (mean distance from the base's final hidden states, relative to their spread): "
          + ", ".join(f"{name} {s['relative_to_base_spread']:.3f}" for name, s in result["shift"].items())
          + f" on {len(prompts)} benign prompts ({result['seconds']:.0f} s)")
    return result


def write_run_documents(out: Path) -> None:
    """The model card (OUT/model/README.md, once there is a trained model) and OUT/report.html, from the
    artifacts as they are now; the main process writes them."""
    from .report.build import write_report
    from .report.card import write_model_card

    if not parallel.is_main_process():
        return
    card = write_model_card(out)
    report = write_report(out)
    print(f"wrote {report}" + (f" and the model card {card}" if card else ""))


def _train(args: argparse.Namespace, model: Any, tokenizer: Any, identity: dict, spec: Any, prompts: Sequence[Any],
           config: TrainConfig, out: Path) -> dict:
    """Stage 3 into OUT (resumed from its checkpoint if there is one); returns the stage's timing record."""
    from .teacher.tokens import load_safety_tokens
    from .train.trainer import Trainer

    t0 = time.time()
    direction_dir = Path(args.direction) if args.direction else out
    info = {"base_model": identity,
            "data": {"train_prompts_source": args.prompts or "builtin:harmful/train", "split_seed": args.split_seed},
            "artifacts": {name: sha256_file(folder / name) for folder, name in (
                (direction_dir, "direction.safetensors"), (direction_dir, "direction.json"),
                (out, "safety_tokens.json"))}}
    trainer = Trainer(model, tokenizer, spec, load_safety_tokens(out, model), prompts, config, out, run_info=info)
    resumed_at = trainer.step
    if resumed_at:
        print(f"resuming from step {resumed_at} of {config.steps}")
    trainer.train()
    print(f"wrote {trainer.save_model()}")
    trainer.accelerator.free_memory()  # drop Accelerate's references, so the student can be freed
    return {"seconds": round(time.time() - t0, 2), "reused": False, "resumed_at_step": resumed_at}


def _cmd_align(args: argparse.Namespace) -> int:
    """direction -> safety tokens -> training -> summary, in one run directory

    Safety-align a model end to end. Every stage writes its artifacts to --out and reuses them on a rerun;
    training resumes from its last checkpoint; the run ends with OUT/report.html and a model card in
    OUT/model. Presets: cpu (a LoRA run that fits 2 CPU cores), paper (the released runs: full fine-tune,
    4x8 rollouts of 512 tokens, 25 steps), cpu-contrast (beyond the paper: cpu plus contrast prompts with an
    unsteered teacher and extra weight on the opening positions, against learned over-refusal); every
    setting below overrides the preset.
    """
    import gc

    from .cli import load_model_from_args, resolve_preset
    from .io.models import model_family
    from .io.prompts import load_prompts, stage_prompts

    parallel.init()  # launched on several processes: join them before the model is loaded onto this one's GPU
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.preset = resolve_preset(args.preset)
    if args.prompts:
        prompts = load_prompts(args.prompts, field=args.field)
    else:
        prompts = stage_prompts(None, "train", "harmful", args.split_seed)
    stages: dict[str, dict] = {}
    t_start = time.time()

    def timed(name: str, fn, *a):
        t0 = time.time()
        try:
            return fn(*a)
        finally:  # a failed stage is recorded too, with the time it took to fail
            stages[name] = {"seconds": round(time.time() - t0, 2)}

    try:
        loaded = timed("load_model", load_model_from_args, args)
        model, tokenizer, identity = loaded.model, loaded.tokenizer, loaded.identity
        del loaded
        config = _train_config_from_args(args, model_family(model))
        print(f"preset {args.preset}: {config.steps} steps x {config.prompts_per_step} prompts x "
              f"{config.rollouts_per_prompt} rollouts, {config.max_new_tokens} new tokens, {config.finetune}, "
              f"loss {config.loss}, lr {config.learning_rate:g}")
        spec, reused = timed("direction", _ensure_direction, args, model, tokenizer, identity, out)
        stages["direction"]["reused"] = reused
        reused = timed("tokens", _ensure_tokens, args, args.preset, model, tokenizer, identity, out)
        stages["tokens"]["reused"] = reused
        if parallel.world_size() > 1:  # all processes go on with the same stage files, whichever wrote them last
            from .teacher.direction import load_direction

            parallel.barrier()
            spec = load_direction(out, model)
        if output_is_complete(out):
            print(f"{out / 'model'} already holds the trained model; skipping training")
            stages["training"] = {"seconds": 0.0, "reused": True}
        else:
            stages["training"] = _train(args, model, tokenizer, identity, spec, prompts, config, out)
        del model
        gc.collect()
        if not args.skip_eval:
            write_run_documents(out)  # the trained model's card and report stand even if the summary fails
            timed("summary", summarize, args, out)
    finally:
        if parallel.is_main_process():
            _record_timing(out, {"preset": args.preset, "stages": stages, "total_s": round(time.time() - t_start, 2),
                                 "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    write_run_documents(out)  # with the summary's table and the timings
    print("wall-clock: " + ", ".join(f"{k} {v.get('seconds', 0):.0f} s" + (" (reused)" if v.get("reused") else "")
                                     for k, v in stages.items()) + f"; total {time.time() - t_start:.0f} s")
    return 0


def add_cli(subparsers) -> None:
    from .cli import add_command, add_config_args
    from .teacher.direction import DIRECTION_PRESETS, DirectionConfig
    from .teacher.tokens import METHODS, RANK_BY, TOKEN_PRESETS, SafetyTokenConfig

    p = add_command(subparsers, "align", _cmd_align, model=True, presets=PRESETS,
                    out="run directory (created; reused and resumed if it exists)",
                    prompts={"--prompts": "training prompts (default: the built-in harmful training split)"})
    p.add_argument("--split-seed", type=int, default=0, help="seed of the built-in prompt splits")
    p.add_argument("--direction", default=None, metavar="DIR",
                   help="use the refusal direction in DIR (direction.safetensors/.json) instead of running stage 1")
    for stage, config_cls, presets, choices in (
            ("direction", DirectionConfig, DIRECTION_PRESETS, {}),
            ("tokens", SafetyTokenConfig, TOKEN_PRESETS, {"method": METHODS, "rank_by": RANK_BY})):
        g = p.add_argument_group(f"stage {1 if stage == 'direction' else 2}: as `safesteer {stage}` (default: the "
                                 f"preset's value)")
        g.add_argument(f"--{stage}-config", action="append", default=[], metavar="KEY=VALUE",
                       help=f"the same as --{stage}.KEY VALUE ({config_cls.__name__} field), repeatable")
        names = [f.name for f in fields(config_cls) if f.name != "seed" or stage != "direction"]  # seed: --split-seed
        add_config_args(g, config_cls, names, prefix=f"{stage}.", presets=presets, choices=choices)
    g = p.add_argument_group("training (default: the preset's value)")
    choices = {"loss": LOSS_VARIANTS, "finetune": FINETUNE_MODES, "bf16": ("auto", "on", "off"),
               "teacher_dtype": ("same", "bfloat16", "float16")}
    presets = {**PRESETS, "paper": {**PRESETS["paper"], "learning_rate": " / ".join(  # set per family
        f"{lr:g} {family}" for family, lr in PAPER_LR.items())}}
    add_config_args(g, TrainConfig, [f.name for f in fields(TrainConfig) if f.name not in ("preset", "merge")],
                    choices=choices, presets=presets)  # merge: see --adapter-only
    g.add_argument("--adapter-only", action="store_true", help="save the LoRA adapter instead of a merged model")
    e = p.add_argument_group("summary")
    e.add_argument("--eval-limit", type=int, default=64, help="held-out prompts per set in the summary")
    e.add_argument("--eval-max-new-tokens", type=int, default=48)
    e.add_argument("--skip-eval", action="store_true", help="stop after training (no summary, no representation shift)")
