"""The run report: one self-contained HTML page built from a run directory's artifacts.

    safesteer report runs/demo                  # -> runs/demo/report.html
    write_report("runs/demo")                   # what `safesteer align` calls at its end

Only artifacts are read, no model is run. Each section is described as data: a list of blocks (a
table, a figure, a note, a missing artifact, blocks side by side, ...; see `Block`), and the Jinja2
template templates/report.html.j2 turns them into markup, escaping every value (autoescape), so no text
from a run (responses, prompts, token strings) can become markup. Every figure is drawn with
matplotlib from the JSON artifacts (`figures.py`) and embedded as a base64 PNG data URI; the CSS is
inline; there is no script and no external reference (a Content-Security-Policy forbids any), so the
file opens from disk, offline, and can be attached to an issue or a mail. Stages are often run
separately, so each section draws what its artifact allows and otherwise says which artifact is missing.

Sections: configuration, refusal direction, safety tokens, training, before/after evaluation,
representation shift, sample responses. The representation shift needs the models themselves, so
`representation.representation_shift` computes it while they are loaded (`safesteer align` does, in its
summary) and writes representation.json, which the report only plots.
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import SafesteerError
from ..utils import read_json, read_jsonl, write_text_atomic
from .figures import (REFUSAL_RATE_KEYS, as_float, candidate_rows, first_key, plot_direction_scores, plot_rates,
                      plot_refusal_tradeoff, plot_representation, plot_safety_tokens, plot_tradeoff, plot_training,
                      png_data_uri)
from .representation import REPRESENTATION_NAME

REPORT_NAME = "report.html"
TEMPLATE = "report.html.j2"
BLOCKS_TEMPLATE = "blocks.html.j2"  # the macros that draw a block; report.html.j2 imports them

# (id, title) in page order; the ids are stable anchors (the browser test looks for them).
SECTIONS = (
    ("configuration", "1. Configuration"),
    ("direction", "2. Refusal direction"),
    ("safety-tokens", "3. Safety tokens S"),
    ("training", "4. Training"),
    ("evaluation", "5. Before / after"),
    ("representation", "6. Representation shift"),
    ("samples", "7. Sample responses"),
)


@functools.cache
def template_environment():
    """The Jinja2 environment of the report and the model card: HTML templates (*.html.j2) autoescape every
    value; the markdown model card (*.md.j2) does not. Undefined names are errors, not blanks."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("safesteer.report", "templates"),
                             autoescape=jinja2.select_autoescape(["html.j2"], default_for_string=False),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    # A value in a markdown table cell: one line, and a "|" does not end the cell.
    env.filters["md_cell"] = lambda value: " ".join(str(value).split()).replace("|", "\\|")
    return env


# ----------------------------------------------------------------------------- blocks

# A section is a list of blocks; a block is a dict with a "kind" that blocks.html.j2 knows how to draw:
#   table    headers (or None), rows (cells: a plain value, or a block), cls
#   figure   src (a data URI), alt, caption
#   titled   title, blocks                 row       blocks, side by side (`side_by_side`)
#   details  summary, blocks (folded)      note      text, marked (a word shown highlighted before it)
#   missing  artifact, hint                failed    error (a section that could not be built)
#   prompt   text, set                     response  refused (True / False / None), segments, note
# A response's segments are (text, token id or None): the template marks the tokens of S.
Block = dict


def missing(artifact: str, hint: str = "") -> Block:
    return {"kind": "missing", "artifact": artifact, "hint": hint}


def note(text: str, marked: str = "") -> Block:
    return {"kind": "note", "text": text, "marked": marked}


def table(headers: Sequence[str] | None, rows: Iterable[Sequence[Any]], cls: str = "") -> Block:
    return {"kind": "table", "headers": list(headers) if headers else None, "rows": [list(r) for r in rows], "cls": cls}


def kv_table(pairs: Iterable[tuple[str, Any]]) -> Block:
    return table(None, ((k, v if isinstance(v, dict) else _fmt(v)) for k, v in pairs if v is not None), "kv")


def side_by_side(*blocks: Block | None) -> Block:
    """Blocks side by side (wrapping on narrow windows), so short tables do not each take a full line."""
    return {"kind": "row", "blocks": [b for b in blocks if b]}


def titled(title: str, *blocks: Block | None) -> Block:
    return {"kind": "titled", "title": title, "blocks": [b for b in blocks if b]}


def details(summary: str, *blocks: Block) -> Block:
    return {"kind": "details", "summary": summary, "blocks": list(blocks)}


def figure(fig: Any, alt: str, caption: str = "") -> Block:
    return {"kind": "figure", "src": png_data_uri(fig), "alt": alt, "caption": caption}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:.{max(digits, 4)}g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v, digits) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v, digits)}" for k, v in value.items())
    return str(value)


def percent(rate: float | None) -> str:
    """A rate in [0, 1] as "57.8%"; "–" when there is none."""
    return "–" if rate is None or (isinstance(rate, float) and math.isnan(rate)) else f"{100 * rate:.1f}%"


# ----------------------------------------------------------------------------- the run directory


@dataclass
class RunArtifacts:
    """What a run directory holds; a missing or unreadable artifact is None (and noted in `problems`)."""

    root: Path
    direction: dict | None = None
    safety_tokens: dict | None = None
    metrics: list[dict] = field(default_factory=list)
    timings: dict | None = None
    run_record: dict | None = None
    evaluation: dict | None = None
    evaluation_path: Path | None = None
    summary: dict | None = None
    representation: dict | None = None
    problems: list[str] = field(default_factory=list)


# Where evaluation results may sit: `safesteer eval --out RUN_DIR/eval` or directly in the run directory.
EVALUATION_PATHS = ("eval/results.json", "results.json", "evaluation/results.json")


def load_run(run_dir: str | Path) -> RunArtifacts:
    root = Path(run_dir)
    if not root.is_dir():
        raise SafesteerError(f"run directory {root} does not exist; pass the --out directory of `safesteer align`")
    run = RunArtifacts(root)

    def load(rel: str) -> Any:
        path = root / rel
        if not path.is_file():
            return None
        try:
            return read_json(path) if rel.endswith(".json") else read_jsonl(path)
        except (ValueError, OSError) as exc:
            run.problems.append(f"{rel} is unreadable ({exc})")
            return None

    run.direction = load("direction.json")
    run.safety_tokens = load("safety_tokens.json")
    run.metrics = load("metrics.jsonl") or []
    run.timings = load("timings.json")
    run.run_record = load("model/safesteer.json")
    run.summary = load("summary.json")
    run.representation = load(REPRESENTATION_NAME)
    for rel in EVALUATION_PATHS:
        data = load(rel)
        if isinstance(data, dict):
            run.evaluation, run.evaluation_path = data, root / rel
            break
    return run


def _model_identity(run: RunArtifacts) -> dict | None:
    first_eval = next(iter((run.evaluation or {}).get("models", {}).values()), None)
    for source in (run.run_record and run.run_record.get("base_model"),
                   run.direction and run.direction.get("identity"),
                   run.safety_tokens and run.safety_tokens.get("model"),
                   isinstance(first_eval, dict) and first_eval.get("info")):
        if isinstance(source, dict) and source:
            return source
    return None


# ----------------------------------------------------------------------------- 1. configuration


_IDENTITY_KEYS = ("name", "kind", "architecture", "model_type", "family", "n_layers", "hidden_size", "vocab_size",
                  "dtype", "gguf_sha256")
_CONFIG_KEYS_FIRST = ("preset", "steps", "prompts_per_step", "rollouts_per_prompt", "max_new_tokens", "loss",
                      "finetune", "learning_rate", "lora_r", "seed")


def _prompt_count(record: Any) -> Any:
    if isinstance(record, dict):
        return record.get("n", record.get("count"))
    if isinstance(record, (int, float)):
        return record
    if isinstance(record, list):
        return len(record)
    return None


def section_configuration(run: RunArtifacts) -> list[Any]:
    identity = _model_identity(run)
    if identity:
        rows = [(k, identity[k]) for k in _IDENTITY_KEYS if k in identity]
        rows += [(k, v) for k, v in identity.items() if k not in _IDENTITY_KEYS and k != "path" and not isinstance(v, dict)]
        model_block = titled("Model", kv_table(rows))
    else:
        model_block = titled("Model", missing("model identity",
                                                "in direction.json, safety_tokens.json, model/safesteer.json or "
                                                "eval/results.json"))

    data_rows = []
    if run.direction:
        hashes = run.direction.get("prompt_sha256") or {}
        for key, value in (run.direction.get("prompt_counts") or {}).items():
            n = value.get("before") if isinstance(value, dict) else value
            sha = hashes.get(key) if isinstance(hashes.get(key), str) else ""
            data_rows.append((f"direction: {key}", n, sha[:12]))
    if run.safety_tokens:
        prompts = run.safety_tokens.get("prompts") or {}
        data_rows.append(("safety tokens: harmless prompts", _prompt_count(prompts), _sha_of(prompts)))
    if run.run_record:
        train = run.run_record.get("train_prompts") or {}
        data_rows.append(("training prompts", _prompt_count(train), _sha_of(train)))
        source = (run.run_record.get("data") or {}).get("train_prompts_source")
        if source:
            data_rows.append(("training prompts source", source, ""))
    first_model = _first_model(run)
    for name, model, rate in _eval_rate_rows(run):
        if model == first_model:
            data_rows.append((f"evaluation: {name}", rate.get("n"), ""))
    data_block = titled("Data", table(("set", "prompts", "sha256 (first 12)"), data_rows) if data_rows
                         else missing("prompt counts", "no stage artifact present"))

    timing_rows = []
    if run.timings:
        for stage, info in (run.timings.get("stages") or {}).items():
            info = info if isinstance(info, dict) else {"seconds": info}
            notes = []
            if info.get("reused"):
                notes.append("reused from an earlier run")
            if info.get("resumed_at_step"):
                notes.append(f"resumed at step {info['resumed_at_step']}")
            if info.get("error") or info.get("failed"):
                notes.append(f"failed: {info.get('error') or info.get('failed')}")
            timing_rows.append((stage, _seconds(info.get("seconds")), "; ".join(notes)))
        if run.timings.get("total_s") is not None:
            timing_rows.append(("total", _seconds(run.timings["total_s"]),
                                f"preset {run.timings.get('preset', '?')}, finished {run.timings.get('finished', '?')}"))
    else:
        for name, data in (("direction", run.direction), ("safety tokens", run.safety_tokens)):
            timing = (data or {}).get("timing") or (data or {}).get("timings")
            if isinstance(timing, dict):
                total = timing.get("total_s", timing.get("total"))
                timing_rows.append((name, _seconds(total), _fmt({k: v for k, v in timing.items() if k != "total_s"})))
        if run.metrics:
            total = sum(float(r.get("time_step_s") or 0.0) for r in run.metrics)
            timing_rows.append(("training (sum of steps)", _seconds(total), f"{len(run.metrics)} steps"))
    if run.timings:
        timing_block = titled("Wall-clock per stage", table(("stage", "wall-clock", "notes"), timing_rows))
    elif timing_rows:
        timing_block = titled("Wall-clock per stage", missing("timings.json", "times below come from the stages"),
                               table(("stage", "wall-clock", "notes"), timing_rows))
    else:
        timing_block = titled("Wall-clock per stage", missing("timings.json"))

    parts: list[Any] = [side_by_side(model_block, data_block, timing_block)]
    if run.run_record and isinstance(run.run_record.get("config"), dict):
        cfg = run.run_record["config"]
        keys = [k for k in _CONFIG_KEYS_FIRST if k in cfg] + [k for k in cfg if k not in _CONFIG_KEYS_FIRST]
        per_column = math.ceil(len(keys) / 3) or 1
        columns = [kv_table((k, cfg[k]) for k in keys[i: i + per_column]) for i in range(0, len(keys), per_column)]
        parts.append(titled("Training configuration", side_by_side(*columns)))
        versions = run.run_record.get("versions")
        if isinstance(versions, dict):
            parts.append(note("versions: " + _fmt(versions)))
    else:
        parts.append(titled("Training configuration", missing("model/safesteer.json", "written when training finishes")))
    return parts


def _sha_of(record: Any) -> str:
    sha = record.get("sha256") if isinstance(record, dict) else None
    return sha[:12] if isinstance(sha, str) else ""


def _seconds(value: Any) -> str:
    if value is None:
        return "–"
    value = float(value)
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min ({value:.0f} s)"


# ----------------------------------------------------------------------------- 2. refusal direction


def _reason_kind(reason: str) -> str:
    """An exclusion reason without its measured value ("KL 0.34 > 0.1" -> "KL > 0.1"), for counting."""
    import re

    return re.sub(r"^(KL|induce) -?[0-9.e+-]+ ", r"\1 ", reason)


def section_direction(run: RunArtifacts) -> list[Any]:
    d = run.direction
    if d is None:
        return [missing("direction.json", "run `safesteer direction --out RUN_DIR` or `safesteer align`")]
    candidates = candidate_rows(d.get("candidates") or [])
    chosen = next((c for c in candidates if c["chosen"]), None)
    scores = d.get("scores") or ({k: chosen[k] for k in ("bypass", "induce", "kl")} if chosen else {})
    baseline = d.get("baseline") or {}
    rows = [("layer", f"{d.get('layer')} of {d.get('n_layers', '?')} (input of the block)"),
            ("position", f"{d.get('position')} (of {d.get('n_positions', '?')} post-instruction tokens)"),
            ("coefficient", d.get("coeff")), ("|r| (raw, un-normalised)", d.get("norm")),
            ("bypass score", _with_baseline(scores.get("bypass"), baseline.get("harmful_val_refusal_score"))),
            ("induce score", _with_baseline(scores.get("induce"), baseline.get("harmless_val_refusal_score"))),
            ("KL score", scores.get("kl"))]
    if d.get("refusal_tokens"):
        rows.append(("refusal tokens R", ", ".join(repr(t) for t in d["refusal_tokens"])))
    blocks: list[Any] = [titled("Choice", kv_table(rows))]

    if candidates:
        excluded = [c for c in candidates if c["reason"]]
        unscored = [c for c in candidates if not c["reason"] and math.isnan(c["bypass"])]
        partial = [c for c in candidates if not c["reason"] and not math.isnan(c["bypass"])
                   and (math.isnan(c["kl"]) or math.isnan(c["induce"]))]
        counts: dict[str, int] = {}
        for c in excluded:
            counts[_reason_kind(c["reason"])] = counts.get(_reason_kind(c["reason"]), 0) + 1
        rows = [("all candidates", len(candidates))] + [(f"excluded: {k}", v) for k, v in
                                                        sorted(counts.items(), key=lambda kv: -kv[1])]
        if partial:
            rows.append(("bypass only (ranked after the choice, KL/induce not needed)", len(partial)))
        if unscored:
            rows.append(("not scored", len(unscored)))
        blocks.append(titled("Candidates", table(("", "count"), rows)))
        best = sorted((c for c in candidates if not math.isnan(c["bypass"])), key=lambda c: c["bypass"])[:8]
        blocks.append(titled("Lowest bypass scores", table(
            ("layer", "position", "bypass", "induce", "KL", "status"),
            ((c["layer"], c["position"], _fmt(c["bypass"]), _fmt(c["induce"]), _fmt(c["kl"]),
              "chosen" if c["chosen"] else (c["reason"] or "")) for c in best))))
    data_block = _direction_inputs(d)
    if data_block:
        blocks.append(data_block)
    parts: list[Any] = [side_by_side(*blocks)]
    if candidates:
        config = d.get("config") or {}
        fig = plot_direction_scores(candidates, d.get("n_layers"), config.get("max_layer_frac", 0.8),
                                    d.get("induce_threshold_used", config.get("induce_threshold", 0.0)),
                                    config.get("kl_threshold", 0.1), d.get("post_instruction_tokens"))
        cut = (d.get("config") or {}).get("max_layer_frac", 0.8)
        parts.append(figure(fig, f"Heatmaps of bypass, induce and KL scores over layer and position for "
                               f"{len(candidates)} candidate directions; chosen layer {d.get('layer')}, "
                               f"position {d.get('position')}",
                          f"Candidate directions r[position, layer]: grey = not scored, hatched = excluded, red star "
                          f"= chosen, dashed line = the {cut:g} x layers cut-off. Only candidates down to the "
                          f"choice in bypass order need KL and induce scores, so most cells of those panels stay grey."))
    else:
        parts.append(missing("candidate scores", "direction.json lists no candidates"))
    return parts


def _with_baseline(value: Any, baseline: Any) -> str:
    if value is None:
        return "–"
    return _fmt(value) + (f" (without steering: {_fmt(baseline)})" if baseline is not None else "")


def _direction_inputs(d: dict) -> Block | None:
    counts = d.get("prompt_counts") or {}
    if not counts:
        return None
    fallback = d.get("filter_fallback") or {}
    rows = []
    for name, c in counts.items():
        c = c if isinstance(c, dict) else {"after": c}
        remark = "filter kept too few: all used" if fallback.get(name) else ""
        rows.append((name, f"{c.get('after', '?')} of {c.get('before', '?')}", remark))
    if not any(r[2] for r in rows):
        return titled("Prompts kept by the refusal filter", table(("set", "kept"), (r[:2] for r in rows)))
    return titled("Prompts kept by the refusal filter", table(("set", "kept", "note"), rows))


# ----------------------------------------------------------------------------- 3. safety tokens


def section_safety_tokens(run: RunArtifacts) -> list[Any]:
    data = run.safety_tokens
    if data is None:
        if run.run_record and (run.run_record.get("safety_tokens") or {}).get("ids"):
            st = run.run_record["safety_tokens"]
            return [missing("safety_tokens.json", "only the ids from model/safesteer.json are known"),
                    table(("id", "text"), ((i, repr(t)) for i, t in zip(st["ids"], st.get("texts") or [""] * len(st["ids"]))))]
        return [missing("safety_tokens.json", "run `safesteer tokens --out RUN_DIR` or `safesteer align`")]
    tokens = [t for t in data.get("tokens") or [] if isinstance(t, dict)]
    if not tokens:
        return [missing("safety tokens", "safety_tokens.json holds no tokens")]
    resolved = data.get("resolved") or {}
    cfg = data.get("config") or {}
    settings = kv_table([
        ("tokens in S", len(tokens)),
        ("selection", f"{cfg.get('method', '?')} by {cfg.get('rank_by', 'delta')}, K'={cfg.get('top_k_per_position', '?')}, "
                      f"M={cfg.get('samples_per_prompt', '?')} samples per prompt"),
        ("horizon H", resolved.get("horizon")),
        ("min steered probability", resolved.get("min_steered_prob")),
        ("valid positions", f"{data.get('n_valid_positions', '?')} of {data.get('n_positions', '?')}"),
        ("eligible tokens", data.get("n_eligible")),
    ])
    examples = [e for e in data.get("examples") or [] if isinstance(e, dict)][:6]
    example_block = titled("Steered teacher's first tokens on harmless prompts", table(
        ("prompt", "continuation"), ((e.get("prompt", ""), e.get("teacher", "")) for e in examples), "text")
    ) if examples else None
    parts: list[Any] = [side_by_side(titled("Selection", settings), example_block)]
    fig = plot_safety_tokens(data)
    parts.append(figure(fig, f"Bar chart of votes for the {len(tokens)} safety tokens, with their mean base and "
                           f"steered probabilities on a log scale"))
    parts.append(details("token table", table(
        ("#", "id", "token", "votes", "mean p_0", "mean p_t", "mean delta"),
        ((n, t.get("id"), repr(t.get("text", "")), t.get("votes"), _fmt(t.get("mean_p0")), _fmt(t.get("mean_pt")),
          _fmt(t.get("mean_delta"))) for n, t in enumerate(tokens, 1)))))
    return parts


# ----------------------------------------------------------------------------- 4. training


def section_training(run: RunArtifacts) -> list[Any]:
    metrics = [r for r in run.metrics if isinstance(r, dict)]
    if not metrics:
        return [missing("metrics.jsonl", "written by `safesteer align` during training")]
    parts: list[Any] = []
    first, last = metrics[0], metrics[-1]
    keys = [("loss", ("loss",)), ("student S-mass", ("student_s_mass",)), ("teacher S-mass", ("teacher_s_mass",)),
            ("rollouts opening with a refusal", REFUSAL_RATE_KEYS), ("sampled KL", ("sampled_kl",)),
            ("student entropy", ("student_entropy",)), ("grad norm", ("grad_norm",)),
            ("completion tokens", ("completion_tokens",)), ("time per step (s)", ("time_step_s",))]
    rows = []
    for name, k in keys:
        values = [v for v in (as_float(first_key(r, k)) for r in metrics) if not math.isnan(v)]
        if values:
            rows.append((name, _fmt(first_key(first, k)), _fmt(first_key(last, k)), _fmt(sum(values) / len(values))))
    summary = table(("metric", f"step {first.get('step', 1)}", f"step {last.get('step', len(metrics))}",
                      f"mean of {len(metrics)} steps"), rows)
    examples = [(r.get("step"), r["example"]) for r in (first, last) if r.get("example")]
    example_block = titled("First rollout of the first and last step", table(
        ("step", "rollout (truncated)"), examples, "text")) if examples else None
    parts.append(side_by_side(titled("Summary", summary), example_block))
    fig = plot_training(metrics)
    parts.append(figure(fig, f"Training curves over {len(metrics)} steps: loss, probability mass on S, rollouts opening "
                           f"with a refusal, time per step split into rollout, teacher and student, sampled KL and "
                           f"entropy, gradient norm and learning rate"))
    return parts


# ----------------------------------------------------------------------------- 5. evaluation


@dataclass
class EvalView:
    """Evaluation results in one shape: rates[metric][model] = {k, n, rate, ci_low, ci_high}."""

    models: list[str] = field(default_factory=list)
    rates: dict[str, dict[str, dict]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)  # metric -> safety | over-refusal | capability
    scalars: dict[str, dict[str, float]] = field(default_factory=dict)  # e.g. KL drift per model
    templates: dict[str, list] = field(default_factory=dict)  # model -> [(opening, count), ...]
    headline: dict[str, str] = field(default_factory=dict)  # kind -> the metric that sums it up (all sets pooled)
    seconds: dict[str, float] = field(default_factory=dict)  # model -> evaluation wall-clock
    judge: str | None = None
    source: str = ""


_MODEL_ORDER = ("base", "teacher", "aligned")


def _is_rate(value: Any) -> bool:
    return isinstance(value, dict) and "k" in value and "n" in value


def _rate_dict(value: dict) -> dict:
    from ..eval.stats import wilson_interval

    k, n = int(value["k"]), int(value["n"])
    low, high = value.get("ci_low"), value.get("ci_high")
    if low is None or high is None:
        low, high = wilson_interval(k, n) if n else (0.0, 1.0)
    rate = value.get("rate", k / n if n else None)
    return {"k": k, "n": n, "rate": rate, "ci_low": float(low), "ci_high": float(high)}


def _kind_of(metric: str) -> str:
    name = metric.lower()
    if any(w in name for w in ("edgy", "over", "benign", "xstest", "or-bench", "orbench")):
        return "over-refusal"
    if any(w in name for w in ("mmlu", "gsm8k", "capab", "accuracy", "agreement", "humaneval", "math")):
        return "capability"
    return "safety"


def _order_models(models: Iterable[str]) -> list[str]:
    models = list(dict.fromkeys(models))
    known = [m for m in _MODEL_ORDER if m in models]
    return known + [m for m in models if m not in known]


def evaluation_view(run: RunArtifacts) -> EvalView | None:
    """Normalise results.json (safesteer eval) or summary.json (align's built-in summary)."""
    if run.evaluation is not None:
        view = _view_from_results(run.evaluation)
        if view.rates or view.scalars:
            view.source = str(run.evaluation_path.relative_to(run.root)) if run.evaluation_path else "results.json"
            return view
    if run.summary is not None and isinstance(run.summary.get("rates"), dict):
        view = EvalView(judge=run.summary.get("judge"), source="summary.json")
        for metric, by_model in run.summary["rates"].items():
            if not isinstance(by_model, dict):
                continue
            for model, rate in by_model.items():
                if _is_rate(rate):
                    view.rates.setdefault(metric, {})[model] = _rate_dict(rate)
            view.kinds[metric] = _kind_of(metric)
        view.models = _order_models(m for by in view.rates.values() for m in by)
        return view if view.rates else None
    return None


def _view_from_results(data: dict) -> EvalView:
    """results.json of `safesteer eval` (evaluate.evaluate_models): per model, refusal rates per set and
    overall for the safety and over-refusal suites, MMLU / GSM8K accuracy, KL drift and token agreement."""
    view = EvalView(judge=data.get("refusal_judge") or data.get("judge"))
    models = data.get("models")
    if not isinstance(models, dict):
        return view
    if data.get("judge") and data.get("judge") != view.judge:
        view.judge = f"refusals: {view.judge}; attack success: {data['judge']}"

    def add(metric: str, kind: str, model: str, rate: Any) -> None:
        if _is_rate(rate):
            view.rates.setdefault(metric, {})[model] = _rate_dict(rate)
            view.kinds[metric] = kind

    suites = (("safety", "safety", "harmful refusal"), ("overrefusal", "over-refusal", "over-refusal (all sets)"))
    for name, m in models.items():
        if not isinstance(m, dict):
            continue
        for key, kind, label in suites:
            block = m.get(key) or {}
            sets = block.get("sets") or {}
            if len(sets) > 1 or not sets:
                add(f"{label}: all sets", kind, name, (block.get("overall") or {}).get("refusal"))
                view.headline.setdefault(kind, f"{label}: all sets")
            for set_name, entry in sets.items():
                add(f"{label}: {set_name}", kind, name, (entry or {}).get("refusal"))
                if len(sets) == 1:
                    view.headline.setdefault(kind, f"{label}: {set_name}")
        add("MMLU accuracy", "capability", name, (m.get("mmlu") or {}).get("accuracy"))
        add("GSM8K accuracy", "capability", name, (m.get("gsm8k") or {}).get("accuracy"))
        drift = m.get("drift") or {}
        add(f"greedy-token agreement with {drift.get('reference', 'the reference')}", "drift", name, drift.get("agreement"))
        if isinstance(drift.get("kl_mean"), (int, float)):
            view.scalars.setdefault(f"KL drift from {drift.get('reference', 'the reference')} (nats/token)", {})[name] = \
                float(drift["kl_mean"])
        if isinstance(m.get("refusal_templates"), list):
            view.templates[name] = m["refusal_templates"]
        if isinstance((m.get("timings") or {}).get("total"), (int, float)):
            view.seconds[name] = float(m["timings"]["total"])
    view.models = _order_models(list(models))
    return view


def _eval_rate_rows(run: RunArtifacts) -> list[tuple[str, str, dict]]:
    view = evaluation_view(run)
    if view is None:
        return []
    return [(metric, model, rate) for metric, by in view.rates.items() for model, rate in by.items()]


def _first_model(run: RunArtifacts) -> str | None:
    view = evaluation_view(run)
    return view.models[0] if view and view.models else None


@dataclass
class TradeoffAxis:
    label: str
    invert: bool = False  # draw larger values to the left (a drift: lower is better)
    percent: bool = True  # a rate in [0, 1]


def tradeoff_points(view: EvalView) -> tuple[list[dict], TradeoffAxis | None, str]:
    """One point per model: x = capability, y = safety (mean refusal rate on the harmful sets).

    x is the mean of the capability rates; without any, the KL drift from the base (lower = better,
    axis reversed; the base, the drift's reference, at 0); without that either, the answer rate on harmless-but-edgy prompts (1 - over-refusal),
    the other side of the trade-off the evaluation measured. None when the view has none of these.
    """
    def of_kind(kind: str) -> list[str]:
        if kind in view.headline and view.headline[kind] in view.rates:
            return [view.headline[kind]]
        return [m for m in view.rates if view.kinds.get(m) == kind]

    safety, capability, over = of_kind("safety"), of_kind("capability"), of_kind("over-refusal")
    drift = next(iter(view.scalars), None)
    if capability:
        axis = TradeoffAxis("capability: mean of " + ", ".join(capability))
    elif drift:
        axis = TradeoffAxis(f"{drift}; lower = closer to the base model", invert=True, percent=False)
    elif over:
        axis = TradeoffAxis("answer rate on harmless prompts (1 - over-refusal): " + ", ".join(over))
    else:
        return [], None, ""
    y_label = "safety: " + ", ".join(safety)
    points = []
    for model in view.models:
        ys = [view.rates[m][model] for m in safety if model in view.rates[m]]
        x, x_err = None, None
        if capability or (over and not drift):
            xs = [view.rates[m][model] for m in (capability or over) if model in view.rates[m]]
            if xs and all(r["rate"] is not None for r in xs):
                if capability:
                    x = sum(r["rate"] for r in xs) / len(xs)
                    x_err = (xs[0]["ci_low"], xs[0]["ci_high"]) if len(xs) == 1 else None
                else:
                    x = 1 - sum(r["rate"] for r in xs) / len(xs)
                    x_err = (1 - xs[0]["ci_high"], 1 - xs[0]["ci_low"]) if len(xs) == 1 else None
        else:
            # The drift's reference model is not in its row ("reference"): it sits at 0 by definition.
            x = view.scalars[drift].get(model, 0.0 if model == view.models[0] else None)
        if not ys or x is None or any(r["rate"] is None for r in ys):
            continue
        y = sum(r["rate"] for r in ys) / len(ys)
        y_err = (ys[0]["ci_low"], ys[0]["ci_high"]) if len(ys) == 1 else None
        points.append({"model": model, "x": x, "y": y, "x_err": x_err, "y_err": y_err})
    return points, axis, y_label


def _evaluation_source(run: RunArtifacts) -> str | None:
    return str(run.evaluation_path.relative_to(run.root)) if run.evaluation_path else None


def _refusal_tradeoff_figure(run: RunArtifacts) -> Block | None:
    """The figure of `safesteer compare` (harmful refusal against edgy over-refusal) for the run's own
    results.json: base, aligned and the teacher when it was evaluated."""
    from ..eval.compare import compare_points, tradeoff_set

    points = compare_points(run.evaluation or {})
    x_set = tradeoff_set(points)
    fig = plot_refusal_tradeoff(points, x_set, ((run.evaluation or {}).get("config") or {}).get("part")) if x_set else None
    if fig is None:
        return None
    return figure(fig, f"Trade-off of harmful refusal against {x_set} over-refusal, one point per model: "
                       + ", ".join(p["name"] for p in points),
                  "95% Wilson intervals on both axes; the square is the base model, and up and to the left of its "
                  "dotted lines is safer without refusing more harmless prompts. `safesteer compare` draws the same "
                  "figure for any number of runs.")


def section_evaluation(run: RunArtifacts) -> list[Any]:
    view = evaluation_view(run)
    if view is None:
        return [missing("eval/results.json or summary.json",
                         "run `safesteer eval` (or `safesteer align` without --skip-eval)")]
    parts: list[Any] = [note(f"from {view.source}" + (f"; judge: {view.judge}" if view.judge else ""))]
    headers = ["metric", "kind"] + view.models
    rows = []
    for metric, by in view.rates.items():
        cells = []
        for model in view.models:
            r = by.get(model)
            cells.append(f"{percent(r['rate'])} ({r['k']}/{r['n']}; {percent(r['ci_low'])}–{percent(r['ci_high'])})" if r else "–")
        rows.append([metric, view.kinds.get(metric, "")] + cells)
    for metric, by in view.scalars.items():
        rows.append([metric, "drift"] + [_fmt(by.get(m)) if m in by else "reference" if m == view.models[0] else "–"
                                         for m in view.models])
    if view.seconds:
        rows.append(["evaluation wall-clock", ""] + [_seconds(view.seconds.get(m)) for m in view.models])
    parts.append(table(headers, rows))
    figures = []
    fig = plot_rates(view) if view.rates else None
    if fig is not None:
        figures.append(figure(fig, "Grouped bar charts of safety, over-refusal and capability rates for "
                                 + ", ".join(view.models) + " with 95% confidence intervals"))
    points, axis, y_label = tradeoff_points(view)
    if points and axis is not None:
        fig = plot_tradeoff(points, axis, y_label)
        figures.append(figure(fig, f"Scatter of safety against {axis.label}, one point per model: "
                                 + ", ".join(p["model"] for p in points)))
    else:
        figures.append(missing("capability, drift or over-refusal measure", "the trade-off plot needs one per model"))
    refusal_tradeoff = _refusal_tradeoff_figure(run) if view.source == _evaluation_source(run) else None
    if refusal_tradeoff is not None:
        figures.append(refusal_tradeoff)
    parts.append(side_by_side(*figures))
    if view.templates:
        blocks = []
        for model in [m for m in view.models if m in view.templates]:
            templates = [t for t in view.templates[model] if isinstance(t, (list, tuple)) and len(t) >= 2]
            openings = table(("opening (first sentence)", "count"), ((t[0], t[1]) for t in templates[:6]), "text")
            blocks.append(titled(f"{model}: {len(templates)} distinct refusal openings", openings if templates else None))
        parts.append(note("A new stock refusal learned in training shows up here as an opening the base model "
                          "never used."))
        parts.append(side_by_side(*blocks))
    return parts


# ----------------------------------------------------------------------------- 6. representation shift


def section_representation(run: RunArtifacts) -> list[Any]:
    data = run.representation
    if not data or not data.get("coords"):
        return [missing(REPRESENTATION_NAME, "`safesteer align` computes it in its summary, while the models are "
                                             "loaded; not with --skip-eval")]
    fig = plot_representation(data)
    parts: list[Any] = [figure(fig, "PCA scatter of final-layer hidden states on benign prompts for "
                                  + ", ".join(data["coords"]) + "; large rings mark each model's mean")]
    shift = data.get("shift") or {}
    if shift:
        parts.append(table(("model", "mean distance from base (L2)", "relative to base spread",
                             "mean cosine to base"),
                            ((name, _fmt(s.get("mean_l2")), _fmt(s.get("relative_to_base_spread")),
                              _fmt(s.get("mean_cosine_to_base"))) for name, s in shift.items())))
        parts.append(note("Distances are per prompt, in the full hidden space: a relative value of 1 means a model "
                          "moved as far from the base as two typical base states are apart from their mean."))
    return parts


# ----------------------------------------------------------------------------- 7. sample responses


def find_generations(run: RunArtifacts) -> dict[str, dict[str, list[dict]]]:
    """{model: {"harmful": rows, "edgy": rows}} from the evaluation's answer files.

    `safesteer eval` keeps DIR/<model slug>/{safety,overrefusal}.judged.jsonl (each answer with its
    verdict); align's built-in summary keeps summary/<model>-<i>.jsonl.
    """
    found: dict[str, dict[str, list[dict]]] = {}

    def read(path: Path) -> list[dict]:
        try:
            return [r for r in read_jsonl(path) if isinstance(r, dict) and "response" in r and "prompt" in r]
        except ValueError:
            run.problems.append(f"{path.relative_to(run.root)} is unreadable")
            return []

    if run.evaluation is not None and run.evaluation_path is not None:
        from ..eval.suites import model_slug

        for name, entry in (run.evaluation.get("models") or {}).items():
            folder = run.evaluation_path.parent / str((entry or {}).get("slug") or model_slug(name))
            for kind, suite in (("harmful", "safety"), ("edgy", "overrefusal")):
                for path in (folder / f"{suite}.judged.jsonl", folder / f"{suite}.jsonl"):
                    if path.is_file():
                        found.setdefault(name, {})[kind] = read(path)
                        break
    if not found and (run.root / "summary").is_dir():
        for path in sorted((run.root / "summary").glob("*.jsonl")):
            label = path.stem.rsplit("-", 1)[0]
            for row in read(path):
                kind = _set_of(row)
                if kind:
                    found.setdefault(label, {}).setdefault(kind, []).append(row)
    return found


def _set_of(row: dict) -> str | None:
    text = " ".join(str(row.get(k) or "") for k in ("set", "source")).lower()
    if any(w in text for w in ("edgy", "over", "xstest", "benign")):
        return "edgy"
    if any(w in text for w in ("harm", "advbench", "jailbreak")):
        return "harmful"
    return None


def _load_tokenizer(run: RunArtifacts, tokenizer: Any = None) -> Any:
    if tokenizer is not None:
        return tokenizer
    folders = [run.root / "model"]
    identity = _model_identity(run) or {}
    if identity.get("path"):
        folders.append(Path(identity["path"]))
    for folder in folders:
        if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
            try:
                from transformers import AutoTokenizer

                return AutoTokenizer.from_pretrained(str(folder))
            except Exception:  # noqa: BLE001 - a broken tokenizer only costs the highlighting
                continue
    return None


def _token_spans(text: str, tokenizer: Any) -> list[tuple[int, int, int]]:
    """(start, end, id) character spans of the response's tokens."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [(s, e, i) for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])]
    # Slow tokenizers have no offsets: decode growing prefixes and take what each token adds.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    spans, prev, pos = [], "", 0
    for n in range(1, len(ids) + 1):
        cur = tokenizer.decode(ids[:n])
        if cur.startswith(prev):
            piece = cur[len(prev):]
            start = text.find(piece, pos) if piece else pos
            if start >= 0:
                spans.append((start, start + len(piece), ids[n - 1]))
                pos = start + len(piece)
        prev = cur
    return spans


def safety_token_segments(text: str, tokenizer: Any, safety_ids: Iterable[int]) -> tuple[list[tuple[str, int | None]], int]:
    """`text` cut into (piece, token id) segments where the id is set for the tokens of S and None between
    them, and how many tokens of S there were."""
    ids = set(int(i) for i in safety_ids)
    segments: list[tuple[str, int | None]] = []
    cursor, count = 0, 0
    for start, end, token_id in sorted(_token_spans(text, tokenizer)):
        if token_id not in ids or start < cursor or end <= start:
            continue  # byte-level tokens of one character share a span: mark it once
        segments += [(text[cursor:start], None), (text[start:end], token_id)]
        cursor, count = end, count + 1
    segments.append((text[cursor:], None))
    return [seg for seg in segments if seg[0]], count


def highlight_safety_tokens(text: str, tokenizer: Any, safety_ids: Iterable[int]) -> tuple[str, int]:
    """HTML of `text` with every token whose id is in S in a <mark>, as the report draws it (the template's
    `highlight` macro); and how many there were."""
    segments, count = safety_token_segments(text, tokenizer, safety_ids)
    return str(template_environment().get_template(BLOCKS_TEMPLATE).module.highlight(segments)), count


def _refused(row: dict) -> bool | None:
    for key in ("refused", "refusal"):
        if isinstance(row.get(key), bool):
            return row[key]
    verdict = row.get("verdict")
    if isinstance(verdict, dict) and isinstance(verdict.get("refused"), bool):
        return verdict["refused"]
    from ..eval.judges import is_refusal

    return is_refusal(row.get("response", ""))


def section_samples(run: RunArtifacts, tokenizer: Any = None, per_set: int = 6) -> list[Any]:
    generations = find_generations(run)
    if not generations:
        return [missing("evaluation answers (eval/<model>/safety.judged.jsonl or summary/*.jsonl)",
                         "run `safesteer eval` or `safesteer align` without --skip-eval")]
    labels = _order_models(generations)
    base_label = "base" if "base" in generations else labels[0]
    aligned_label = "aligned" if "aligned" in generations else (labels[-1] if len(labels) > 1 else None)
    if aligned_label is None or aligned_label == base_label:
        return [missing("aligned model's generations", f"only {', '.join(labels)} found")]
    safety_ids: list[int] = []
    if run.safety_tokens:
        safety_ids = [int(t["id"]) for t in run.safety_tokens.get("tokens") or [] if "id" in t]
    elif run.run_record:
        safety_ids = list((run.run_record.get("safety_tokens") or {}).get("ids") or [])
    tok = _load_tokenizer(run, tokenizer) if safety_ids else None
    parts: list[Any] = []
    if not safety_ids:
        parts.append(note("safety_tokens.json missing: tokens of S are not highlighted."))
    elif tok is None:
        parts.append(note("no tokenizer in model/: tokens of S are not highlighted."))
    else:
        parts.append(note(": tokens of S in the aligned model's response (the response text re-tokenised with the "
                          "run's tokenizer).", marked="highlighted"))
    pairs: dict[str, list[tuple[dict, dict]]] = {"harmful": [], "edgy": []}
    for kind in pairs:
        base_rows = {(r.get("prompt_uid") or r["prompt"], r.get("sample", 0)): r
                     for r in generations[base_label].get(kind, [])}
        for answer in generations[aligned_label].get(kind, []):
            key = (answer.get("prompt_uid") or answer["prompt"], answer.get("sample", 0))
            if key in base_rows:
                pairs[kind].append((base_rows[key], answer))
    titles = {"harmful": "Harmful prompts", "edgy": "Harmless but edgy prompts (over-refusal)"}
    for kind, items in pairs.items():
        if not items:
            parts.append(titled(titles[kind], missing(f"{kind} prompts answered by both {base_label} and {aligned_label}")))
            continue
        judged = [(b, a, _refused(b), _refused(a)) for b, a in items]
        # Changed verdicts first (what training did), then the rest, in file order.
        judged.sort(key=lambda t: t[2] == t[3])
        rows = []
        for b, a, rb, ra in judged[:per_set]:
            if tok is not None:
                aligned_segments, n_s = safety_token_segments(a["response"], tok, safety_ids)
                counts = f"S tokens: {safety_token_segments(b['response'], tok, safety_ids)[1]} → {n_s}"
            else:
                aligned_segments, counts = [(a["response"], None)], ""
            rows.append(({"kind": "prompt", "text": b["prompt"], "set": b.get("set") or ""},
                         {"kind": "response", "refused": rb, "segments": [(b["response"], None)], "note": ""},
                         {"kind": "response", "refused": ra, "segments": aligned_segments, "note": counts}))
        changed = sum(1 for _, _, rb, ra in judged if rb != ra)
        parts.append(titled(titles[kind], table(("prompt", base_label, aligned_label), rows, "samples"),
                            note(f"{len(items)} prompts answered by both; the keyword verdict differs on {changed}; "
                                 f"showing {min(per_set, len(items))}.")))
    return parts


# ----------------------------------------------------------------------------- the page


def report_context(run_dir: str | Path, tokenizer: Any = None) -> dict:
    """What templates/report.html.j2 draws: the title lines, the artifacts' problems and each section's blocks."""
    from .. import __version__

    run = load_run(run_dir)
    builders = {
        "configuration": lambda: section_configuration(run),
        "direction": lambda: section_direction(run),
        "safety-tokens": lambda: section_safety_tokens(run),
        "training": lambda: section_training(run),
        "evaluation": lambda: section_evaluation(run),
        "representation": lambda: section_representation(run),
        "samples": lambda: section_samples(run, tokenizer),
    }
    sections = []
    for section_id, title in SECTIONS:
        try:
            blocks = builders[section_id]()
        except Exception as exc:  # noqa: BLE001 - one odd artifact must not cost the whole report
            blocks = [{"kind": "failed", "error": f"{type(exc).__name__}: {exc}"}]
        sections.append({"id": section_id, "title": title, "blocks": blocks})
    identity = _model_identity(run) or {}
    return {"title": f"safesteer run report: {Path(run_dir).resolve().name}",
            "subtitle": (f"model {identity.get('name', '?')} · run directory {Path(run_dir).resolve()} · generated "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')} by safesteer {__version__}"),
            "problems": list(run.problems), "sections": sections}


def build_report(run_dir: str | Path, tokenizer: Any = None) -> str:
    """The report's HTML for a run directory (see the module docstring for what it shows)."""
    return template_environment().get_template(TEMPLATE).render(report_context(run_dir, tokenizer))


def write_report(run_dir: str | Path, out: str | Path | None = None, tokenizer: Any = None) -> Path:
    """Write the report (atomically) to `out`, by default RUN_DIR/report.html; returns its path."""
    target = Path(out) if out is not None else Path(run_dir) / REPORT_NAME
    write_text_atomic(target, build_report(run_dir, tokenizer))
    return target


# ----------------------------------------------------------------------------- CLI


def _cmd_report(args: argparse.Namespace) -> int:
    """one self-contained HTML page from a run directory's artifacts

    Configuration, refusal direction, safety tokens, training curves, before/after evaluation,
    representation shift and sample responses of a run, as one HTML file with embedded images (opens
    offline). Sections whose artifacts are missing say so.
    """
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        except (OSError, ValueError) as exc:
            raise SafesteerError(f"cannot load tokenizer from {args.tokenizer}: {exc}; pass a model directory") from exc
    path = write_report(args.run_dir, args.out, tokenizer)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB); open it in a browser, no network needed")
    return 0


def add_cli(subparsers) -> None:
    from ..cli import add_command

    p = add_command(subparsers, "report", _cmd_report)
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out directory of `safesteer align` (or of single stages)")
    p.add_argument("--out", default=None, help="output HTML file (default: RUN_DIR/report.html)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory for highlighting tokens of S (default: RUN_DIR/model, else the base model)")
