"""Reading a process's Prometheus metrics in tests, straight from its registry (no HTTP scrape)."""

from __future__ import annotations

from emofleet.core.metrics import Metrics


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    """The sample ``name`` with exactly these labels; 0 when it was never recorded."""
    return metrics.registry.get_sample_value(name, labels) or 0.0


def metric_total(metrics: Metrics, name: str) -> float:
    """The sum of sample ``name`` over all its label values."""
    return sum(sample.value for family in metrics.registry.collect() for sample in family.samples
               if sample.name == name)
