"""The run report: one self-contained HTML page and the figures it (and the stages) draw."""
