"""The live dashboard the metrics endpoint serves at ``/``.

The endpoint samples its own registry once a second (:meth:`Dashboard.sample`), keeps
the last ten minutes, and answers ``/dashboard.json`` with every pipeline's stages over
the last few seconds, the verdict on them, and the history behind the charts. ``/`` is
one self-contained page (inline style and script, no CDN, no build step, works offline)
that draws the first answer at once and asks for a new one every second.
"""

from __future__ import annotations

import html
import json
from collections import deque
from collections.abc import Mapping
from typing import Any

import attrs

from .format import json_safe
from .scrape import Scrape, views_from_scrapes

__all__ = ["HISTORY", "WINDOW", "Dashboard", "render_dashboard"]

#: Seconds of history the dashboard keeps (one sample a second).
HISTORY = 600
#: Seconds the live figures and the verdict are judged over.
WINDOW = 5.0

#: What each chart shows, per stage, per sample.
CHARTS = (
    ("throughput", "items/s finished"),
    ("queue_depth", "queue depth (items waiting)"),
    ("busy", "busy workers (on average)"),
    ("blocked", "workers blocked sending downstream"),
    ("throttled", "workers throttled (rate limit or breaker)"),
    ("failed", "failures (total)"),
)


@attrs.define
class _Sample:
    t: float
    scrape: Scrape


@attrs.define
class Dashboard:
    """Scrapes taken once a second and what the page needs from them.

    ``structures`` maps a pipeline's name to its structure (``describe_pipeline``), so
    that the verdict knows each stage's options (a ``rate=``, a breaker, batches).
    """

    structures: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    _samples: deque[_Sample] = attrs.field(factory=lambda: deque(maxlen=HISTORY + 1))
    _history: dict[str, dict[str, Any]] = attrs.field(factory=dict)

    def sample(self, t: float, scrape: Scrape) -> None:
        """Record the scrape taken at ``t`` (seconds, any monotonic clock)."""
        previous = self._samples[-1] if self._samples else None
        if previous is not None and t <= previous.t:
            return
        self._samples.append(_Sample(t, scrape))
        if previous is None:
            return
        for view in views_from_scrapes(previous.scrape, scrape, t - previous.t, "dashboard"):
            h = self._history.setdefault(view.pipeline, {"t": deque(maxlen=HISTORY), "stages": {}})
            h["t"].append(round(t - self._samples[0].t, 3))
            n = len(h["t"])
            for s in view.stages:
                columns = h["stages"].setdefault(
                    s.name, {key: deque(maxlen=HISTORY) for key, _ in CHARTS}
                )
                seconds = s.seconds or 1.0
                values = {
                    "throughput": s.throughput or 0.0,
                    "queue_depth": s.queue_depth or 0.0,
                    "busy": s.load or 0.0,
                    "blocked": (s.blocked_fraction or 0.0) * (s.workers_now or 0.0),
                    "throttled": (s.throttled_seconds or 0.0) / seconds,
                    "failed": float(s.failed or 0),
                }
                for key, column in columns.items():
                    while len(column) < n - 1:  # a stage that appeared late
                        column.append(None)
                    column.append(round(values[key], 4))

    def snapshot(self, workers: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """What ``/dashboard.json`` answers: per pipeline, the stages over the last
        :data:`WINDOW` seconds with the verdict, the history for the charts, and what
        each worker is doing now (``workers``: pipeline → ``/workers`` rows, if known)."""
        pipelines: list[dict[str, Any]] = []
        if len(self._samples) >= 2:
            latest = self._samples[-1]
            earlier = next(
                (s for s in reversed(self._samples) if latest.t - s.t >= WINDOW - 1e-9),
                self._samples[0],
            )
            views = views_from_scrapes(
                earlier.scrape,
                latest.scrape,
                latest.t - earlier.t,
                "dashboard",
                structures=self.structures,
            )
            for view in views:
                d = view.to_dict()
                marks = view.marks()
                for s in d["stages"]:
                    s["mark"] = marks.get(s["name"])
                h = self._history.get(view.pipeline, {"t": [], "stages": {}})
                d["history"] = {
                    "t": list(h["t"]),
                    "stages": {
                        n: {k: list(v) for k, v in c.items()} for n, c in h["stages"].items()
                    },
                }
                d["workers"] = list((workers or {}).get(view.pipeline, []))
                pipelines.append(d)
        elapsed = self._samples[-1].t - self._samples[0].t if self._samples else 0.0
        return json_safe(  # type: ignore[no-any-return]
            {
                "window": WINDOW,
                "uptime": elapsed,
                "charts": [{"key": k, "title": title} for k, title in CHARTS],
                "pipelines": pipelines,
            }
        )


def render_dashboard(snapshot: Mapping[str, Any], *, poll: str | None = "dashboard.json") -> str:
    """The page: draws ``snapshot`` at once, then (with ``poll``) fetches a new one from
    that URL every second. Without ``poll`` the page reloads itself every few seconds
    instead (a file that ``pipeflow graph URL --watch -o page.html`` rewrites)."""
    data = json.dumps(snapshot, ensure_ascii=False).replace("</", "<\\/")
    refresh = "" if poll else '<meta http-equiv="refresh" content="2">'
    config = json.dumps({"poll": poll})
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>pipeflow · live</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"{refresh}<style>{_CSS}</style></head><body>\n"
        '<header><h1 id="title">pipeflow · live</h1><p id="status" class="sub"></p></header>\n'
        '<main id="pipelines"></main>\n'
        f'<script type="application/json" id="initial">{data}</script>\n'
        f'<script type="application/json" id="config">{html.escape(config, quote=False)}</script>\n'
        f"<script>{_JS}</script>\n</body></html>\n"
    )


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:1.5rem;
color:#212121;max-width:1280px}h1{font-size:1.35rem;margin:0 0 .2rem}h2{font-size:1.1rem;
margin:1.6rem 0 .5rem}.sub{color:#616161;margin:0 0 1rem}.verdict{background:#ffebee;
border-left:4px solid #c62828;padding:.5rem 1rem;margin:.8rem 0}.verdict.source,.verdict.reader{
background:#e3f2fd;border-color:#1565c0}.verdict.rate_limit,.verdict.breaker{background:#fff3e0;
border-color:#ef6c00}.verdict ul{margin:.3rem 0;padding-left:1.2rem}.verdict li{margin:.2rem 0}
table{border-collapse:collapse;font-size:.9rem;margin:.6rem 0}th,td{padding:.3rem .7rem;
text-align:right;border-bottom:1px solid #e0e0e0}th:first-child,td:first-child{text-align:left}
tr.limit td{color:#c62828;font-weight:600}.charts{display:grid;grid-template-columns:
repeat(auto-fill,minmax(380px,1fr));gap:1rem}figure{margin:0}figcaption{font-size:.85rem;
color:#424242}.legend{font-size:.8rem;color:#424242}.legend span{margin-right:.8rem}
.legend i{display:inline-block;width:.8rem;height:.25rem;margin-right:.3rem;vertical-align:middle}
.ended{color:#c62828}svg text{font-family:inherit}h3{font-size:1rem;margin:1rem 0 .3rem}
.verdict.stall{background:#fce4ec;border-color:#ad1457;font-weight:600}
tr.stalled td{color:#ad1457;font-weight:600}table.workers td{text-align:left}
"""

_JS = r"""
(function () {
  "use strict";
  var COLORS = ["#1565c0", "#c62828", "#2e7d32", "#ef6c00", "#6a1b9a", "#00838f", "#ad1457",
                "#4e342e"];
  var NS = "http://www.w3.org/2000/svg";
  var config = JSON.parse(document.getElementById("config").textContent);
  var last = Date.now();

  function el(tag, attrs, text) {
    var e = tag.indexOf("svg:") === 0 ? document.createElementNS(NS, tag.slice(4))
                                      : document.createElement(tag);
    for (var k in attrs || {}) { e.setAttribute(k, attrs[k]); }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    return e;
  }
  function rate(x) {
    if (x === null || x === undefined) { return "-"; }
    if (x >= 1000) { return Math.round(x).toLocaleString("en") + "/s"; }
    if (x >= 100) { return x.toFixed(0) + "/s"; }
    if (x >= 10) { return x.toFixed(1) + "/s"; }
    return x.toFixed(2) + "/s";
  }
  function pct(x) { return (x === null || x === undefined) ? "-" : Math.round(x * 100) + "%"; }
  function num(x, d) { return (x === null || x === undefined) ? "-" : x.toFixed(d); }

  function graph(p) {
    var stages = p.stages, bw = 170, bh = 86, gap = 70, pad = 16, end = 64;
    var width = pad * 2 + end * 2 + stages.length * bw + (stages.length + 1) * gap;
    var svg = el("svg:svg", {viewBox: "0 0 " + width + " " + (bh + 56), width: "100%",
                             role: "img", "aria-label": "stage graph", "class": "graph"});
    var defs = el("svg:defs");
    var marker = el("svg:marker", {id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5,
                                   markerWidth: 8, markerHeight: 8, orient: "auto"});
    marker.appendChild(el("svg:path", {d: "M0,0 L10,5 L0,10 z", fill: "#616161"}));
    defs.appendChild(marker); svg.appendChild(defs);
    var cy = 30 + bh / 2, x = pad;
    svg.appendChild(el("svg:text", {x: x + end / 2, y: cy + 5, "text-anchor": "middle",
                                    "font-size": 13, fill: "#424242"}, "source"));
    x += end;
    function edge(label) {
      svg.appendChild(el("svg:line", {x1: x + 4, y1: cy, x2: x + gap - 4, y2: cy,
                                      stroke: "#616161", "stroke-width": 1.5,
                                      "marker-end": "url(#arrow)"}));
      if (label) {
        svg.appendChild(el("svg:text", {x: x + gap / 2, y: cy - 7, "text-anchor": "middle",
                                        "font-size": 11, fill: "#1565c0"}, label));
      }
      x += gap;
    }
    stages.forEach(function (s) {
      edge(rate(s.rate_in));
      var marked = !!s.mark, top = cy - bh / 2;
      var g = el("svg:g", {"class": "stage" + (marked ? " limit" : ""), "data-stage": s.name});
      g.appendChild(el("svg:rect", {x: x, y: top, width: bw, height: bh, rx: 8,
                                    fill: marked ? "#ffebee" : "#eceff1",
                                    stroke: marked ? "#c62828" : "#546e7a",
                                    "stroke-width": marked ? 3 : 1.5}));
      var n = Math.round(s.workers_now || 0);
      var lines = [s.name, n + (n === 1 ? " worker" : " workers") + " · util " + pct(s.utilisation),
                   rate(s.throughput) + " · queue " + num(s.queue_depth, 0)];
      lines.forEach(function (t, i) {
        g.appendChild(el("svg:text", {x: x + bw / 2, y: top + 24 + i * 20, "text-anchor": "middle",
                                      "font-size": i ? 12 : 14, "font-weight": i ? 400 : 600,
                                      fill: i ? "#424242" : "#212121"}, t));
      });
      if (marked) {
        g.appendChild(el("svg:text", {x: x + bw / 2, y: top - 8, "text-anchor": "middle",
                                      "font-size": 11, "font-weight": 600, fill: "#c62828"},
                         s.mark));
      }
      svg.appendChild(g);
      x += bw;
    });
    var lastStage = stages[stages.length - 1];
    edge(lastStage ? rate(lastStage.rate_out) : "");
    svg.appendChild(el("svg:text", {x: x + end / 2, y: cy + 5, "text-anchor": "middle",
                                    "font-size": 13, fill: "#424242"}, "outputs"));
    return svg;
  }

  function table(p) {
    var t = el("table", {"class": "stages"});
    var head = el("tr");
    ["stage", "workers", "items/s", "util", "queue", "busy", "blocked", "throttled",
     "failed"].forEach(function (c) { head.appendChild(el("th", {}, c)); });
    var thead = el("thead"); thead.appendChild(head); t.appendChild(thead);
    var body = el("tbody");
    p.stages.forEach(function (s) {
      var tr = el("tr", {"data-stage": s.name, "class": s.mark ? "limit" : ""});
      var blocked = (s.blocked_fraction || 0) * (s.workers_now || 0);
      var throttled = s.seconds ? (s.throttled_seconds || 0) / s.seconds : 0;
      [s.name, num(s.workers_now, 0), rate(s.throughput), pct(s.utilisation),
       num(s.queue_depth, 0), num(s.load, 1), num(blocked, 1), num(throttled, 1),
       s.failed === null ? "-" : s.failed].forEach(function (c) {
        tr.appendChild(el("td", {}, c));
      });
      body.appendChild(tr);
    });
    t.appendChild(body);
    return t;
  }

  function workers(rows) {
    // Stalled first, then the longest in their state; at most 40 rows.
    rows = rows.slice().sort(function (a, b) {
      return (b.stalled - a.stalled) || (b.seconds - a.seconds);
    });
    var wrap = el("div", {"class": "workers"});
    wrap.appendChild(el("h3", {}, "workers now"));
    var t = el("table", {"class": "workers"});
    var head = el("tr");
    ["stage", "worker", "state", "for", "item", ""].forEach(function (c) {
      head.appendChild(el("th", {}, c));
    });
    var thead = el("thead"); thead.appendChild(head); t.appendChild(thead);
    var body = el("tbody");
    rows.slice(0, 40).forEach(function (w) {
      var tr = el("tr", {"data-stage": w.stage, "data-state": w.state,
                         "class": w.stalled ? "stalled" : ""});
      [w.stage, w.worker, w.state, num(w.seconds, 1) + " s", w.item || "",
       w.stalled ? "stalled (stall_after " + num(w.stall_after, 1) + " s)" : ""
      ].forEach(function (c) { tr.appendChild(el("td", {}, c)); });
      body.appendChild(tr);
    });
    t.appendChild(body);
    wrap.appendChild(t);
    if (rows.length > 40) {
      wrap.appendChild(el("p", {"class": "sub"}, "… and " + (rows.length - 40) + " more"));
    }
    return wrap;
  }

  function chart(title, t, columns, names) {
    var w = 380, h = 150, left = 44, right = 8, top = 10, bottom = 24;
    var pw = w - left - right, ph = h - top - bottom, ymax = 0, tmax = 0, tmin = Infinity;
    t.forEach(function (x) { tmax = Math.max(tmax, x); tmin = Math.min(tmin, x); });
    names.forEach(function (n) {
      (columns[n] || []).forEach(function (v) { if (v !== null) { ymax = Math.max(ymax, v); } });
    });
    if (ymax <= 0) { ymax = 1; }
    var scale = Math.pow(10, Math.floor(Math.log10(ymax)));
    ymax = [1, 2, 2.5, 5, 10].map(function (m) { return m * scale; })
             .filter(function (v) { return v >= ymax; })[0];
    if (!isFinite(tmin)) { tmin = 0; }
    var span = Math.max(tmax - tmin, 1);
    var fig = el("figure", {"class": "chart"});
    var svg = el("svg:svg", {viewBox: "0 0 " + w + " " + h, width: "100%", role: "img",
                             "aria-label": title});
    for (var k = 0; k <= 4; k++) {
      var y = top + ph - ph * k / 4;
      svg.appendChild(el("svg:line", {x1: left, y1: y, x2: w - right, y2: y, stroke: "#eee"}));
      svg.appendChild(el("svg:text", {x: left - 5, y: y + 4, "text-anchor": "end",
                                      "font-size": 10, fill: "#757575"},
                         +(ymax * k / 4).toPrecision(3)));
    }
    [tmin, tmax].forEach(function (tt, i) {
      svg.appendChild(el("svg:text", {x: left + (i ? pw : 0), y: h - 6, "font-size": 10,
                                      "text-anchor": i ? "end" : "start", fill: "#757575"},
                         tt.toFixed(0) + " s"));
    });
    names.forEach(function (n, i) {
      var pts = [];
      (columns[n] || []).forEach(function (v, j) {
        if (v === null || j >= t.length) { return; }
        pts.push((left + (t[j] - tmin) / span * pw).toFixed(1) + "," +
                 (top + ph - v / ymax * ph).toFixed(1));
      });
      if (pts.length) {
        svg.appendChild(el("svg:polyline", {fill: "none", stroke: COLORS[i % COLORS.length],
                                            "stroke-width": 1.8, points: pts.join(" "),
                                            "data-stage": n}));
      }
    });
    fig.appendChild(svg);
    fig.appendChild(el("figcaption", {}, title));
    return fig;
  }

  function draw(snap) {
    var main = document.getElementById("pipelines");
    main.textContent = "";
    var names = snap.pipelines.map(function (p) { return p.pipeline; });
    document.getElementById("title").textContent =
      "pipeflow · " + (names.length ? names.join(", ") : "live");
    document.title = "pipeflow · " + (names.length ? names.join(", ") : "live");
    if (!snap.pipelines.length) {
      main.appendChild(el("p", {"class": "sub"}, "Waiting for the first figures…"));
    }
    snap.pipelines.forEach(function (p) {
      var sec = el("section", {"class": "pipeline", "data-pipeline": p.pipeline});
      sec.appendChild(el("h2", {}, p.pipeline));
      var v = p.verdict;
      (v && v.stalls ? v.stalls : []).forEach(function (line) {
        sec.appendChild(el("div", {"class": "verdict stall", "data-kind": "stall"}, line));
      });
      if (v && v.kind !== "none") {
        var box = el("div", {id: "verdict", "class": "verdict " + v.kind, "data-kind": v.kind,
                             "data-stage": v.stage || ""});
        box.appendChild(el("strong", {"class": "headline"}, v.headline));
        var items = v.advice.slice();
        if (v.assumptions.length) { items.push("assuming " + v.assumptions.join("; ") + "."); }
        if (items.length) {
          var ul = el("ul");
          items.forEach(function (a) { ul.appendChild(el("li", {}, a)); });
          box.appendChild(ul);
        }
        sec.appendChild(box);
      }
      sec.appendChild(graph(p));
      sec.appendChild(table(p));
      if (p.workers && p.workers.length) { sec.appendChild(workers(p.workers)); }
      var stages = p.stages.map(function (s) { return s.name; });
      var legend = el("p", {"class": "legend"});
      stages.forEach(function (n, i) {
        var span = el("span");
        span.appendChild(el("i", {style: "background:" + COLORS[i % COLORS.length]}));
        span.appendChild(document.createTextNode(n));
        legend.appendChild(span);
      });
      sec.appendChild(legend);
      var charts = el("div", {"class": "charts"});
      snap.charts.forEach(function (c) {
        var cols = {};
        stages.forEach(function (n) {
          cols[n] = ((p.history.stages[n] || {})[c.key]) || [];
        });
        charts.appendChild(chart(c.title, p.history.t, cols, stages));
      });
      sec.appendChild(charts);
      main.appendChild(sec);
    });
    var status = document.getElementById("status");
    status.className = "sub";
    status.textContent = "live · figures over the last " + snap.window + " s · updated " +
      new Date().toLocaleTimeString() + " · " + Math.round(snap.uptime) + " s of history";
  }

  function poll() {
    fetch(config.poll, {cache: "no-store"}).then(function (r) {
      if (!r.ok) { throw new Error("HTTP " + r.status); }
      return r.json();
    }).then(function (snap) {
      last = Date.now();
      draw(snap);
    }).catch(function () {
      var status = document.getElementById("status");
      status.className = "sub ended";
      status.textContent = "no answer from the endpoint since " +
        new Date(last).toLocaleTimeString() + ": the run has ended (figures as they were)";
    });
  }

  draw(JSON.parse(document.getElementById("initial").textContent));
  if (config.poll) { setInterval(poll, 1000); }
})();
"""
