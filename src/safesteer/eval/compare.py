"""`safesteer compare`: the base model, teachers and finished align runs on the same held-out prompts.

    safesteer compare --out runs/compare --model qwen2.5-coder-0.5b-instruct --teacher runs/a \
        --run cpu=runs/a --run contrast=runs/b [--gated runs/g] [--part tune] [--n-harmful 64 ...]

Each point is one model: the base model (--model), the steered teacher of a run folder (its refusal
direction added to the base), the gated teacher (direction and gate.json, beyond the paper) and any
number of finished `safesteer align` runs (NAME=RUN_DIR: the trained model in RUN_DIR/model). All are
evaluated with one EvalConfig, built from the same options as `safesteer eval` (the report part of the
built-in sets unless --part tune, which is for choosing settings), by `suites.evaluate_models` into
OUT/<point>/.

Memory: the base model stays loaded (it is the drift reference and the teachers' weights); each run's
model is loaded, evaluated and freed before the next, so at most two models are in memory at once.
A rerun computes only what is missing (evaluate_models resumes from the answers in OUT). Answers and
scores a point's own earlier evaluation made (RUN_DIR/eval, e.g. align's before/after summary) are
taken over only when that evaluation's model.json records the same weights: each row keeps the key of
the settings it was made with (generation settings, MMLU template, drift reference), so a row is used
only where its prompt and settings are this comparison's, and anything else is computed.

Outputs, each written atomically: compare.json (every point with its rates, 95% intervals and n),
compare.md (the table), tradeoff.png (harmful refusal against edgy over-refusal), compare.html (figure
and table in the run report's template) and results.json / results.md (every point in
`safesteer eval`'s format).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..errors import SafesteerError
from ..utils import (append_jsonl, help_field, read_json, read_jsonl, release_freed_memory, write_json_atomic,
                     write_text_atomic)
from .suites import EvalConfig, ModelEntry, evaluate_models, gated_entry, model_fingerprint, model_slug, steered_entry
from .tables import format_drift, format_rate, format_report

FORMAT_VERSION = 1
COMPARE_JSON, COMPARE_MD, TRADEOFF_PNG, COMPARE_HTML = "compare.json", "compare.md", "tradeoff.png", "compare.html"
# What a point is, as compare.json and the table say it.
KIND_LABELS = {"base": "base model", "teacher": "steered teacher", "gated": "gated teacher", "run": "align run",
               "ablated": "direction ablated", "model": "model"}
# The files of an evaluation folder (suites.evaluate_models) that hold answers and scores, each row under
# the key of the settings that made it; the judged/scored files are rebuilt from these on every run.
ANSWER_FILES = ("safety.jsonl", "overrefusal.jsonl", "mmlu.jsonl", "gsm8k.jsonl", "drift.jsonl",
                "drift-reference.jsonl")
RUN_MODEL_RECORD = "model/safesteer.json"  # written last by training: the run's model is complete


@dataclass
class CompareConfig:
    """The points compared with the base model (--model); the evaluation settings are EvalConfig's."""

    runs: tuple[str, ...] = help_field((), "a finished `safesteer align` run as NAME=RUN_DIR (repeatable): the "
                                           "trained model in RUN_DIR/model, merged or adapter")
    teachers: tuple[str, ...] = help_field((), "a steered teacher as [NAME=]RUN_DIR (repeatable; name 'teacher' if "
                                               "not given): the base model with RUN_DIR's refusal direction added")
    gated: tuple[str, ...] = help_field((), "beyond the paper: a gated teacher as [NAME=]RUN_DIR (repeatable; name "
                                            "'gated' if not given): RUN_DIR's direction and gate.json")
    reuse_run_answers: bool = help_field(True, "take answers and scores from a point's own earlier evaluation "
                                               "(RUN_DIR/eval) where it used the same weights, prompts and settings")


@dataclass(frozen=True)
class Point:
    """One model of the comparison: `kind` is base, teacher, gated or run; `source` the base model's name or
    the run folder it comes from."""

    name: str
    kind: str
    source: str


# ----------------------------------------------------------------------------- the points, checked before loading


def _named(spec: str, flag: str, default: str | None) -> tuple[str, str]:
    name, sep, folder = spec.partition("=")
    if not sep:
        if default is None:
            raise SafesteerError(f"{flag} {spec!r} has no name; use {flag} NAME=RUN_DIR, e.g. {flag} cpu={spec}")
        return default, spec
    if not name.strip() or not folder.strip():
        raise SafesteerError(f"{flag} {spec!r}: use {flag} NAME=RUN_DIR with both parts, e.g. {flag} cpu=runs/a")
    return name.strip(), folder.strip()


def plan_points(config: CompareConfig, base_model: str) -> list[Point]:
    """The points in order (base, teachers, gated teachers, runs), every folder checked for what its point
    needs; a bad one is a one-line error naming the option and the fix, before any model is loaded."""
    from ..teacher.direction import DIRECTION_FILE, META_FILE
    from ..teacher.gate import GATE_FILE, GATE_META

    points = [Point("base", "base", base_model)]
    for flag, kind, specs, default in (("--teacher", "teacher", config.teachers, "teacher"),
                                       ("--gated", "gated", config.gated, "gated"),
                                       ("--run", "run", config.runs, None)):
        for spec in specs:
            name, folder = _named(spec, flag, default)
            path = Path(folder)
            if not path.is_dir():
                raise SafesteerError(f"{flag} {spec}: {folder} is not a folder; pass the --out folder of a "
                                     f"`safesteer align` run")
            needs = {"teacher": (META_FILE, DIRECTION_FILE), "gated": (META_FILE, DIRECTION_FILE, GATE_META, GATE_FILE),
                     "run": (RUN_MODEL_RECORD,)}[kind]
            absent = [f for f in needs if not (path / f).is_file()]
            if absent and kind == "run":
                raise SafesteerError(f"{flag} {spec}: {folder} holds no trained model (no {RUN_MODEL_RECORD}); finish "
                                     f"the run with `safesteer align --out {folder}` or pass another run folder")
            if absent:
                # Only the gate missing: `safesteer gate` adds it to the run; otherwise the run makes the direction.
                gate_only = kind == "gated" and (path / META_FILE).is_file() and (path / DIRECTION_FILE).is_file()
                make = f"`safesteer {'gate' if gate_only else 'align'} --out {folder}`"
                raise SafesteerError(f"{flag} {spec}: {folder} lacks {', '.join(absent)}; make "
                                     f"{'it' if len(absent) == 1 else 'them'} with {make} first")
            points.append(Point(name, kind, folder))
    if len(points) == 1:
        raise SafesteerError("nothing to compare with the base model; pass --run NAME=RUN_DIR, --teacher RUN_DIR or "
                             "--gated RUN_DIR")
    names = [p.name for p in points]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SafesteerError(f"point name(s) {', '.join(twice)} given twice ('base' is the --model); give each "
                             f"point its own NAME=RUN_DIR")
    slugs = [model_slug(n) for n in names]
    if len(set(slugs)) != len(slugs):
        raise SafesteerError(f"point names {names} map to the same folder names {slugs}; choose names that differ "
                             f"in letters or digits")
    return points


def _check_out(out: Path, points: Sequence[Point]) -> None:
    """OUT gets results.json and a folder per point: never a folder being compared, whose own files they would mix with."""
    target = out.resolve()
    for p in points[1:]:
        if target in (Path(p.source).resolve(), (Path(p.source) / "eval").resolve()):
            raise SafesteerError(f"--out {out} is the folder of the point {p.name}; give the comparison a folder of "
                                 f"its own, e.g. --out {Path(p.source).parent / 'compare'}")


# ----------------------------------------------------------------------------- one point at a time


def _run_entry(point: Point, base_model: str, loader: Callable[[str], Any], base: Any = None) -> ModelEntry:
    """A run's trained model, as align's summary loads it (`suites.load_align_entries`), so an evaluation it
    made records the same model: a merged model directory, or the adapter applied to the base model."""
    model_dir = Path(point.source) / "model"
    if (model_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        # A fresh copy of the base: the adapter is injected into the weights it is given, and the base point's
        # weights must stay as they are.
        loaded = loader(base_model)
        model = PeftModel.from_pretrained(loaded.model, str(model_dir)).eval()
        return ModelEntry(point.name, model, loaded.tokenizer, None, {**loaded.identity, "adapter": str(model_dir)})
    loaded = loader(str(model_dir))
    if base is not None:  # the weights a fine-tune kept from the base model, held once (`base` is only read)
        from ..io.models import share_equal_weights

        share_equal_weights(base.model, loaded.model)
    return ModelEntry(point.name, loaded.model, loaded.tokenizer, None, loaded.identity)


def _located_aside(info: Mapping) -> dict:
    """A model description without where it was loaded from (its path, the adapter's folder, the steering
    folder): the same weights read from a moved or differently spelled folder are the same model."""
    out = {k: v for k, v in info.items() if k not in ("path", "adapter")}
    if isinstance(out.get("steering"), Mapping):
        out["steering"] = {k: v for k, v in out["steering"].items() if k != "dir"}
    return out


def _row_id(row: dict) -> str:
    return json.dumps(row, sort_keys=True)


def import_answers(entry: ModelEntry, source: Path, target: Path) -> tuple[str, int] | None:
    """Copy into TARGET (OUT/<point>) the answers and scores an earlier evaluation folder SOURCE (e.g. a run's
    RUN_DIR/eval) holds for the same weights; returns (the model folder taken from, rows copied) or None.

    A model folder of SOURCE qualifies only when its model.json describes the same model (locations aside)
    and its fingerprint equals that of `entry`'s weights under that description: the same weights, exactly.
    Rows are copied as they are, keys included, so evaluate_models uses each only where its prompt and
    settings are this evaluation's; nothing is counted from them directly.
    """
    if not source.is_dir():
        return None
    mine = target / "model.json"
    if mine.is_file() and read_json(mine).get("fingerprint") != model_fingerprint(entry):
        return None  # another model under this name: evaluate_models says so in one line
    wanted = _located_aside(entry.info)
    for marker in sorted(source.glob("*/model.json")):
        try:
            recorded = read_json(marker)
        except (OSError, ValueError):
            continue
        info = recorded.get("info") if isinstance(recorded, dict) else None
        if not isinstance(info, dict) or _located_aside(info) != wanted:
            continue
        if model_fingerprint(replace(entry, info=info)) != recorded.get("fingerprint"):
            continue
        copied = 0
        for name in ANSWER_FILES:
            try:
                rows = read_jsonl(marker.parent / name)
            except ValueError:  # a damaged file is not taken over; its answers are computed again
                continue
            present = {_row_id(r) for r in read_jsonl(target / name)}
            new = [r for r in rows if isinstance(r, dict) and _row_id(r) not in present]
            if new:
                target.mkdir(parents=True, exist_ok=True)
                append_jsonl(target / name, new)
                copied += len(new)
        return str(marker.parent), copied
    return None


def _evaluate_point(point: Point, base: ModelEntry, base_model: str, config: EvalConfig, out: Path,
                    loader: Callable[[str], Any], reuse: bool, echo: Callable[[str], None]) -> tuple[dict, dict | None]:
    """Evaluate one point next to the base model. Its model lives only in this function's frame, so it is
    freed when the function returns."""
    t0 = time.time()
    if point.kind == "teacher":
        entry = steered_entry(base, point.source, name=point.name)
    elif point.kind == "gated":
        entry = gated_entry(base, point.source, name=point.name)
    else:
        entry = _run_entry(point, base_model, loader, base)
        echo(f"{point.name}: loaded {Path(point.source) / 'model'} in {time.time() - t0:.1f} s")
    reused = None
    if reuse:
        found = import_answers(entry, Path(point.source) / "eval", out / model_slug(entry.name))
        if found:
            reused = {"from": found[0], "rows": found[1]}
            if found[1]:
                echo(f"{point.name}: took {found[1]} answers and scores from {found[0]} (same weights; each used "
                     f"only where its prompt and settings match)")
    return evaluate_models([base, entry], config, out, echo=echo), reused


def run_compare(base_model: str, points: Sequence[Point], config: EvalConfig, out: str | Path,
                loader: Callable[[str], Any], reuse: bool = True, echo: Callable[[str], None] = print) -> dict:
    """Evaluate `points` (from `plan_points`; the first is the base model) one at a time into OUT and write
    every output; returns compare.json's content. `loader(name)` loads a model (io.models.load_model with
    the command's dtype and device)."""
    out = Path(out)
    _check_out(out, points)
    t0 = time.time()
    loaded = loader(base_model)
    echo(f"base: loaded {base_model} in {time.time() - t0:.1f} s")
    base = ModelEntry(points[0].name, loaded.model, loaded.tokenizer, None, loaded.identity)
    del loaded
    _check_trained_from(points, base)
    if reuse:  # e.g. the base model's MMLU scores from a run's own summary
        for source in dict.fromkeys(p.source for p in points[1:]):
            import_answers(base, Path(source) / "eval", out / model_slug(base.name))
    combined: dict | None = None
    reused: dict[str, dict | None] = {}
    for point in points[1:]:
        results, reused[point.name] = _evaluate_point(point, base, base_model, config, out, loader, reuse, echo)
        release_freed_memory()  # one model at a time: the next loads into this one's freed memory
        if combined is None:
            combined = results
        else:  # the base's numbers are the same in every pair; the latest are kept
            combined["models"].update(results["models"])
        combined["models"] = {p.name: combined["models"][p.name] for p in points if p.name in combined["models"]}
        # evaluate_models wrote this pair alone; the folder's results.json holds every point evaluated so far.
        write_json_atomic(out / "results.json", combined)
    assert combined is not None  # plan_points gives at least one point besides the base
    write_text_atomic(out / "results.md", format_report(combined))
    data = compare_record(combined, points, reused)
    write_outputs(out, data)
    return data


def _check_trained_from(points: Sequence[Point], base: ModelEntry) -> None:
    """A run trained from another base model: its adapter cannot be applied to this one (an error), and its
    drift would be measured against a model it never was (a warning)."""
    for p in points:
        if p.kind != "run":
            continue
        try:
            trained_from = (read_json(Path(p.source) / RUN_MODEL_RECORD).get("base_model") or {}).get("name")
        except (OSError, ValueError, AttributeError):
            continue
        if not trained_from or trained_from == base.info.get("name"):
            continue
        line = f"run {p.name} ({p.source}) was trained from {trained_from}, not from --model {base.info.get('name')}"
        if (Path(p.source) / "model" / "adapter_config.json").is_file():
            raise SafesteerError(f"{line}; its adapter fits only that model: pass --model {trained_from}")
        print(f"warning: {line}; its KL drift is measured against --model")


# ----------------------------------------------------------------------------- compare.json, shared with the run report


def _kind_from_info(info: Mapping, first: bool) -> str:
    mode = (info.get("steering") or {}).get("mode") if isinstance(info.get("steering"), Mapping) else None
    if mode in ("add", "gated", "ablate"):
        return {"add": "teacher", "gated": "gated", "ablate": "ablated"}[mode]
    return "base" if first else "model"


def compare_points(results: dict, kinds: Mapping[str, str] | None = None,
                   sources: Mapping[str, str] | None = None) -> list[dict]:
    """One record per model of an evaluation's results.json (`suites.evaluate_models`): what compare.json lists
    and the trade-off figure (`figures.plot_refusal_tradeoff`) draws, for `safesteer compare` and the run
    report alike. Rates are the results' own records (k, n, rate, 95% Wilson interval), copied unchanged.
    Without `kinds`, the first model (the drift reference) is the base and a steered model is a teacher."""
    models = {k: v for k, v in (results.get("models") or {}).items() if isinstance(v, dict)}
    points = []
    for i, (name, m) in enumerate(models.items()):
        safety, over = m.get("safety") or {}, m.get("overrefusal") or {}
        kind = (kinds or {}).get(name) or _kind_from_info(m.get("info") or {}, i == 0)
        points.append({
            "name": name,
            "kind": kind,
            "what": KIND_LABELS.get(kind, kind),
            "source": (sources or {}).get(name),
            "folder": m.get("slug"),
            "harmful_refusal": (safety.get("overall") or {}).get("refusal"),
            "harmful_sets": {s: (e or {}).get("refusal") for s, e in (safety.get("sets") or {}).items()},
            "overrefusal": {s: (e or {}).get("refusal") for s, e in (over.get("sets") or {}).items()},
            "kl_drift": m.get("drift"),
            "mmlu": (m.get("mmlu") or {}).get("accuracy"),
            "gsm8k": (m.get("gsm8k") or {}).get("accuracy"),
        })
    return points


def tradeoff_set(points: Sequence[dict]) -> str | None:
    """The over-refusal set on the trade-off figure's x axis: edgy (harmless prompts that sound harmful, where
    over-refusal shows first), else the first over-refusal set evaluated; None without any."""
    names = list(dict.fromkeys(s for p in points for s in (p.get("overrefusal") or {})))
    return "edgy" if "edgy" in names else (names[0] if names else None)


def compare_record(results: dict, points: Sequence[Point], reused: Mapping[str, dict | None]) -> dict:
    """compare.json: the settings and sets of the evaluation, and every point."""
    cfg = results.get("config") or {}
    records = compare_points(results, {p.name: p.kind for p in points}, {p.name: p.source for p in points})
    for r in records:
        r["reused_answers"] = reused.get(r["name"])
    return {"format": FORMAT_VERSION, "created_by": "safesteer compare", "part": cfg.get("part"),
            "split_seed": cfg.get("split_seed"), "seed": cfg.get("seed"), "judge": results.get("refusal_judge"),
            "drift_reference": results.get("drift_reference"), "tradeoff_set": tradeoff_set(records),
            "config": cfg, "sets": results.get("sets"), "generation": results.get("generation"),
            "results": "results.json", "points": records}


def table_columns(data: dict) -> list[str]:
    """The over-refusal sets shown as columns: edgy and harmless first, then any others in order."""
    names = list(dict.fromkeys(s for p in data["points"] for s in (p.get("overrefusal") or {})))
    return [s for s in ("edgy", "harmless") if s in names] + [s for s in names if s not in ("edgy", "harmless")]


def table_rows(data: dict) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the comparison table (compare.md, compare.html, the command's output)."""
    sets = table_columns(data)
    headers = ["point", "what", "harmful refusal", *(f"{s} over-refusal" for s in sets), "KL drift", "MMLU"]
    rows = []
    for p in data["points"]:
        rows.append([p["name"], p["what"], format_rate(p["harmful_refusal"]),
                     *(format_rate((p.get("overrefusal") or {}).get(s)) for s in sets),
                     format_drift(p.get("kl_drift")), format_rate(p.get("mmlu"))])
    return headers, rows


def _md_cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def format_markdown(data: dict) -> str:
    """compare.md: what was measured, and the table."""
    headers, rows = table_rows(data)
    cfg = data.get("config") or {}
    decoding = "sampled" if cfg.get("sample") or (cfg.get("samples") or 1) > 1 else "greedy"
    lines = ["# safesteer compare", "",
             f"Every point on the same held-out prompts: the {data.get('part')} part of the built-in evaluation sets "
             f"(split seed {data.get('split_seed')}, subset seed {data.get('seed')}; the sets are listed below), "
             f"{decoding} answers of {cfg.get('max_new_tokens')} new tokens. Refusals by the keyword judge "
             f"({data.get('judge')}); rates with their 95% Wilson interval and counts. KL drift: mean nats per token "
             f"against {data.get('drift_reference')} on {cfg.get('n_drift')} benign prompts [normal 95% interval over "
             f"prompts]. MMLU: letter log-likelihood.",
             "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    lines += ["", f"Trade-off figure: {TRADEOFF_PNG}. Every number and answer: results.json and each point's folder.",
              "", "## Prompt sets", ""]
    lines += [f"- {key}: {info.get('n_prompts')} prompts, {info.get('source')}" for key, info in (data.get("sets") or {}).items()]
    lines += ["", "## Points", ""]
    for p in data["points"]:
        reused = p.get("reused_answers") or {}
        taken = f"; {reused['rows']} earlier answers and scores copied from {reused['from']} (used only where prompt and settings match)" if reused.get("rows") else ""
        lines.append(f"- {p['name']}: {p['what']}, {p['source']} (answers in {p['folder']}/){taken}")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, data: dict) -> None:
    """compare.json, compare.md, tradeoff.png and compare.html from compare.json's content, each atomically."""
    from ..report.compare_page import write_compare_page, write_tradeoff_png

    write_json_atomic(out / COMPARE_JSON, data)
    write_text_atomic(out / COMPARE_MD, format_markdown(data))
    if not write_tradeoff_png(data, out / TRADEOFF_PNG):  # no over-refusal or no safety suite: no figure, and no stale one
        (out / TRADEOFF_PNG).unlink(missing_ok=True)
    write_compare_page(data, out / COMPARE_HTML)


# ----------------------------------------------------------------------------- CLI


def _cmd_compare(args: argparse.Namespace) -> int:
    """the base model, teachers and finished align runs on the same held-out prompts: trade-off figure and table

    Evaluates every point with one evaluation setting (the report part of the built-in sets; --part tune
    for choosing settings) into OUT/<point>/, one model besides the base in memory at a time, and writes
    compare.json, compare.md, tradeoff.png (harmful refusal against edgy over-refusal, 95% intervals) and
    compare.html. A rerun computes only what is missing; answers a run's own evaluation made with the same
    weights and settings are taken over.
    """
    from ..cli import config_values
    from ..io.models import load_model
    from ..io.run_dir import check_out_dir, claim_out_dir
    from .capability import require_lm_eval
    from .suites import eval_config_from_args

    t_start = time.time()
    config = CompareConfig(**{k: v for k, v in config_values(args, CompareConfig).items() if v is not None})
    eval_config = eval_config_from_args(args)
    points = plan_points(config, args.model)
    _check_out(Path(args.out), points)
    check_out_dir(args.out)
    if eval_config.lm_eval_tasks:
        require_lm_eval()  # before minutes of model loading
    out = claim_out_dir(args.out, "compare")

    def loader(name: str):
        return load_model(name, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)

    data = run_compare(args.model, points, eval_config, out, loader, reuse=config.reuse_run_answers, echo=print)
    headers, rows = table_rows(data)
    print("\n| " + " | ".join(headers) + " |\n|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(_md_cell(c) for c in row) + " |")
    print(f"\ntotal wall-clock {time.time() - t_start:.0f} s; wrote {out / COMPARE_JSON}, {out / COMPARE_MD}, "
          f"{out / TRADEOFF_PNG} and {out / COMPARE_HTML}")
    return 0


def add_cli(subparsers) -> None:
    from ..cli import add_command, add_config_args, add_model_args
    from .suites import add_eval_options

    p = add_command(subparsers, "compare", _cmd_compare,
                    out="output folder: compare.json, compare.md, tradeoff.png, compare.html, answers per point")
    add_model_args(p)  # the base model: the reference of the drift and the weights the teachers steer
    points = p.add_argument_group("points besides the base model (--model)")
    add_config_args(points, CompareConfig, default=None, flags={"runs": "--run", "teachers": "--teacher"}, show_default=False,
                    types=dict.fromkeys(("runs", "teachers", "gated"), lambda spec: (spec,)),  # a path, uncut
                    metavar={"runs": "NAME=RUN_DIR", "teachers": "[NAME=]RUN_DIR", "gated": "[NAME=]RUN_DIR"})
    add_eval_options(p)
