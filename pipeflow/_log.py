"""pipeflow's structlog logger.

A library must not configure logging, nor print on a program that did not ask. So: when
the application has configured structlog (or a test captures logs with
``structlog.testing.capture_logs()``), pipeflow logs through structlog as configured;
otherwise events go to the standard ``logging`` logger ``"pipeflow"``, which shows
warnings and errors by default and info events only when the application enables them.

Event names (snake_case verbs): ``run_started``, ``run_finished``, ``stage_failed``,
``item_retried``, ``breaker_state_changed``, ``workers_scaled``, ``signal_received``,
``error_budget_exceeded``.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

LOGGER_NAME = "pipeflow"

_FALLBACK_PROCESSORS: list[Any] = [
    structlog.processors.format_exc_info,
    structlog.processors.KeyValueRenderer(
        key_order=["event", "pipeline", "stage"], drop_missing=True, sort_keys=False
    ),
]


def get_logger(**context: Any) -> Any:
    """A logger bound with ``context`` (usually ``pipeline=``), decided per run."""
    if structlog.is_configured():
        return structlog.get_logger(LOGGER_NAME).bind(**context)
    return structlog.wrap_logger(
        logging.getLogger(LOGGER_NAME),
        processors=_FALLBACK_PROCESSORS,
        wrapper_class=structlog.stdlib.BoundLogger,
    ).bind(**context)
