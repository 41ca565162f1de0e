"""Scores (falkon_convrfm.scoring): the per-class scores and confusion matrix that the CLI's
``evaluate`` prints."""
import numpy as np

from falkon_convrfm.scoring import class_scores


def test_confusion_matrix():
    scores = class_scores(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2]), 3)
    assert scores["confusion"].tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]] and scores["accuracy"] == 0.75
