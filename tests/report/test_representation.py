import pytest

from safesteer.report.representation import pca_coordinates


def test_pca_projects_onto_the_direction_of_largest_variance():
    import numpy as np

    rng = np.random.default_rng(0)
    base = rng.normal(size=(50, 8)) * np.array([5.0, 1, 1, 1, 1, 1, 1, 0.1])
    coords, ratio = pca_coordinates({"base": base, "moved": base + np.eye(8)[7] * 100}, ["base"])
    pc1 = np.array(coords["base"])[:, 0]
    assert abs(np.corrcoef(pc1, base[:, 0])[0, 1]) > 0.99 and ratio[0] > 0.5
    # fitted on both, the shift along the low-variance axis becomes the first component
    coords, _ = pca_coordinates({"base": base, "moved": base + np.eye(8)[7] * 100}, ["base", "moved"])
    gap = np.array(coords["moved"])[:, 0].mean() - np.array(coords["base"])[:, 0].mean()
    assert abs(gap) == pytest.approx(100, rel=1e-6)
