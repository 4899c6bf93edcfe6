"""Merging the per-micro-batch numbers of one training step into the step's metrics."""

from __future__ import annotations

import pytest

from training.metrics import weighted_mean


def test_micro_batch_metrics_merge_into_means_and_true_extremes():
    """Means are weighted by tokens; a min or max is the extreme over micro-batches with
    tokens (averaging the micro-batches' extremes would hide the outliers they exist to show)."""
    parts = [
        ({"loss/ratio_mean": 1.0, "loss/ratio_min": 0.6, "loss/ratio_max": 1.2}, 3.0),
        ({"loss/ratio_mean": 2.0, "loss/ratio_min": 0.9, "loss/ratio_max": 1.9}, 1.0),
        ({"loss/ratio_mean": 9.0, "loss/ratio_min": 0.1, "loss/ratio_max": 9.0}, 0.0),
    ]
    merged = weighted_mean(parts)
    assert merged["loss/ratio_mean"] == pytest.approx(1.25)
    assert (merged["loss/ratio_min"], merged["loss/ratio_max"]) == (0.6, 1.9)
    assert weighted_mean([({"x_max": 5.0}, 0.0)]) == {}
