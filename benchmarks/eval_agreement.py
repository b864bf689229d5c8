"""Per-prompt agreement of refusal verdicts between two evaluations of the same model (e.g. fp32 vs bf16).

    safesteer eval --model qwen2.5-coder-0.5b-instruct --suites safety,overrefusal --n-harmful 64 --n-edgy 64 \
        --generation-dtype float32 --no-cache-reference-answers --out /tmp/agree_float32
    safesteer eval ... --generation-dtype bfloat16 ... --out /tmp/agree_bfloat16
    python benchmarks/eval_agreement.py /tmp/agree_float32 /tmp/agree_bfloat16 [--model NAME] [--json out.json]

Reads MODEL/safety.judged.jsonl and MODEL/overrefusal.judged.jsonl of both folders, pairs the rows by
(set, prompt, sample) and prints, per set and overall: the share of prompts with the same verdict
(refused / answered, keyword judge), the share with identical answers, and both refusal rates with
their 95% Wilson intervals. Only the standard library and safesteer.eval.stats are used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _model_dir(root: Path, name: str | None) -> Path:
    if name:
        from safesteer.eval.suites import model_slug

        return root / model_slug(name)
    dirs = [p.parent for p in root.glob("*/model.json")]
    if len(dirs) != 1:
        raise SystemExit(f"{root} holds {len(dirs)} model folders; pass --model")
    return dirs[0]


def _rows(model_dir: Path) -> dict[tuple, dict]:
    rows = {}
    for kind in ("safety", "overrefusal"):
        path = model_dir / f"{kind}.judged.jsonl"
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            rows[(kind, r["set"], r["prompt_uid"], r.get("sample", 0))] = r
    return rows


def _fmt(k: int, n: int) -> str:
    from safesteer.eval.stats import wilson_interval

    lo, hi = wilson_interval(k, n)
    return f"{100 * k / n:5.1f}% [{100 * lo:4.1f}-{100 * hi:5.1f}] ({k}/{n})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="first evaluation folder (e.g. float32)")
    p.add_argument("b", help="second evaluation folder (e.g. bfloat16)")
    p.add_argument("--model", default=None, help="model name inside both folders (default: the only one)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    a_dir, b_dir = _model_dir(Path(args.a), args.model), _model_dir(Path(args.b), args.model)
    ra, rb = _rows(a_dir), _rows(b_dir)
    keys = sorted(set(ra) & set(rb))
    if not keys:
        raise SystemExit("no prompt answered in both folders")
    missing = len(set(ra) ^ set(rb))
    groups: dict[str, list[tuple]] = {}
    for k in keys:  # each set, then each suite, then everything
        groups.setdefault(f"{k[0]}/{k[1]}", []).append(k)
    for k in keys:
        groups.setdefault(f"{k[0]} (all sets)", []).append(k)
    groups["all"] = keys
    labels = (Path(args.a).name, Path(args.b).name)
    report = {"a": str(a_dir), "b": str(b_dir), "unpaired_rows": missing, "groups": {}}
    print(f"{'':<24}{'n':>5}{'same verdict':>14}{'same answer':>13}   refusal {labels[0]:<30}refusal {labels[1]}")
    for name, ks in groups.items():
        n = len(ks)
        same = sum(bool(ra[k]["refused"]) == bool(rb[k]["refused"]) for k in ks)
        identical = sum(ra[k]["response"] == rb[k]["response"] for k in ks)
        ka, kb = sum(bool(ra[k]["refused"]) for k in ks), sum(bool(rb[k]["refused"]) for k in ks)
        report["groups"][name] = {"n": n, "same_verdict": same / n, "identical_answers": identical / n,
                                  "refusal_a": [ka, n], "refusal_b": [kb, n],
                                  "flipped": [ra[k]["prompt"][:80] for k in ks
                                              if bool(ra[k]["refused"]) != bool(rb[k]["refused"])] if name == "all" else None}
        print(f"{name:<24}{n:>5}{100 * same / n:>13.1f}%{100 * identical / n:>12.1f}%   {_fmt(ka, n):<38}{_fmt(kb, n)}")
    if missing:
        print(f"({missing} rows answered in only one folder were left out)")
    overall = report["groups"]["all"]["same_verdict"]
    print(f"per-prompt verdict agreement: {100 * overall:.1f}% (target >= 95%)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
