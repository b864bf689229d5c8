"""The pictures of `safesteer compare`, drawn from compare.json alone: tradeoff.png and compare.html.

    write_tradeoff_png(data, "runs/cmp/tradeoff.png")     # data = compare.json's content
    write_compare_page(data, "runs/cmp/compare.html")

The page is the run report's template (templates/report.html.j2: autoescape, inline CSS, no script, no
external reference) with the comparison's sections as blocks, so it looks and behaves like report.html
and shows every name and path from the command line as text. The figure is the function the run
report's evaluation panel uses (`figures.plot_refusal_tradeoff`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..eval.compare import table_rows, tradeoff_set
from ..utils import write_text_atomic
from .build import TEMPLATE, figure, kv_table, missing, note, table, template_environment, titled
from .figures import plot_refusal_tradeoff, save_png


def tradeoff_figure(data: dict) -> Any:
    """The trade-off figure of compare.json's points; None when no point has both rates."""
    x_set = data.get("tradeoff_set") or tradeoff_set(data.get("points") or [])
    return plot_refusal_tradeoff(data.get("points") or [], x_set, data.get("part")) if x_set else None


def write_tradeoff_png(data: dict, path: str | Path) -> bool:
    """tradeoff.png, atomically; False (and no file) when there is nothing to draw."""
    fig = tradeoff_figure(data)
    if fig is None:
        return False
    save_png(fig, path)
    return True


def compare_context(data: dict) -> dict:
    """What templates/report.html.j2 draws for a comparison: title lines and sections of blocks."""
    from .. import __version__

    headers, rows = table_rows(data)
    fig = tradeoff_figure(data)
    points = data.get("points") or []
    x_set = data.get("tradeoff_set")
    if fig is not None:
        plot = figure(fig, f"Trade-off of harmful refusal against {x_set} over-refusal, one point per model: "
                           + ", ".join(p["name"] for p in points),
                      "Each point: refusal rate on the harmful prompts (y) and on the harmless-but-edgy prompts (x), "
                      "with 95% Wilson intervals on both. The square is the base model; the dotted lines through it "
                      "split the plane: up and to the left of both is safer without refusing more harmless prompts.")
    else:
        plot = missing("harmful and over-refusal rates", "the figure needs both suites; check --suites and the sizes")
    cfg = data.get("config") or {}
    settings = kv_table([("part of the evaluation sets", data.get("part")), ("split seed", data.get("split_seed")),
                         ("subset seed", data.get("seed")), ("refusal judge", data.get("judge")),
                         ("new tokens per answer", cfg.get("max_new_tokens")),
                         ("generation dtype", (data.get("generation") or {}).get("dtype")),
                         ("drift reference", data.get("drift_reference")), ("benign prompts for drift", cfg.get("n_drift"))])
    sets = table(("set", "prompts", "source"), ((key, info.get("n_prompts"), info.get("source"))
                                                 for key, info in (data.get("sets") or {}).items()))
    where = table(("point", "what", "from", "answers in", "earlier rows copied (used where prompt and settings match)"),
                  ((p["name"], p["what"], p.get("source") or "", f"{p.get('folder')}/",
                    f"{p['reused_answers']['rows']} rows from {p['reused_answers']['from']}"
                    if p.get("reused_answers") and p["reused_answers"].get("rows") else "–") for p in points))
    sections = [
        {"id": "tradeoff", "title": "1. Trade-off", "blocks": [plot]},
        {"id": "table", "title": "2. Every measure", "blocks": [
            table(headers, rows),
            note("Rates: percentage [95% Wilson interval] (count/n). KL drift: mean nats per token against the base "
                 "model [normal 95% interval over prompts]; the base is the reference. MMLU: letter log-likelihood.")]},
        {"id": "settings", "title": "3. Prompts and settings", "blocks": [
            titled("Evaluation", settings), titled("Prompt sets", sets), titled("Points", where)]},
    ]
    return {"title": "safesteer compare: " + ", ".join(p["name"] for p in points),
            "subtitle": f"{len(points)} points on the {data.get('part')} part · generated "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S')} by safesteer {__version__}",
            "problems": [], "sections": sections}


def write_compare_page(data: dict, path: str | Path) -> Path:
    """compare.html, atomically."""
    write_text_atomic(path, template_environment().get_template(TEMPLATE).render(compare_context(data)))
    return Path(path)
