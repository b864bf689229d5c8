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
from .errors import SafesteerError
from .train.config import FINETUNE_MODES, PRESETS, TrainConfig, default_preset
from .utils import int_list, read_json, sha256_file, write_json_atomic


def output_is_complete(out_dir: str | Path) -> bool:
    """True when OUT/model holds a finished trained model (its safesteer.json is written last)."""
    return (Path(out_dir) / "model" / "safesteer.json").is_file()


# Token-stage settings the CPU preset uses on top of the paper's (chosen by measurement on the
# default model; the "paper" preset keeps teacher.tokens' own defaults).
ALIGN_TOKEN_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    # The paper's vote over the default model's teacher admits mostly rare tokens (code fragments, CJK,
    # "abort") that carry ~1-2% of the probability on the student's rollouts. A floor on the mean steered
    # probability (1e-3) and a narrower vote (K' = 10) keep the tokens the teacher actually emits and
    # boosts: "Unfortunately", " unable", "Sorry", " sorry", " cannot", "I", ... (~20% of the mass).
    "cpu": {"min_steered_prob": 1e-3, "top_k_per_position": 10},
}


def _parse_assignments(items: Sequence[str], config_cls: type, flag: str) -> dict:
    """KEY=VALUE strings -> typed overrides for a config dataclass (types taken from its defaults)."""
    known = {f.name: f for f in fields(config_cls)}
    out = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in known:
            raise SafesteerError(f"{flag} {item!r}: use KEY=VALUE with KEY one of {', '.join(known)}")
        default = known[key].default
        if raw.lower() in ("none", "null"):
            out[key] = None
        elif "tuple" in str(known[key].type) or "," in raw:  # a list setting: layers=8,10,12 or layers=6-9
            out[key] = int_list(raw)
        elif isinstance(default, bool):
            out[key] = raw.lower() in ("1", "true", "yes", "on")
        elif isinstance(default, int):
            out[key] = int(raw)
        elif isinstance(default, float) or default is None:
            try:
                out[key] = int(raw) if raw.lstrip("-").isdigit() else float(raw)
            except ValueError:
                out[key] = raw
        else:
            out[key] = raw
    return out


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
    values.update(_parse_assignments(args.direction_config, DirectionConfig, "--direction-config"))
    # The align presets carry the direction presets of the same name (cpu: the relative induce filter).
    config = DirectionConfig.from_preset(args.preset if args.preset in DIRECTION_PRESETS else "paper", **values)
    before = _mtime(out / META_FILE)
    spec = run_direction_stage(model, tokenizer, identity, out, splits["harmful"]["direction_train"],
                               splits["harmless"]["direction_train"], splits["harmful"]["direction_val"],
                               splits["harmless"]["direction_val"], config)
    return spec, before is not None and _mtime(out / META_FILE) == before


def _ensure_tokens(args, preset: str, model, tokenizer, identity, out: Path) -> bool:
    """Stage 2; run_token_stage itself reuses a matching safety_tokens.json. Returns True if reused."""
    from .io.prompts import builtin_splits
    from .teacher.tokens import JSON_NAME, SafetyTokenConfig, filter_harmless, run_token_stage

    values = dict(ALIGN_TOKEN_PRESETS.get(preset, {}))
    values.update(_parse_assignments(args.tokens_config, SafetyTokenConfig, "--tokens-config"))
    config = SafetyTokenConfig(**values)
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


def summarize(args: argparse.Namespace, out: Path) -> dict:
    """The evaluation summary at the end of `align`: base vs aligned model (`eval.suites.align_summary`).

    The trained model is in OUT/model, the base model is `args.model`.
    """
    from .eval.suites import align_summary

    return align_summary(run_dir=out, base_model=args.model, aligned_dir=out / "model", args=args)


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
    trainer = Trainer(model, tokenizer, spec, load_safety_tokens(out), prompts, config, out, run_info=info)
    resumed_at = trainer.step
    if resumed_at:
        print(f"resuming from step {resumed_at} of {config.steps}")
    trainer.train()
    print(f"wrote {trainer.save_model()}")
    trainer.accelerator.free_memory()  # drop Accelerate's references, so the student can be freed
    return {"seconds": round(time.time() - t0, 2), "reused": False, "resumed_at_step": resumed_at}


def _cmd_align(args: argparse.Namespace) -> int:
    import gc

    from .cli import load_model_from_args
    from .io.models import model_family
    from .io.prompts import load_prompts, stage_prompts

    parallel.init()  # launched on several processes: join them before the model is loaded onto this one's GPU
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.preset = args.preset if args.preset != "auto" else default_preset()
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
            timed("summary", summarize, args, out)
    finally:
        if parallel.is_main_process():
            _record_timing(out, {"preset": args.preset, "stages": stages, "total_s": round(time.time() - t_start, 2),
                                 "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    print("wall-clock: " + ", ".join(f"{k} {v.get('seconds', 0):.0f} s" + (" (reused)" if v.get("reused") else "")
                                     for k, v in stages.items()) + f"; total {time.time() - t_start:.0f} s")
    return 0


def add_cli(subparsers) -> None:
    from .cli import add_config_args, add_model_args

    p = subparsers.add_parser(
        "align", help="direction -> safety tokens -> training -> summary, in one run directory",
        description="Safety-align a model end to end. Every stage writes its artifacts to --out and reuses them on a "
                    "rerun; training resumes from its last checkpoint. Presets: cpu (a LoRA run that fits 2 CPU "
                    "cores), paper (the released runs: full fine-tune, 4x8 rollouts of 512 tokens, 25 steps); every "
                    "setting below overrides the preset.")
    add_model_args(p)
    p.add_argument("--out", required=True, help="run directory (created; reused and resumed if it exists)")
    p.add_argument("--preset", choices=("auto", *PRESETS), default="auto",
                   help="auto: paper on a CUDA device, cpu otherwise")
    p.add_argument("--prompts", default=None, help="training prompts (default: the built-in harmful training split)")
    p.add_argument("--field", default=None, help="field/column holding the prompt text in a file or dataset")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the built-in prompt splits")
    p.add_argument("--direction", default=None, metavar="DIR",
                   help="use the refusal direction in DIR (direction.safetensors/.json) instead of running stage 1")
    p.add_argument("--direction-config", action="append", default=[], metavar="KEY=VALUE",
                   help="stage-1 setting (DirectionConfig field), repeatable")
    p.add_argument("--tokens-config", action="append", default=[], metavar="KEY=VALUE",
                   help="stage-2 setting (SafetyTokenConfig field, e.g. rank_by=weighted), repeatable")
    g = p.add_argument_group("training (default: the preset's value)")
    choices = {"loss": LOSS_VARIANTS, "finetune": FINETUNE_MODES, "bf16": ("auto", "on", "off"),
               "teacher_dtype": ("same", "bfloat16", "float16")}
    add_config_args(g, TrainConfig, [f.name for f in fields(TrainConfig) if f.name not in ("preset", "merge")],
                    default=None, choices=choices)  # merge: see --adapter-only
    g.add_argument("--adapter-only", action="store_true", help="save the LoRA adapter instead of a merged model")
    e = p.add_argument_group("summary")
    e.add_argument("--eval-limit", type=int, default=64, help="held-out prompts per set in the summary")
    e.add_argument("--eval-max-new-tokens", type=int, default=48)
    e.add_argument("--skip-eval", action="store_true", help="stop after training")
    p.set_defaults(func=_cmd_align)
