"""pipeflow's structlog logger.

A library must not configure logging, nor print on a program that did not ask. So: when
the application has configured structlog (or a test captures logs with
``structlog.testing.capture_logs()``), pipeflow logs through structlog as configured;
otherwise events go to the standard ``logging`` logger ``"pipeflow"``, which shows
warnings and errors by default and info events only when the application enables them.

Event names (snake_case verbs): ``run_started``, ``run_finished``, ``stage_failed``,
``item_retried``, ``breaker_state_changed``, ``workers_scaled``, ``signal_received``,
``error_budget_exceeded``, ``stage_stalled``, ``stage_unstalled``,
``resource_close_failed``, ``resource_open_end_failed``, ``metrics_accept_failed``,
``metrics_linger_failed``; with their levels and fields in docs/observability.md (the
Redis connector's ``redis_*`` events: docs/distributed.md).
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

LOGGER_NAME = "pipeflow"

_FALLBACK_PROCESSORS: list[Any] = [
    structlog.stdlib.filter_by_level,  # don't format what the logging level drops
    structlog.processors.format_exc_info,
    structlog.processors.KeyValueRenderer(
        key_order=["event", "pipeline", "stage"], drop_missing=True, sort_keys=False
    ),
]


def _configured_by_application() -> bool:
    """Whether the application configured structlog (or a test is capturing logs).

    ``structlog.is_configured()`` stays True after ``capture_logs()`` restores the
    builtin defaults, which print to stdout; that configuration counts as "not
    configured", so a test that once captured logs does not make later runs print.
    """
    if not structlog.is_configured():
        return False
    config = structlog.get_config()
    processors = list(config["processors"])
    defaults = (
        isinstance(config["logger_factory"], structlog.PrintLoggerFactory)
        and len(processors) == 6
        and isinstance(processors[-1], structlog.dev.ConsoleRenderer)
    )
    return not defaults


def get_logger(**context: Any) -> Any:
    """A logger bound with ``context`` (usually ``pipeline=``), decided per run."""
    if _configured_by_application():
        return structlog.get_logger(LOGGER_NAME).bind(**context)
    return structlog.wrap_logger(
        logging.getLogger(LOGGER_NAME),
        processors=_FALLBACK_PROCESSORS,
        wrapper_class=structlog.stdlib.BoundLogger,
    ).bind(**context)
