"""``pipeflow graph``: draw a pipeline, a saved report, or a live metrics endpoint."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import attrs

from .._report import (
    TIMES,
    GraphView,
    ReportError,
    Scrape,
    load_report,
    parse_exposition,
    render,
    render_many,
    view_from_pipeline,
    view_from_report,
    views_from_scrapes,
)
from .._report.compare import compare, render_comparison
from .._report.dashboard import Dashboard, render_dashboard
from .._report.text import worker_lines
from .errors import EXIT_OK, CliError
from .loading import load_pipeline

FORMATS = ("text", "json", "dot", "mermaid", "html")


def stdout_unicode() -> bool:
    try:
        ("─│┌▼◀λ" + TIMES).encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _stdout_color() -> bool:
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def _emit(text: str, output: str | None) -> None:
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        Path(output).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot write {output}: {exc.strerror or exc}") from None


def _scrape(url: str) -> Scrape:
    body = _fetch(url)
    try:
        return parse_exposition(body)
    except ReportError as exc:
        raise CliError(f"{url}: {exc}") from None


def _is_dashboard(body: str) -> bool:
    """pipeflow's own dashboard page, or its figures (``/``, ``/dashboard.json``)."""
    head = body[:2000]
    return "<title>pipeflow" in head or ('"pipelines"' in head and '"charts"' in head)


def _metrics_url(url: str) -> str:
    """``url``, or the metrics next to it when ``url`` is pipeflow's dashboard: the same
    endpoint serves both, and the address a user has at hand is often the page's."""
    try:
        body = _fetch(url)
    except CliError:
        return url  # the first scrape says what is wrong
    if _is_dashboard(body):
        metrics = urllib.parse.urljoin(url, "/metrics")
        print(f"pipeflow: {url} is the live dashboard; reading {metrics}", file=sys.stderr)
        return metrics
    return url


def _workers(url: str) -> dict[str, list[dict[str, Any]]]:
    """What each worker is doing, from ``/workers`` beside the metrics (pipeflow's own
    endpoint serves it): pipeline → rows; empty when the endpoint has no such page."""
    try:
        data = json.loads(_fetch(urllib.parse.urljoin(url, "/workers")))
    except (CliError, ValueError):
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("workers"), list):
        return {}
    rows = [w for w in data["workers"] if isinstance(w, dict)]
    return {str(data.get("pipeline")): rows}


def _fetch(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body: str = response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as exc:
        raise CliError(f"{url} answered HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        text = getattr(reason, "strerror", None) or str(reason)
        raise CliError(f"cannot reach {url}: {text}") from None
    except (http.client.InvalidURL, ValueError) as exc:
        raise CliError(f"invalid URL {url}: {exc}") from None
    except http.client.HTTPException as exc:
        # Not an HTTP server (an SSH or Redis port), or one that hung up mid-answer.
        raise CliError(
            f"no valid HTTP answer from {url}: {type(exc).__name__}: {exc!s:.80}"
        ) from None
    return body


def _target_kind(target: str) -> str:
    if re.match(r"https?://", target):
        return "metrics"
    path = Path(target)
    if path.suffix.lower() == ".json" or path.is_file():
        return "report"
    return "pipeline"


_SUFFIX_FORMATS = {".html": "html", ".htm": "html", ".json": "json", ".dot": "dot", ".gv": "dot"}
_SUFFIX_FORMATS |= {".mmd": "mermaid", ".mermaid": "mermaid", ".txt": "text"}


def cmd_graph(args: argparse.Namespace) -> int:
    if args.format is None:
        suffix = Path(args.output).suffix.lower() if args.output else ""
        args.format = _SUFFIX_FORMATS.get(suffix, "text")
    kind = _target_kind(args.target)
    if args.watch and kind != "metrics":
        raise CliError("--watch needs the http:// metrics URL of a running pipeline")
    if args.format == "html" and args.output is None and sys.stdout.isatty():
        raise CliError("--format html writes a page: give --output FILE (or redirect stdout)")
    unicode = True if args.output else stdout_unicode()
    color = args.output is None and args.format == "text" and _stdout_color()
    if kind == "metrics":
        return _graph_live(args, unicode=unicode, color=color)
    if args.after is not None:
        return _compare(args, kind)
    if kind == "report":
        view = _read_report(args.target)
    else:
        view = view_from_pipeline(load_pipeline(args.target), args.target)
    _emit(render(view, args.format, unicode=unicode, color=color), args.output)
    if args.output:
        print(f"wrote {args.output}")
    return EXIT_OK


def _read_report(path: str) -> GraphView:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise CliError(f"cannot read report {path}: {reason}") from None
    try:
        return view_from_report(load_report(text, path), path)
    except ReportError as exc:
        raise CliError(str(exc)) from None


def _compare(args: argparse.Namespace, kind: str) -> int:
    """``pipeflow graph before.json after.json``."""
    for target, k in ((args.target, kind), (args.after, _target_kind(args.after))):
        if k != "report":
            raise CliError(f"comparing needs two run reports; {target!r} is not a report file")
    if args.watch:
        raise CliError("--watch draws one live endpoint, not a comparison of two reports")
    if args.format not in ("text", "json"):
        raise CliError(f"a comparison is text or json, not {args.format}")
    before, after = _read_report(args.target), _read_report(args.after)
    if args.format == "json":
        text = json.dumps(compare(before, after), indent=2, ensure_ascii=False) + "\n"
    else:
        text = render_comparison(before, after)
        if not stdout_unicode() and args.output is None:
            text = text.replace("→", "->").replace("λ", "lambda").replace(TIMES, "x")
    _emit(text, args.output)
    if args.output:
        print(f"wrote {args.output}")
    return EXIT_OK


def _graph_live(args: argparse.Namespace, *, unicode: bool, color: bool) -> int:
    url = _metrics_url(args.target)
    series: dict[str, dict[str, Any]] = {}
    live_screen = args.watch and args.output is None and sys.stdout.isatty()
    before = _scrape(url)
    t_before = start = time.monotonic()
    # Watching into an HTML file: the live dashboard, as a page that reloads itself.
    dashboard = Dashboard() if args.watch and args.output and args.format == "html" else None
    if dashboard is not None:
        dashboard.sample(t_before, before)
    try:
        while True:
            time.sleep(args.interval)
            try:
                after = _scrape(url)
            except CliError as exc:
                if not args.watch:
                    raise
                # The endpoint lives as long as the run: once it is gone, so is the run.
                print(f"pipeflow: {exc}: the run has ended", file=sys.stderr)
                break
            t_after = time.monotonic()
            workers = _workers(url) if args.format in ("text", "html") else {}
            if dashboard is not None:
                dashboard.sample(t_after, after)
                text = render_dashboard(dashboard.snapshot(workers), poll=None)
            else:
                views = views_from_scrapes(before, after, t_after - t_before, url)
                views = [_add_series(v, series, t_after - start) for v in views]
                text = render_many(views, args.format, unicode=unicode, color=color)
                rows = [w for ws in workers.values() for w in ws]
                if args.format == "text" and rows:
                    text = text.rstrip("\n") + "\n\n" + "\n".join(worker_lines(rows)) + "\n"
            if live_screen:
                sys.stdout.write("\x1b[H\x1b[2J")
            _emit(text, args.output)
            if not args.watch:
                break
            if not live_screen and args.output is None:
                print(flush=True)
            before, t_before = after, t_after
    except KeyboardInterrupt:
        pass  # --watch runs until Ctrl+C: that is its normal end
    if args.output:
        print(f"wrote {args.output}")
    return EXIT_OK


def _add_series(view: GraphView, series: dict[str, dict[str, Any]], t: float) -> GraphView:
    s = series.setdefault(view.pipeline, {"interval": None, "t": [], "stages": {}})
    s["t"].append(round(t, 3))
    for st in view.stages:
        column = s["stages"].setdefault(st.name, {"throughput": []})["throughput"]
        column.extend([0.0] * (len(s["t"]) - 1 - len(column)))
        column.append(st.throughput or 0.0)
    return attrs.evolve(view, series=s)
