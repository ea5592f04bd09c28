"""The Prometheus text exposition, read with prometheus-client's own parser into one value
per (name, labels): exact look-ups, as the metrics tests make them."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

Labels = dict[str, str]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(body: bytes) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def label_values(found: Samples, name: str, label: str) -> set[str]:
    return {dict(labels)[label] for sample, labels in found if sample == name}
