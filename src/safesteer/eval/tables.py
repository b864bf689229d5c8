"""The evaluation as text: markdown tables per model and per prompt set, refusal openings, results.md.

    print(format_table(results))          # results = eval.suites.evaluate_models(...)
"""

from __future__ import annotations

from .judges import REFUSAL_JUDGE

TABLE_COLUMNS = ("harmful refusal", "over-refusal (all sets)", "MMLU", "GSM8K", "KL drift", "token agreement")


def format_rate(rate: dict | None) -> str:
    """'xx.x% [lo-hi] (k/n)'."""
    if not rate or not rate.get("n"):
        return "-"
    return (f"{100 * rate['k'] / rate['n']:.1f}% [{100 * rate['ci_low']:.1f}-{100 * rate['ci_high']:.1f}] "
            f"({rate['k']}/{rate['n']})")


def format_drift(drift: dict | None) -> str:
    """A drift block as a cell: "reference" for the reference model, else "mean [95% interval over prompts]"."""
    if not drift:
        return "-"
    if drift.get("is_reference"):
        return "reference"
    if "kl_mean" not in drift:
        return "n/a"
    ci = drift.get("kl_prompt_mean_ci95")
    return f"{drift['kl_mean']:.4f}" + (f" [{ci[0]:.4f}-{ci[1]:.4f}]" if ci else "")


def format_table(results: dict) -> str:
    """Markdown: one row per model; rates as 'xx.x% [lo-hi] (k/n)'; KL in nats per token."""
    guard = results.get("judge") not in (None, REFUSAL_JUDGE)
    columns = list(TABLE_COLUMNS) + ([f"unsafe ({results['judge']})"] if guard else [])
    lines = ["| model | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for name, m in results.get("models", {}).items():
        drift = m.get("drift")
        cells = [
            format_rate((m.get("safety") or {}).get("overall", {}).get("refusal")),
            format_rate((m.get("overrefusal") or {}).get("overall", {}).get("refusal")),
            format_rate((m.get("mmlu") or {}).get("accuracy")),
            format_rate((m.get("gsm8k") or {}).get("accuracy")),
            format_drift(drift),
            "reference" if drift and drift.get("is_reference") else format_rate((drift or {}).get("agreement")),
        ]
        if guard:
            block = (m.get("safety") or {}).get("overall", {})
            cells.append(format_rate(block.get("attack_success")) + (f", {block['unparseable']} unparseable"
                                                                    if block.get("unparseable") else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_sets_table(results: dict) -> str:
    """Markdown: one row per prompt set, one column per model (refusal rate)."""
    models = list(results.get("models", {}))
    lines = ["| set | " + " | ".join(models) + " |", "|" + "---|" * (len(models) + 1)]
    for key in results.get("sets", {}):
        kind, name = key.split("/", 1)
        cells = [format_rate(((results["models"][m].get(kind) or {}).get("sets", {}).get(name) or {}).get("refusal"))
                 for m in models]
        lines.append(f"| {kind}: {name} (refusal) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_templates(results: dict, top: int = 5) -> str:
    lines = []
    for name, m in results.get("models", {}).items():
        templates = m.get("refusal_templates")
        if templates is None:
            continue
        lines.append(f"{name}: {len(templates)} distinct refusal openings" + (", most common:" if templates else ""))
        lines.extend(f"  {count:4d}  {text}" for text, count in templates[:top])
    return "\n".join(lines)


def format_report(results: dict) -> str:
    cfg = results.get("config", {})
    parts = ["# safesteer eval", "",
             f"Refusals: keyword judge ({REFUSAL_JUDGE}); attack success: {results.get('judge')}. "
             f"{'Sampled (T=1), ' + str(cfg.get('samples')) + ' per prompt' if cfg.get('samples', 1) > 1 or cfg.get('sample') else 'Greedy'}, "
             f"{cfg.get('max_new_tokens')} new tokens. Rates: 95% Wilson interval and counts. KL drift: mean "
             f"nats/token vs {results.get('drift_reference')} [normal 95% interval over prompts].", "",
             format_table(results), "", "## Per set", "", format_sets_table(results), "",
             "## Refusal openings (top 5)", "", "```", format_templates(results), "```", "", "## Wall-clock (s)", ""]
    for name, m in results.get("models", {}).items():
        parts.append(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in m.get("timings", {}).items()))
    if results.get("mmlu_template"):
        parts += ["", "## MMLU prompt (user turn; letter scored at the first assistant token)", "", "```",
                  results["mmlu_template"], "```"]
    return "\n".join(parts) + "\n"
