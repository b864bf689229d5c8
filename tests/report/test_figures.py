"""The figures: one function per figure, shared by the stage PNGs and the report's panels."""

import math

from safesteer.report.figures import candidate_rows, plot_direction_scores, plot_safety_tokens, save_png
from safesteer.teacher.direction import Candidate

PNG = b"\x89PNG\r\n\x1a\n"


def test_direction_scores_png_with_gaps_exclusions_and_position_labels(tmp_path):
    table = [Candidate(position=-2, layer=0), Candidate(position=-1, layer=0, bypass=-1.0, induce=1.0, kl=0.0),
             Candidate(position=-2, layer=1, bypass=0.5), Candidate(position=-1, layer=1, bypass=2.0)]
    table[0].excluded = "zero direction"
    table[1].chosen = True
    rows = candidate_rows([c.as_dict() for c in table])
    assert [r["reason"] for r in rows] == ["zero direction", "", "", ""] and rows[1]["chosen"]
    assert math.isnan(rows[0]["bypass"]) and math.isnan(rows[2]["kl"])  # not scored: NaN
    fig = plot_direction_scores(rows, n_layers=2, position_labels=["<|im_end|>", "\n$x$"])
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["-2  '<|im_end|>'", "-1  '\\n\\$x\\$'"]
    save_png(fig, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == PNG
    assert candidate_rows([{"layer": 1}, "junk", {"layer": 0, "position": -1, "bypass": None}])[0]["position"] == -1


def test_safety_token_panel_from_the_artifact(tmp_path):
    data = {"tokens": [{"id": 1, "text": "Sorry", "votes": 5, "mean_p0": 1e-4, "mean_pt": 0.2},
                       {"id": 2, "text": "无法", "votes": 3, "mean_p0": 0.0, "mean_pt": 1e-3}, "junk"],
            "resolved": {"horizon": 7, "min_steered_prob": 1e-3},
            "config": {"method": "vote", "rank_by": "delta", "samples_per_prompt": 8, "top_k_per_position": 10},
            "n_valid_positions": 42}
    fig = plot_safety_tokens(data)
    assert fig._suptitle.get_text() == "S: 2 tokens by vote/delta, H=7, M=8, K'=10, 42 valid positions"
    save_png(fig, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == PNG


def _rate(k, n):
    from safesteer.eval.stats import Rate

    return Rate(k, n).to_dict()


def test_refusal_tradeoff_marks_the_base_and_names_n_and_part(tmp_path):
    from safesteer.report.figures import plot_refusal_tradeoff

    points = [{"name": "base", "kind": "base", "harmful_refusal": _rate(37, 64), "overrefusal": {"edgy": _rate(17, 64)}},
              {"name": "cpu", "kind": "run", "harmful_refusal": _rate(54, 64), "overrefusal": {"edgy": _rate(28, 64)}},
              {"name": "$x$ <b>", "kind": "run", "harmful_refusal": _rate(60, 64), "overrefusal": {"edgy": _rate(10, 64)}},
              {"name": "no over-refusal suite", "kind": "run", "harmful_refusal": _rate(1, 2), "overrefusal": {}}]
    fig = plot_refusal_tradeoff(points, "edgy", "tune")
    ax = fig.axes[0]
    assert ax.get_title().startswith("harmful refusal vs edgy over-refusal (tune part): n = 64 harmful, 64 edgy")
    assert [t.get_text() for t in ax.texts] == ["base", "cpu", "\\$x\\$ <b>"]  # the point without the rate is left out
    lines = [line for line in ax.get_lines() if line.get_marker() in ("s", "o")]
    assert [line.get_marker() for line in lines] == ["s", "o", "o"]  # the base is the square
    assert (lines[0].get_xdata()[0], lines[0].get_ydata()[0]) == (17 / 64, 37 / 64)
    # Error bars on both axes: one vertical and one horizontal segment per point.
    segments = [seg for coll in ax.collections for seg in coll.get_segments()]
    assert len(segments) == 2 * 3
    save_png(fig, tmp_path / "tradeoff.png")
    data = (tmp_path / "tradeoff.png").read_bytes()
    assert data[:8] == PNG and int.from_bytes(data[16:20], "big") == 740 and int.from_bytes(data[20:24], "big") == 560
    assert plot_refusal_tradeoff(points[3:], "edgy") is None  # nothing to draw
