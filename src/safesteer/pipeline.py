"""`safesteer align`: direction -> safety tokens -> training -> evaluation summary, in one run directory.

    safesteer align --out runs/demo                 # every stage; a rerun reuses or resumes each one

The stages run in order on one loaded model. Each writes its artifacts to OUT and reuses them when a
rerun finds a matching result (`teacher.direction.run_direction_stage`, `teacher.tokens.run_token_stage`),
training resumes from its last checkpoint and is skipped when OUT/model is complete, and the summary
(`eval.suites.align_summary`) resumes from the answers already generated. Every stage's wall-clock
(and whether it was reused) goes to OUT/timings.json, earlier runs' timings kept under previous_runs.

Reuse is never silent about a change. Each stage's artifact records what made it: stage 1 the model,
its prompts and settings (direction.json), stage 2 those plus the direction's sha256 (safety_tokens.json),
training the model, its settings, the training prompts and the sha256 of the direction and token files
(OUT/model/safesteer.json, and the checkpoint while it runs). A rerun whose model, prompts, settings or
upstream artifacts differ from that record stops with one line naming the first differences (OLD -> NEW)
and the ways out: the same options again, --restart STAGE (redo STAGE and the stages after it),
--overwrite (start the run over) or a new --out. The summary's own settings (--eval-limit,
--eval-max-new-tokens, --eval-part) never make a run stale: the summary is evaluated again on every run,
reusing only answers generated with the same settings, and the trained model stays as it is.
OUT must be new, empty or a safesteer run (`io.run_dir`): align writes and removes files there.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Callable, Sequence

from . import parallel
from .core.loss import LOSS_VARIANTS
from .errors import SafesteerError
from .io.run_dir import changed_settings, check_out_dir, claim_out_dir, remove_run_files, summarize_changes
from .train.config import FINETUNE_MODES, PAPER_LR, PRESETS, TrainConfig, stage_preset
from .utils import phase, read_json, release_freed_memory, sha256_file, sha256_texts, write_json_atomic

STAGES = ("direction", "tokens", "training", "summary")
# What each stage leaves in OUT: --restart STAGE removes these for STAGE and every later stage.
STAGE_FILES = {
    # The gate (`safesteer gate`, gate=on) is fitted for the direction, so it goes with it.
    "direction": ("direction.safetensors", "direction.json", "direction_scores.png", "direction_failed.json",
                  "direction_failed.png", "gate.safetensors", "gate.json"),
    "tokens": ("safety_tokens.json", "safety_tokens.png"),
    "training": ("checkpoint", ".checkpoint.*", "model", ".model.*", "metrics.jsonl"),
    # The base model's answers (OUT/eval/base) stay: they depend on neither the direction nor training.
    "summary": ("eval/aligned", "eval/teacher", "eval/results.json", "eval/results.md", "representation.json",
                "report.html"),
}
# --overwrite removes these as well: the run starts over.
RUN_FILES = ("eval", "timings.json")
# Training settings a trained model or an interrupted run is reused across, since they change no result: how often
# it checkpoints, after how many non-finite steps in a row it stops, the preset's name (the values it sets are
# compared one by one) and chunk_size (a memory knob: the loss is the same at any chunk size, to float rounding;
# cpu-gated's went from 32 to 64 at 4ce8eeb).
TRAINING_FREE = ("checkpoint_every", "max_nonfinite_steps", "preset", "chunk_size")


def output_is_complete(out_dir: str | Path) -> bool:
    """True when OUT/model holds a finished trained model (its safesteer.json is written last)."""
    return (Path(out_dir) / "model" / "safesteer.json").is_file()


def stage_settings(args: argparse.Namespace, config_cls: type, stage: str) -> dict:
    """Stage-1/2 settings given to `align`: --STAGE-config KEY=VALUE items, then --STAGE.FIELD options."""
    from .cli import config_values, parse_assignments

    values = parse_assignments(getattr(args, f"{stage}_config"), config_cls, f"--{stage}-config")
    values.update({k: v for k, v in config_values(args, config_cls, prefix=f"{stage}.").items() if v is not None})
    return values


def stage_config(config_cls: type, preset: str, values: dict) -> Any:
    """`config_cls.from_preset(preset)` with `values`. from_preset drops None (an option not given), so a
    value the user set to none on purpose (--direction-config induce_fraction=none) is applied after it."""
    from dataclasses import replace

    config = config_cls.from_preset(preset, **values)
    chosen_none = {k: None for k, v in values.items() if v is None}
    return replace(config, **chosen_none) if chosen_none else config


def _stale(out: Path, what: str, stage: str, verb: str = "reuse") -> Callable[[list[str]], None]:
    """What a stage calls when OUT holds its result made otherwise (`changes`): one line, and the ways out."""
    def refuse(changes: list[str]) -> None:
        raise SafesteerError(f"{out} holds {what} made with other settings or inputs ({summarize_changes(changes)}); "
                             f"rerun with the earlier settings to {verb} it, pass --restart {stage} to redo {stage} "
                             f"and the stages after it, --overwrite to start the run over, or choose a new --out")
    return refuse


def _start_over(args: argparse.Namespace, out: Path) -> None:
    """--overwrite: remove what earlier align runs left in OUT; --restart STAGE: STAGE's files and every later stage's."""
    if not (args.overwrite or args.restart):
        return
    first = STAGES[0] if args.overwrite else args.restart
    patterns = [name for stage in STAGES[STAGES.index(first):] for name in STAGE_FILES[stage]]
    if args.overwrite:
        patterns += RUN_FILES
    if parallel.is_main_process():
        removed = remove_run_files(out, patterns)
        what = "starting the run over" if args.overwrite else f"redoing {first} and the stages after it"
        print(f"{what}: removed {', '.join(removed) if removed else 'nothing'} from {out}")
    parallel.barrier()


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
    config = stage_config(DirectionConfig, _stage(args.preset, DIRECTION_PRESETS), values)
    before = _mtime(out / META_FILE)
    spec = run_direction_stage(model, tokenizer, identity, out, splits["harmful"]["direction_train"],
                               splits["harmless"]["direction_train"], splits["harmful"]["direction_val"],
                               splits["harmless"]["direction_val"], config,
                               on_change=_stale(out, "a refusal direction (stage 1)", "direction"))
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
    config = stage_config(SafetyTokenConfig, _stage(preset, TOKEN_PRESETS), stage_settings(args, SafetyTokenConfig, "tokens"))
    before = _mtime(out / JSON_NAME)
    prompts = filter_harmless(model, tokenizer, builtin_splits(args.split_seed)["harmless"]["direction_val"],
                              config.n_prompts)
    run_token_stage(model, tokenizer, identity, args.direction or out, out, prompts, config, progress=True,
                    on_change=_stale(out, "safety tokens (stage 2)", "tokens"))
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

    phase("summary")  # the kill -9 soak test stops runs at these announced points
    entries = load_align_entries(out, args.model, out / "model", args)
    if parallel.is_main_process():
        record_representation(args, out, entries[0], entries[-1])
        release_freed_memory()
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
                                  run_dir=out, base_ctx=base.context, teacher_layer=spec.layer)
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


def _run_info(args: argparse.Namespace, identity: dict, out: Path) -> dict:
    """What training is made from besides its settings and prompts: the base model, the prompt source and the
    stage-1/2 artifacts by sha256. Recorded in OUT/model/safesteer.json and the checkpoint, compared on a rerun."""
    direction_dir = Path(args.direction) if args.direction else out
    return {"base_model": identity,
            "data": {"train_prompts_source": args.prompts or "builtin:harmful/train", "split_seed": args.split_seed},
            "artifacts": {name: sha256_file(folder / name) for folder, name in (
                (direction_dir, "direction.safetensors"), (direction_dir, "direction.json"),
                (out, "safety_tokens.json"))}}


def _prompts_sha(prompts: Sequence[Any], config: TrainConfig) -> str:
    """The sha256 of the prompts training uses (the first num_prompts of them), as the Trainer records it."""
    from .io.prompts import prompt_texts

    texts = prompt_texts(prompts)
    return sha256_texts(texts[: config.num_prompts] if config.num_prompts else texts)


def stored_training_changes(out: Path, info: dict, config: TrainConfig, prompts_sha: str) -> tuple[str, list[str]]:
    """What OUT holds of stage 3 ("a trained model", "an interrupted training run", or "" for nothing) and
    how it was made differently from this run: one 'SETTING OLD -> NEW' line per difference in settings,
    training prompts, base model, split seed and stage-1/2 artifacts ([] when they match)."""
    from .io.models import comparable_identity
    from .train.checkpoint import find_checkpoint

    free = TRAINING_FREE
    if output_is_complete(out):
        what, path = "a trained model", out / "model" / "safesteer.json"
    else:
        ckpt = find_checkpoint(out, tidy=False)
        if ckpt is None:
            return "", []
        # Merging happens when the model is saved, so a resumed run may change it.
        what, path, free = "an interrupted training run", ckpt / "state.json", (*TRAINING_FREE, "merge")
    try:
        record = read_json(path)
    except (OSError, ValueError, RecursionError):
        return what, [f"{path.relative_to(out)} is unreadable"]
    if what == "a trained model":
        prompts_before = (record.get("train_prompts") or {}).get("sha256")
    else:  # the checkpoint's own fields, and what align gave the Trainer (run_info, absent in older checkpoints)
        prompts_before, record = record.get("prompts_sha256"), {**(record.get("run_info") or {}), **record}
    # A setting added after the record was written counts as its default, the behaviour it had then; one
    # that no longer exists is not compared.
    now = asdict(config)
    before = {f.name: f.default for f in fields(TrainConfig)} | (record.get("config") or {})
    changes = changed_settings({k: before[k] for k in now}, now, skip=free)
    changes += changed_settings({"training prompts": prompts_before}, {"training prompts": prompts_sha})
    # Parts an older record lacks are not compared: it was written before they were recorded.
    if "base_model" in record:
        changes += changed_settings(comparable_identity(record["base_model"]), comparable_identity(info["base_model"]),
                                    "model.")
    if "split_seed" in (record.get("data") or {}):
        changes += changed_settings({"split_seed": record["data"]["split_seed"]}, {"split_seed": info["data"]["split_seed"]})
    if "artifacts" in record:
        changes += changed_settings(record["artifacts"], info["artifacts"])
    return what, changes


def _train(args: argparse.Namespace, model: Any, tokenizer: Any, info: dict, spec: Any, prompts: Sequence[Any],
           config: TrainConfig, out: Path) -> dict:
    """Stage 3 into OUT (resumed from its checkpoint if there is one); returns the stage's timing record."""
    from .teacher.tokens import load_safety_tokens
    from .train.trainer import Trainer

    t0 = time.time()
    trainer = Trainer(model, tokenizer, spec, load_safety_tokens(out, model), prompts, config, out, run_info=info)
    resumed_at = trainer.step
    print(f"[training] autocast {trainer.precision['autocast']}, output heads in {trainer.precision['head']}")
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
    from .cli import load_model_from_args, resolve_preset
    from .io.models import model_family
    from .io.prompts import load_prompts, stage_prompts

    parallel.init()  # launched on several processes: join them before the model is loaded onto this one's GPU
    out = Path(args.out)
    check_out_dir(out)  # before minutes of loading; the folder is claimed (created, marked) once the inputs are read
    args.preset = resolve_preset(args.preset)
    if args.prompts:
        prompts = load_prompts(args.prompts, field=args.field)
    else:
        prompts = stage_prompts(None, "train", "harmful", args.split_seed)
    stages: dict[str, dict] = {}
    t_start = time.time()
    claimed = False

    def timed(name: str, fn, *a):
        t0 = time.time()
        try:
            return fn(*a)
        finally:  # a failed stage is recorded too, with the time it took to fail
            stages[name] = {"seconds": round(time.time() - t0, 2)}
            release_freed_memory()  # the next stage's peak should not sit on this one's leftovers

    try:
        loaded = timed("load_model", load_model_from_args, args)
        model, tokenizer, identity = loaded.model, loaded.tokenizer, loaded.identity
        del loaded
        config = _train_config_from_args(args, model_family(model))
        print(f"preset {args.preset}: {config.steps} steps x {config.prompts_per_step} prompts x "
              f"{config.rollouts_per_prompt} rollouts, {config.max_new_tokens} new tokens, {config.finetune}, "
              f"loss {config.loss}, lr {config.learning_rate:g}")
        claim_out_dir(out, "align")
        claimed = True
        _start_over(args, out)
        spec, reused = timed("direction", _ensure_direction, args, model, tokenizer, identity, out)
        stages["direction"]["reused"] = reused
        reused = timed("tokens", _ensure_tokens, args, args.preset, model, tokenizer, identity, out)
        stages["tokens"]["reused"] = reused
        if parallel.world_size() > 1:  # all processes go on with the same stage files, whichever wrote them last
            from .teacher.direction import load_direction

            parallel.barrier()
            spec = load_direction(args.direction or out, model)  # --direction DIR: that direction, never OUT's
        info = _run_info(args, identity, out)
        what, changes = stored_training_changes(out, info, config, _prompts_sha(prompts, config))
        if changes:  # the same files on every process: all stop here together
            _stale(out, what, "training", "resume" if "interrupted" in what else "reuse")(changes)
        if output_is_complete(out):
            print(f"{out / 'model'} already holds the trained model (same settings and inputs); skipping training")
            stages["training"] = {"seconds": 0.0, "reused": True}
        else:
            stages["training"] = _train(args, model, tokenizer, info, spec, prompts, config, out)
        del model
        release_freed_memory()
        if not args.skip_eval:
            write_run_documents(out)  # the trained model's card and report stand even if the summary fails
            timed("summary", summarize, args, out)
    finally:
        if claimed and parallel.is_main_process():  # never into a folder that was refused or not made
            _record_timing(out, {"preset": args.preset, "stages": stages, "total_s": round(time.time() - t_start, 2),
                                 "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    write_run_documents(out)  # with the summary's table and the timings
    print("wall-clock: " + ", ".join(f"{k} {v.get('seconds', 0):.0f} s" + (" (reused)" if v.get("reused") else "")
                                     for k, v in stages.items()) + f"; total {time.time() - t_start:.0f} s")
    return 0


def add_cli(subparsers) -> None:
    from .cli import add_command, add_config_args
    from .teacher.direction import DIRECTION_PRESETS, DirectionConfig
    from .io.prompts import EVAL_PARTS
    from .teacher.tokens import METHODS, RANK_BY, TOKEN_PRESETS, SafetyTokenConfig

    p = add_command(subparsers, "align", _cmd_align, model=True, presets=PRESETS,
                    out="run directory (created; reused and resumed if it exists; must be new, empty or a "
                        "safesteer run)",
                    prompts={"--prompts": "training prompts (default: the built-in harmful training split)"})
    again = p.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true",
                       help="start the run in --out over: remove what earlier align runs left there first")
    again.add_argument("--restart", choices=STAGES, default=None, metavar="STAGE",
                       help=f"redo STAGE ({', '.join(STAGES)}) and every stage after it, reusing the ones before "
                            f"it; for a run whose STAGE was made with other settings (a rerun names them)")
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
    e.add_argument("--eval-part", dest="part", choices=EVAL_PARTS, default="report",
                   help="built-in evaluation prompts: report (the default) or tune (disjoint, for choosing settings)")
    e.add_argument("--eval-max-new-tokens", type=int, default=48)
    e.add_argument("--skip-eval", action="store_true", help="stop after training (no summary, no representation shift)")
