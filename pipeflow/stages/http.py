"""``HttpFetch``: fetch URLs with httpx, one client per worker, retries and a rate limit.

httpx runs on Trio through anyio, so a fetch is a plain Trio task: cancellation, the
stage's timeout and the run's cancel scope all reach the request in flight. httpx is
imported when the stage is built (``pip install 'pipeflow-trio[http]'``), not when this module
is, so ``pipeflow plugins`` can list the stage on a machine without httpx.
"""

from __future__ import annotations

import functools
import json as _json
import ssl
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .._options import ErrorPolicy
from .._policies import CircuitBreaker, Retry
from .._stage import Stage

if TYPE_CHECKING:
    import httpx

__all__ = ["HttpFetch", "HttpResult", "HttpServerError", "HttpStatusError"]

#: What a request item may hold besides ``url`` (the keyword arguments of
#: ``httpx.AsyncClient.request`` that make sense per item).
REQUEST_KEYS = frozenset({"url", "method", "headers", "params", "json", "content", "data"})


@attrs.frozen(kw_only=True)
class HttpResult:
    """One fetched response: plain data, so it crosses threads and processes.

    ``url`` is the URL that was asked for (so results join back to their inputs),
    ``final_url`` where redirects ended, ``status`` the HTTP status, ``headers`` the
    response headers (lower-case names; repeated headers joined with ``", "``),
    ``content`` the body, ``elapsed`` seconds on Trio's clock for the last attempt.
    """

    url: str
    final_url: str
    status: int
    headers: Mapping[str, str]
    content: bytes = attrs.field(repr=lambda c: f"<{len(c)} bytes>")
    encoding: str = "utf-8"
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        """True for a status below 400."""
        return self.status < 400

    @property
    def text(self) -> str:
        """The body decoded with the response's charset (UTF-8 if it names none)."""
        return self.content.decode(self.encoding, errors="replace")

    def json(self) -> Any:
        """The body parsed as JSON."""
        return _json.loads(self.content)


class HttpStatusError(Exception):
    """The server answered with an error status (400 or above).

    ``url`` is the URL asked for, ``status`` the status, ``result`` the whole response
    as an :class:`HttpResult` (its body often says why).
    """

    def __init__(self, result: HttpResult) -> None:
        self.result = result
        self.url = result.url
        self.status = result.status
        super().__init__(f"HTTP {result.status} from {result.url}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.result,))


class HttpServerError(HttpStatusError):
    """A 5xx answer: the server failed, so the request is worth another attempt."""


class HttpFetch(Stage[str | Mapping[str, Any], HttpResult]):
    """Fetch URLs over HTTP with httpx: one client per worker, retries, a rate limit.

    Items are URLs (``str``) or request mappings with ``url`` and any of ``method``,
    ``headers``, ``params``, ``json``, ``content``, ``data``. Each output is an
    :class:`HttpResult`. ``timeout`` bounds each attempt as a whole (connect, send,
    wait, read), on Trio's clock. Transport errors (connection refused or reset,
    protocol errors), timeouts and 5xx answers are retried ``retries`` times with
    exponential backoff; any other status of 400 or above fails the item at once with
    :class:`HttpStatusError` (unless ``raise_for_status=False``, which returns it as a
    result). ``rate`` caps requests per second across all workers::

        fetch = HttpFetch(workers=64, rate=50, timeout=10, errors="collect")
        Pipeline(fetch | parse | store).run(urls)

    Each worker opens one ``httpx.AsyncClient`` (so connections are reused) and closes
    it when it leaves, on every exit path; ``headers`` are sent with every request and
    ``client_options`` go to ``httpx.AsyncClient`` as they are.
    """

    def __init__(
        self,
        *,
        workers: int | tuple[int, int] = 8,
        timeout: float | None = 10.0,
        retries: int | Retry = 2,
        backoff: float = 0.5,
        rate: float | None = None,
        burst: int | None = None,
        headers: Mapping[str, str] | None = None,
        follow_redirects: bool = True,
        raise_for_status: bool = True,
        client_options: Mapping[str, Any] | None = None,
        name: str | None = None,
        buffer: int | None = None,
        ordered: bool = False,
        key: Callable[[Any], Any] | None = None,
        errors: ErrorPolicy = "fail_fast",
        max_failures: int | float | None = None,
        breaker: CircuitBreaker | None = None,
        dead_letter: Callable[[Any], Any] | Stage[Any, Any] | None = None,
    ) -> None:
        hx = _import_httpx()
        retry: int | Retry = retries
        if isinstance(retries, int) and not isinstance(retries, bool) and retries > 0:
            retry = Retry(attempts=retries, backoff=backoff, on=_retryable_errors(hx))
        super().__init__(
            workers=workers,
            buffer=buffer,
            name=name,
            ordered=ordered,
            key=key,
            timeout=timeout,
            retries=retry,
            errors=errors,
            max_failures=max_failures,
            rate=rate,
            burst=burst,
            breaker=breaker,
            dead_letter=dead_letter,
        )
        self.headers = dict(headers or {})
        self.follow_redirects = follow_redirects
        self.raise_for_status = raise_for_status
        self.client_options = dict(client_options or {})
        self._ssl_context: ssl.SSLContext | None = None
        self._ssl_lock = trio.Lock()

    async def open_worker(self) -> httpx.AsyncClient:
        """One client per worker: its connection pool lives as long as the worker."""
        hx = _import_httpx()
        options: dict[str, Any] = {
            "headers": self.headers,
            "follow_redirects": self.follow_redirects,
            # The stage's timeout bounds each attempt as a whole; httpx's own timeouts
            # are per phase (a server trickling bytes would never trip them).
            "timeout": None,
        }
        options.update(self.client_options)
        if options.get("verify", True) is True and "cert" not in options:
            # httpx builds an SSL context per client (~70 ms of CPU, loading the CA
            # bundle): build one per stage, in a thread, and share it between workers.
            async with self._ssl_lock:
                if self._ssl_context is None:
                    trust_env = bool(options.get("trust_env", True))
                    self._ssl_context = await trio.to_thread.run_sync(
                        functools.partial(hx.create_ssl_context, trust_env=trust_env)
                    )
            options["verify"] = self._ssl_context
        client: httpx.AsyncClient = hx.AsyncClient(**options)
        return client

    async def close_worker(self, resource: httpx.AsyncClient) -> None:
        await resource.aclose()

    # The resource variant of process(): the runner passes what open_worker() returned.
    async def process(  # type: ignore[override]
        self, item: str | Mapping[str, Any], client: httpx.AsyncClient
    ) -> HttpResult:
        """Fetch one URL (or request mapping) with this worker's client."""
        request = _request_args(item, self.name)
        url = str(request["url"])
        method = str(request.pop("method", "GET")).upper()
        t0 = trio.current_time()
        response = await client.request(method, **request)
        result = HttpResult(
            url=url,
            final_url=str(response.url),
            status=response.status_code,
            headers=dict(response.headers),
            content=response.content,
            encoding=response.charset_encoding or "utf-8",
            elapsed=trio.current_time() - t0,
        )
        if result.status >= 500:
            raise HttpServerError(result)
        if result.status >= 400 and self.raise_for_status:
            raise HttpStatusError(result)
        return result


def _retryable_errors(hx: Any) -> tuple[type[Exception], ...]:
    """What :class:`HttpFetch` retries: network and protocol errors, timeouts, 5xx.

    Not retried: a URL httpx cannot handle (``httpx.UnsupportedProtocol``), proxy
    misconfiguration, and 4xx answers; another attempt would fail the same way.
    """
    return (
        hx.NetworkError,
        hx.TimeoutException,
        hx.ProtocolError,
        TimeoutError,
        HttpServerError,
    )


def _request_args(item: object, stage: str) -> dict[str, Any]:
    if isinstance(item, str):
        return {"url": item}
    if isinstance(item, Mapping):
        unknown = set(item) - REQUEST_KEYS
        if "url" not in item or unknown:
            problem = f"unknown keys {sorted(map(str, unknown))}" if unknown else "no 'url'"
            msg = (
                f"stage {stage!r}: a request mapping needs 'url' and may have "
                f"{sorted(REQUEST_KEYS - {'url'})}; got {problem}"
            )
            raise ValueError(msg)
        return dict(item)
    msg = f"stage {stage!r}: an item must be a URL (str) or a request mapping, got {item!r}"
    raise TypeError(msg)


def _import_httpx() -> Any:
    try:
        import httpx
    except ImportError as exc:  # pragma: no cover - depends on the installation
        msg = "HttpFetch needs httpx; install it with: pip install 'pipeflow-trio[http]'"
        raise ImportError(msg) from exc
    return httpx
