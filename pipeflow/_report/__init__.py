"""Run reports and pictures of a pipeline.

One picture, three origins, five renderings. A :class:`GraphView` (``view.py``)
describes a pipeline's stages in order, with what is known about each:

- from a :class:`~pipeflow.Pipeline` (:func:`view_from_pipeline`): the structure only —
  workers, buffers and options;
- from a saved run report (:func:`view_from_report`; the schema is in ``schema.py``):
  measured throughput, utilisation, p99, time blocked downstream, the bottleneck and a
  Little's Law sizing;
- from two scrapes of a live metrics endpoint (:func:`views_from_scrapes`, in
  ``scrape.py``): the same figures over the interval between the scrapes.

It renders (``render.py``) as a terminal drawing (``text.py``), JSON, Graphviz DOT
(``dot.py``), Mermaid (``mermaid.py``), or a self-contained HTML page with inline SVG
(``htmlpage.py``). The arithmetic is :mod:`pipeflow.sizing`'s.
"""

from .format import TIMES as TIMES
from .format import fmt_count as fmt_count
from .format import fmt_duration as fmt_duration
from .format import fmt_pct as fmt_pct
from .format import fmt_rate as fmt_rate
from .format import json_safe as json_safe
from .format import options_text as options_text
from .format import workers_text as workers_text
from .htmlpage import render_html as render_html
from .htmlpage import render_html_page as render_html_page
from .htmlpage import svg_chart as svg_chart
from .render import render as render
from .render import render_json as render_json
from .render import render_many as render_many
from .schema import REPORT_FORMAT as REPORT_FORMAT
from .schema import REPORT_VERSION as REPORT_VERSION
from .schema import ReportError as ReportError
from .schema import Series as Series
from .schema import build_report as build_report
from .schema import describe_pipeline as describe_pipeline
from .schema import describe_stage as describe_stage
from .schema import load_report as load_report
from .schema import result_dict_from_stats as result_dict_from_stats
from .scrape import Scrape as Scrape
from .scrape import StageSample as StageSample
from .scrape import parse_exposition as parse_exposition
from .scrape import views_from_scrapes as views_from_scrapes
from .text import render_text as render_text
from .view import GraphView as GraphView
from .view import StageView as StageView
from .view import view_from_pipeline as view_from_pipeline
from .view import view_from_report as view_from_report
