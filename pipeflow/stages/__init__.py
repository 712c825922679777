"""Built-in stages: the ones users would otherwise write by hand.

- :class:`HttpFetch` — fetch URLs with httpx (``pip install 'pipeflow-trio[http]'``);
- :class:`SQLiteSink` — batched, transactional inserts into SQLite;
- :class:`JsonLinesSink` — one line of JSON per item, appended to a file.

Each is a class-based stage (a :class:`pipeflow.Stage` subclass) published under the
entry-point group ``pipeflow.stages``, like any third-party plugin::

    from pipeflow.stages import HttpFetch, SQLiteSink

    Pipeline(HttpFetch(workers=64, rate=50) | parse | SQLiteSink("p.db", "pages", cols)).run(urls)
"""

from .http import HttpFetch as HttpFetch
from .http import HttpResult as HttpResult
from .http import HttpServerError as HttpServerError
from .http import HttpStatusError as HttpStatusError
from .jsonl import JsonLinesSink as JsonLinesSink
from .sqlite import Row as Row
from .sqlite import SQLiteSink as SQLiteSink

__all__ = [
    "HttpFetch",
    "HttpResult",
    "HttpStatusError",
    "HttpServerError",
    "SQLiteSink",
    "Row",
    "JsonLinesSink",
]
