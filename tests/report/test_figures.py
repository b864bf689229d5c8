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
