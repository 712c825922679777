"""Prometheus metrics (placeholder: being implemented; see issue 5)."""

from __future__ import annotations

from typing import Any


def register(pipeline: Any, registry: Any) -> None:
    raise NotImplementedError("Prometheus metrics are not implemented yet")


def metrics_service(pipeline: Any, port: int) -> Any:
    raise NotImplementedError("metrics_port= is not implemented yet")
