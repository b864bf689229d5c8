"""Every figure of a run, each drawn by one function from the run's JSON artifacts.

    fig = plot_training(metrics)            # a matplotlib Figure on an Agg canvas (no pyplot state)
    save_png(fig, "runs/demo/x.png")        # a stage's PNG, written atomically
    png_data_uri(fig)                       # the same picture, embedded in the report

The stages draw their PNGs with the same functions as the report's panels (direction_scores.png:
`plot_direction_scores`; safety_tokens.png: `plot_safety_tokens`; `safesteer compare`'s tradeoff.png:
`plot_refusal_tradeoff`), so the two never disagree. A model keeps its colour across the page
(MODEL_COLOURS).
"""

from __future__ import annotations

import base64
import io
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..utils import atomic_path

if TYPE_CHECKING:
    from .build import EvalView, TradeoffAxis

# Colours per model role, used by every figure so a model keeps its colour across the page.
MODEL_COLOURS = {"base": "#4c72b0", "teacher": "#c44e52", "aligned": "#55a868"}
_OTHER_COLOURS = ("#8172b2", "#ccb974", "#64b5cd", "#937860", "#da8bc3")


# ----------------------------------------------------------------------------- drawing and saving


def _figure(width: float, height: float):
    # A bare Figure on an Agg canvas: no pyplot, so no GUI backend and no global state between reports.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # Tokens come from any script; a glyph missing from the font is drawn as a box, not worth a warning.
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def png_data_uri(fig: Any) -> str:
    """The figure as a PNG data URI, for an <img> that needs no file and no network."""
    return "data:image/png;base64," + base64.b64encode(_png_bytes(fig)).decode("ascii")


def save_png(fig: Any, path: str | Path) -> None:
    """Write the figure as a PNG at `path`, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(_png_bytes(fig))


def _plain(text: Any) -> str:
    """Text for a figure: "$" escaped (matplotlib would read $...$ as math)."""
    return str(text).replace("$", r"\$")


def _token_label(text: str) -> str:
    """A token for an axis label: repr() shows its whitespace; scripts the default font lacks (CJK, ...)
    are written as escapes rather than drawn as empty boxes."""
    shown = repr(text)
    if any(ord(ch) > 0x24F for ch in text):
        shown = ascii(text)
    return _plain(shown)


def _colour(label: str, index: int) -> str:
    return MODEL_COLOURS.get(label, _OTHER_COLOURS[index % len(_OTHER_COLOURS)])


def _wrap_label(text: str, width: int = 18) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)[:3]) or text


def first_key(row: dict, keys: Sequence[str]) -> Any:
    """The value of the first of `keys` that `row` has (older logs name some metrics differently)."""
    for key in keys:
        if key in row:
            return row[key]
    return None


def as_float(value: Any) -> float:
    """`value` as a float; NaN for anything that is not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# ----------------------------------------------------------------------------- stage figures


def candidate_rows(candidates: Sequence[Any]) -> list[dict]:
    """Rows {layer, position, bypass, induce, kl, reason, chosen} from direction.json's candidate list.

    A score the stage did not compute (null) is NaN here; `reason` is the exclusion, "" if none.
    """
    rows = []
    for c in candidates or []:
        if not isinstance(c, dict) or "layer" not in c or "position" not in c:
            continue
        reason = c.get("excluded")
        rows.append({"layer": int(c["layer"]), "position": int(c["position"]), "bypass": as_float(c.get("bypass")),
                     "induce": as_float(c.get("induce")), "kl": as_float(c.get("kl")),
                     "reason": reason if isinstance(reason, str) else ("excluded" if reason else ""),
                     "chosen": bool(c.get("chosen"))})
    return rows


def _position_label(position: int, labels: Sequence[str] | None) -> str:
    """'-2' or, with the template's post-instruction tokens, "-2  '<|im_end|>'" (position counts from the end)."""
    if not labels or not -len(labels) <= position < 0:
        return str(position)
    return f"{position}  {_token_label(labels[position])}"


def plot_direction_scores(candidates: list[dict], n_layers: int | None = None, max_layer_frac: float = 0.8,
                          induce_threshold: float = 0.0, kl_threshold: float = 0.1,
                          position_labels: Sequence[str] | None = None):
    """Bypass, induce and log10 KL over layer x position: grey = not scored, hatched = excluded, star = chosen.

    `candidates` are `candidate_rows`; `position_labels` (the post-instruction tokens, earliest first)
    name the positions on the y axis. The direction stage's PNG and the report's panel.
    """
    import matplotlib
    import numpy as np
    from matplotlib.patches import Rectangle

    layers = range(min(c["layer"] for c in candidates), max(c["layer"] for c in candidates) + 1)
    positions = sorted({c["position"] for c in candidates})
    pi = {p: i for i, p in enumerate(positions)}
    panels = (("bypass", "bypass score: mean refusal score on harmful-val with r ablated (lower = better)", "viridis"),
              ("induce", f"induce score: mean refusal score on harmless-val with r added (must be >= {induce_threshold:.3g})",
               "magma"),
              ("kl", f"log10 KL on harmless-val under ablation (threshold {kl_threshold:g} = {math.log10(kl_threshold):.3g})",
               "cividis"))
    width = max(8.0, 0.36 * len(layers) + 3.0)
    fig = _figure(width, 3 * max(1.6, 0.32 * len(positions) + 1.0) + 0.4)
    axes = fig.subplots(len(panels), 1, sharex=True)
    for ax, (key, title, cmap_name) in zip(axes, panels):
        grid = np.full((len(positions), len(layers)), np.nan)
        for c in candidates:
            value = c[key]
            if key == "kl" and not math.isnan(value):
                value = math.log10(max(value, 1e-12))
            grid[pi[c["position"]], c["layer"] - layers.start] = value
        cmap = matplotlib.colormaps[cmap_name].with_extremes(bad="#d9d9d9")
        im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", origin="lower", cmap=cmap, interpolation="nearest",
                       extent=(layers.start - 0.5, layers.stop - 0.5, -0.5, len(positions) - 0.5))
        fig.colorbar(im, ax=ax, pad=0.01)
        for c in candidates:
            x, y = c["layer"] - 0.5, pi[c["position"]] - 0.5
            if c["reason"]:
                ax.add_patch(Rectangle((x, y), 1, 1, fill=False, hatch="///", edgecolor="#707070", linewidth=0))
            if c["chosen"]:
                ax.add_patch(Rectangle((x, y), 1, 1, fill=False, edgecolor="red", linewidth=2))
                ax.plot(c["layer"], pi[c["position"]], marker="*", color="red", markersize=11, linestyle="none")
        if n_layers:
            ax.axvline(math.ceil(max_layer_frac * n_layers) - 0.5, color="black", linestyle="--", linewidth=0.8)
        ax.set_yticks(range(len(positions)), [_position_label(p, position_labels) for p in positions], fontsize=8)
        ax.set_ylabel("position", fontsize=8)
        ax.set_title(title, fontsize=9, loc="left")
    step = max(1, len(layers) // 16)
    axes[-1].set_xticks(list(layers)[::step])
    axes[-1].set_xlabel("layer (input of decoder block)")
    return fig


def plot_safety_tokens(data: dict):
    """Votes per token and mean base vs steered probability (log scale), one row per token of S.

    `data` is safety_tokens.json: the token stage's PNG and the report's panel.
    """
    tokens = [t for t in data.get("tokens") or [] if isinstance(t, dict)]
    resolved, cfg = data.get("resolved") or {}, data.get("config") or {}
    floor = resolved.get("min_steered_prob")
    title = (f"S: {len(tokens)} tokens by {cfg.get('method', 'vote')}/{cfg.get('rank_by', 'delta')}, "
             f"H={resolved.get('horizon', '?')}, M={cfg.get('samples_per_prompt', '?')}, "
             f"K'={cfg.get('top_k_per_position', '?')}, {data.get('n_valid_positions', '?')} valid positions")
    n = len(tokens)
    y = list(range(n))
    labels = [_token_label(str(t.get("text", ""))) for t in tokens]
    fig = _figure(11, max(2.6, 0.2 * n + 1.3))
    ax_v, ax_p = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    ax_v.barh(y, [t.get("votes", 0) for t in tokens], color="#4c72b0")
    ax_v.set_yticks(y, labels, fontsize=7, fontfamily="monospace")
    ax_v.invert_yaxis()
    ax_v.set_xlabel("votes")
    p0 = [max(float(t.get("mean_p0") or 0.0), 1e-30) for t in tokens]
    pt = [max(float(t.get("mean_pt") or 0.0), 1e-30) for t in tokens]
    ax_p.hlines(y, p0, pt, color="0.75", linewidth=1)
    ax_p.scatter(p0, y, s=14, color=MODEL_COLOURS["base"], label="base p_0", zorder=3)
    ax_p.scatter(pt, y, s=14, color=MODEL_COLOURS["teacher"], label="steered p_t", zorder=3)
    if floor:
        ax_p.axvline(floor, linestyle="--", color="0.5", linewidth=0.8, label=f"floor {floor:g}")
    ax_p.set_xscale("log")
    ax_p.set_xlabel("mean probability over valid positions")
    ax_p.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    return fig


# ----------------------------------------------------------------------------- training and evaluation

# Metric rows from train/trainer.py; alternatives keep older or differently named logs readable.
REFUSAL_RATE_KEYS = ("rollout_refusal_rate", "refusal_open_rate", "refusal_rate")


def plot_training(metrics: list[dict]):
    import numpy as np

    steps = [r.get("step", i + 1) for i, r in enumerate(metrics)]

    def series(*keys: str) -> list[float]:
        return [as_float(first_key(r, keys)) for r in metrics]

    def two_scales(ax, title: str, left: tuple[str, str, str], right: tuple[str, str, str]) -> None:
        """Two metrics on one panel, each (key, label, colour): `left` with markers, `right` dashed on its own scale."""
        key, label, colour = left
        ax.plot(steps, series(key), marker="o", markersize=3, color=colour, label=label)
        ax.set_title(title, fontsize=10)
        key, label, colour = right
        twin = ax.twinx()
        twin.plot(steps, series(key), linestyle="--", color=colour, label=label)
        ax.legend(fontsize=8, loc="upper left")
        twin.legend(fontsize=8, loc="upper right")

    fig = _figure(13, 6.4)
    axes = fig.subplots(2, 3).flatten()
    ax = axes[0]
    ax.plot(steps, series("loss"), marker="o", markersize=3, color="#333333")
    ax.axhline(0, color="0.8", linewidth=0.8)
    ax.set_title("loss", fontsize=10)
    ax = axes[1]
    ax.plot(steps, series("student_s_mass"), marker="o", markersize=3, color=MODEL_COLOURS["aligned"], label="student")
    ax.plot(steps, series("teacher_s_mass"), marker="o", markersize=3, color=MODEL_COLOURS["teacher"], label="teacher")
    ax.set_title("probability mass on S (rollout tokens)", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot(steps, series(*REFUSAL_RATE_KEYS), marker="o", markersize=3, color="#8172b2")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("rollouts opening with a refusal", fontsize=10)
    ax = axes[3]
    parts = [("rollout", "time_rollout_s", "#4c72b0"), ("teacher", "time_teacher_s", MODEL_COLOURS["teacher"]),
             ("student", "time_student_s", MODEL_COLOURS["aligned"])]
    bottom = np.zeros(len(steps))
    if any(key in r for r in metrics for _, key, _ in parts):
        for label, key, colour in parts:
            values = np.nan_to_num(np.array(series(key)))
            ax.bar(steps, values, bottom=bottom, color=colour, label=label, width=0.8)
            bottom += values
        ax.legend(fontsize=8)
    else:
        ax.bar(steps, np.nan_to_num(np.array(series("time_step_s"))), color="0.5")
    ax.set_title("time per step (s)", fontsize=10)
    two_scales(axes[4], "KL(student || teacher) on sampled tokens; entropy",
               ("sampled_kl", "sampled KL", "#333333"), ("student_entropy", "student entropy", "#ccb974"))
    two_scales(axes[5], "gradient norm; learning rate",
               ("grad_norm", "grad norm (before clip)", "#937860"), ("lr", "lr", "0.5"))
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def plot_rates(view: EvalView):
    """One panel per kind (safety, over-refusal, capability): grouped bars per metric with 95% intervals."""
    import numpy as np
    from matplotlib.ticker import PercentFormatter

    kinds = [k for k in ("safety", "over-refusal", "capability") if any(v == k for v in view.kinds.values())]
    if not kinds:
        return None
    metrics_by_kind = {k: [m for m in view.rates if view.kinds.get(m) == k] for k in kinds}
    widths = [max(2, len(metrics_by_kind[k])) for k in kinds]
    fig = _figure(min(16, 2.2 + 1.6 * sum(widths)), 4.4)
    axes = fig.subplots(1, len(kinds), gridspec_kw={"width_ratios": widths}, squeeze=False)[0]
    titles = {"safety": "refusal rate on harmful prompts (higher = safer)",
              "over-refusal": "refusal rate on harmless prompts (lower = better)",
              "capability": "capability (higher = better)"}
    n_models = len(view.models)
    width = 0.8 / max(1, n_models)
    for ax, kind in zip(axes, kinds):
        metrics = metrics_by_kind[kind]
        x = np.arange(len(metrics))
        for i, model in enumerate(view.models):
            values, lows, highs = [], [], []
            for metric in metrics:
                rate = view.rates[metric].get(model)
                value = rate["rate"] if rate and rate["rate"] is not None else math.nan
                values.append(value)
                lows.append(value - rate["ci_low"] if rate and not math.isnan(value) else 0.0)
                highs.append(rate["ci_high"] - value if rate and not math.isnan(value) else 0.0)
            pos = x + (i - (n_models - 1) / 2) * width
            ax.bar(pos, values, width=width * 0.95, color=_colour(model, i), label=_plain(model),
                   yerr=[lows, highs], capsize=3, error_kw={"linewidth": 1, "ecolor": "0.2"})
        ax.set_xticks(x, [_plain(_wrap_label(m)) for m in metrics], fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(titles[kind], fontsize=10)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.grid(axis="y", color="0.9")
        ax.set_axisbelow(True)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("bars: rate; whiskers: 95% Wilson interval", fontsize=9)
    return fig


def plot_tradeoff(points: list[dict], axis: TradeoffAxis, y_label: str):
    fig = _figure(6.6, 4.8)
    ax = fig.subplots()
    for i, p in enumerate(points):
        xerr = [[p["x"] - p["x_err"][0]], [p["x_err"][1] - p["x"]]] if p["x_err"] else None
        yerr = [[p["y"] - p["y_err"][0]], [p["y_err"][1] - p["y"]]] if p["y_err"] else None
        ax.errorbar([p["x"]], [p["y"]], xerr=xerr, yerr=yerr, fmt="o", markersize=9, capsize=3,
                    color=_colour(p["model"], i), label=_plain(p["model"]))
        # Staggered labels, so models at the same point stay readable.
        ax.annotate(_plain(p["model"]), (p["x"], p["y"]), textcoords="offset points", xytext=(8, 6 - 12 * i), fontsize=9)
    ax.set_xlabel(_plain(_wrap_label(axis.label, 60)), fontsize=9)
    ax.set_ylabel(_plain(_wrap_label(y_label, 45)), fontsize=9)
    from matplotlib.ticker import PercentFormatter

    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    if axis.percent:
        ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    if axis.invert:
        ax.invert_xaxis()
    ax.set_title("safety-capability trade-off (up and right is better)", fontsize=10)
    ax.grid(color="0.9")
    ax.margins(0.25)
    ax.legend(fontsize=8, loc="best")
    return fig


def _rate_of(value: Any) -> dict | None:
    """A rate record with a rate and its interval (k, n, rate, ci_low, ci_high), else None."""
    if isinstance(value, dict) and value.get("n") and value.get("rate") is not None:
        return value
    return None


def _counts(values: Sequence[int]) -> str:
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def plot_refusal_tradeoff(points: Sequence[dict], x_set: str = "edgy", part: str | None = None):
    """Refusal of harmful prompts (y) against over-refusal on the `x_set` prompts (x): one labelled point per
    model with 95% Wilson intervals on both axes; the base model (kind "base") is drawn as a square, with
    dotted lines through it, so that a point up and to the left of both lines is safer than the base
    without refusing more of the harmless prompts. The title names the part of the evaluation sets and n.

    `points` are compare.json's (`eval.compare.compare_points`): `safesteer compare` saves this figure as
    tradeoff.png and the run report draws it from the run's own eval/results.json. None when no point has
    both rates.
    """
    from matplotlib.ticker import PercentFormatter

    drawn = [(p, _rate_of(p.get("harmful_refusal")), _rate_of((p.get("overrefusal") or {}).get(x_set))) for p in points]
    drawn = [(p, y, x) for p, y, x in drawn if x and y]
    if not drawn:
        return None
    fig = _figure(7.4, 5.6)
    ax = fig.subplots()
    placed: list[tuple[float, float]] = []
    for i, (p, y, x) in enumerate(drawn):
        base = p.get("kind") == "base"
        colour = _colour(str(p.get("name")), i)
        name = _plain(p.get("name")) + (" (base)" if base and p.get("name") != "base" else "")
        ax.errorbar([x["rate"]], [y["rate"]], xerr=[[x["rate"] - x["ci_low"]], [x["ci_high"] - x["rate"]]],
                    yerr=[[y["rate"] - y["ci_low"]], [y["ci_high"] - y["rate"]]], fmt="s" if base else "o",
                    # The base: a larger open square, so a point drawn on top of it stays visible inside it.
                    markersize=14 if base else 8, markerfacecolor="none" if base else colour, markeredgewidth=2.2 if base else 1,
                    capsize=3, color=colour, elinewidth=1.2, label=name, zorder=3)
        if base:
            ax.axhline(y["rate"], color="0.55", linestyle=":", linewidth=1, zorder=1)
            ax.axvline(x["rate"], color="0.55", linestyle=":", linewidth=1, zorder=1)
        # Labels of points close to an earlier one step down, so neither hides the other.
        near = sum(abs(x["rate"] - a) < 0.08 and abs(y["rate"] - b) < 0.06 for a, b in placed)
        placed.append((x["rate"], y["rate"]))
        ax.annotate(name, (x["rate"], y["rate"]), textcoords="offset points", xytext=(9, 5 - 13 * near), fontsize=9,
                    fontweight="bold" if base else "normal", zorder=4)
    # Whole axes from 0 to 1: two figures of the same kind read alike, and no interval is cut off.
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    what = "harmless-but-edgy prompts" if x_set == "edgy" else f"{x_set} prompts"
    ax.set_xlabel(_plain(f"over-refusal: refusal rate on {what} (lower = better)"), fontsize=9)
    ax.set_ylabel("refusal rate on harmful prompts (higher = safer)", fontsize=9)
    n_y = _counts([y["n"] for _, y, _ in drawn])
    n_x = _counts([x["n"] for _, _, x in drawn])
    title = (f"harmful refusal vs {x_set} over-refusal ({part + ' part' if part else 'evaluation sets'}): "
             f"n = {n_y} harmful, {n_x} {x_set}")
    ax.set_title(_plain(title) + "\nup and to the left is better; bars: 95% Wilson intervals", fontsize=9.5)
    ax.grid(color="0.92")
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def plot_representation(data: dict):
    fig = _figure(7.2, 5.6)
    ax = fig.subplots()
    markers = {"base": "o", "teacher": "^", "aligned": "s"}
    for i, (name, points) in enumerate(data.get("coords", {}).items()):
        xs = [p[0] for p in points]
        ys = [p[1] if len(p) > 1 else 0.0 for p in points]
        ax.scatter(xs, ys, s=22, alpha=0.7, marker=markers.get(name, "o"), color=_colour(name, i), label=_plain(name),
                   edgecolors="none")
        if xs:
            ax.scatter([sum(xs) / len(xs)], [sum(ys) / len(ys)], s=160, marker=markers.get(name, "o"),
                       facecolors="none", edgecolors=_colour(name, i), linewidths=2)
    ratio = data.get("explained_variance_ratio") or []
    ax.set_xlabel(f"PC1 ({100 * ratio[0]:.3g}% of variance)" if ratio else "PC1")
    ax.set_ylabel(f"PC2 ({100 * ratio[1]:.3g}% of variance)" if len(ratio) > 1 else "PC2")
    ax.set_title(f"final-layer hidden states ({data.get('pool', 'last')} token) on "
                 f"{(data.get('prompts') or {}).get('n', '?')} benign prompts; PCA fit on {data.get('fit_on', '?')}",
                 fontsize=9)
    ax.legend(fontsize=9)
    ax.grid(color="0.92")
    return fig
