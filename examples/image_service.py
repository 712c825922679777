"""Image processor behind HTTP (from the Go worker-pool guide): 202 or 429, then poll.

Run the service::

    python examples/image_service.py                     # http://127.0.0.1:8000
    python examples/image_service.py --port 9000 --workers 4 --queue 100

and use it::

    curl -si -X POST --data-binary @photo.png 'http://127.0.0.1:8000/jobs?size=128'
    # HTTP/1.1 202 ... {"id": "3f2a...", "status": "queued", "status_url": "/status/3f2a..."}
    curl -s http://127.0.0.1:8000/status/3f2a...        # {"status": "done", ...}
    curl -s http://127.0.0.1:8000/result/3f2a... > thumb.png

or let it run a demo against itself (a free port, a client that posts until it is told
429, then polls every accepted job until it is done)::

    python examples/image_service.py --demo

``POST /jobs`` answers 202 with a job id at once, or 429 when the pipeline's entry is
full (``flow.send_nowait`` raises ``PipelineFull``: the reject strategy, right for an
HTTP API); ``size=`` (the thumbnail's longest side, 128 by default) must be a whole
number from 1 to 4096, else 400. The resize is CPU-bound, so it runs in worker processes
(``run_in="process"``, one per CPU) with a per-job timeout; a job that takes longer is
killed with its worker process, and its status says so. With Pillow installed any image
format is accepted and the thumbnail is a PNG; without it, the service takes binary PPM
(P6) images and resizes them in pure Python.

The HTTP server is hypercorn on Trio with a raw ASGI app (no asyncio framework):
``pip install 'hypercorn[trio]' httpx`` (and optionally ``pillow``).
"""

from __future__ import annotations

import argparse
import collections
import functools
import io
import json
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

import attrs
import trio

from pipeflow import Failed, Flow, Pipeline, PipelineFull, Stage, stage

# -- the CPU-bound part: module-level functions, so worker processes can import them --------


@attrs.frozen
class Job:
    id: str
    data: bytes = attrs.field(repr=False)
    size: int


@attrs.frozen
class Thumbnail:
    id: str
    data: bytes = attrs.field(repr=False)
    content_type: str
    width: int
    height: int
    seconds: float


def read_ppm(data: bytes) -> tuple[int, int, bytes]:
    """Width, height and RGB bytes of a binary PPM (P6) image with 8-bit samples."""
    m = re.match(rb"P6\s+(?:#[^\n]*\s+)*(\d+)\s+(\d+)\s+(\d+)\s", data)
    if m is None or int(m.group(3)) != 255:
        raise ValueError("not a binary PPM (P6) image with 8-bit samples")
    width, height = int(m.group(1)), int(m.group(2))
    pixels = data[m.end() : m.end() + 3 * width * height]
    if len(pixels) != 3 * width * height:
        raise ValueError(f"PPM image truncated: {len(pixels)} of {3 * width * height} bytes")
    return width, height, pixels


def make_ppm(width: int, height: int, pixels: bytes) -> bytes:
    return b"P6\n%d %d\n255\n" % (width, height) + pixels


def fit(width: int, height: int, size: int) -> tuple[int, int]:
    """The size of a thumbnail of at most ``size`` x ``size``, aspect kept."""
    scale = min(size / width, size / height, 1.0)
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_ppm(data: bytes, size: int) -> tuple[bytes, int, int]:
    """Pure-Python box-filter downscale of a PPM image: no dependency, just slower."""
    width, height, pixels = read_ppm(data)
    w, h = fit(width, height, size)
    out = bytearray()
    for y in range(h):
        y0, y1 = y * height // h, max((y + 1) * height // h, y * height // h + 1)
        for x in range(w):
            x0, x1 = x * width // w, max((x + 1) * width // w, x * width // w + 1)
            r = g = b = 0
            for yy in range(y0, y1):
                row = yy * width
                for xx in range(x0, x1):
                    i = 3 * (row + xx)
                    r += pixels[i]
                    g += pixels[i + 1]
                    b += pixels[i + 2]
            n = (y1 - y0) * (x1 - x0)
            out += bytes((r // n, g // n, b // n))
    return make_ppm(w, h, bytes(out)), w, h


def resize(job: Job) -> Thumbnail:
    """Make the thumbnail of one job (runs in a worker process)."""
    t0 = time.perf_counter()
    try:
        from PIL import Image
    except ImportError:
        data, w, h = resize_ppm(job.data, job.size)
        content_type = "image/x-portable-pixmap"
    else:
        with Image.open(io.BytesIO(job.data)) as img:
            img.thumbnail((job.size, job.size))
            w, h = img.size
            buf = io.BytesIO()
            img.save(buf, format="PNG")
        data, content_type = buf.getvalue(), "image/png"
    return Thumbnail(job.id, data, content_type, w, h, time.perf_counter() - t0)


# -- the job table and the pipeline --------------------------------------------------------

Status = dict[str, Any]


class Jobs:
    """What the service knows about each job: the latest ``keep`` jobs, oldest forgotten."""

    def __init__(self, keep: int = 10_000) -> None:
        self.keep = keep
        self.status: MutableMapping[str, Status] = collections.OrderedDict()
        self.results: dict[str, Thumbnail] = {}

    def add(self, job_id: str) -> None:
        self.status[job_id] = {"id": job_id, "status": "queued"}
        while len(self.status) > self.keep:
            old, _ = self.status.popitem(last=False)  # type: ignore[call-arg]
            self.results.pop(old, None)

    def forget(self, job_id: str) -> None:
        self.status.pop(job_id, None)


class Record(Stage[Thumbnail, None]):
    """The last stage: write each finished job into the job table. Its :meth:`failed`
    is the resize stage's dead-letter sink, so failed jobs are recorded too."""

    def __init__(self, jobs: Jobs) -> None:
        super().__init__(name="record")
        self.jobs = jobs

    async def process(self, item: Thumbnail) -> None:
        self.jobs.results[item.id] = item
        self._set(
            item.id,
            {"status": "done", "width": item.width, "height": item.height, "seconds": item.seconds},
        )

    def failed(self, failure: Failed[Job]) -> None:
        error = failure.error
        reason = "timed out" if isinstance(error, TimeoutError) else repr(error)
        self._set(failure.item.id, {"status": "failed", "error": reason})

    def _set(self, job_id: str, fields: Status) -> None:
        if job_id in self.jobs.status:
            self.jobs.status[job_id].update(fields)


def build_pipeline(
    jobs: Jobs, *, workers: int, queue: int, job_timeout: float
) -> Pipeline[Job, None]:
    record = Record(jobs)
    resizer = stage(
        name="resize",
        run_in="process",  # CPU-bound: one worker process per CPU
        workers=workers,
        buffer=queue,  # the bounded queue: past it, POST /jobs answers 429
        timeout=job_timeout,  # a hung resize is killed, its worker replaced
        errors="skip",  # a failed job does not stop the service ...
        dead_letter=record.failed,  # ... and its status says why
    )(resize)
    return Pipeline(resizer | record, name="image_service")


# -- the HTTP side: a raw ASGI app -----------------------------------------------------

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class App:
    """``POST /jobs`` (202 or 429), ``GET /status/{id}``, ``GET /result/{id}``."""

    def __init__(self, flow: Flow[Job, None], jobs: Jobs, *, max_bytes: int = 20_000_000):
        self.flow = flow
        self.jobs = jobs
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if method == "POST" and path == "/jobs":
            await self.post_job(scope, receive, send)
        elif method == "GET" and path.startswith("/status/"):
            status = self.jobs.status.get(path.removeprefix("/status/"))
            if status is None:
                await respond(send, 404, {"error": "no such job"})
            else:
                await respond(send, 200, status)
        elif method == "GET" and path.startswith("/result/"):
            thumb = self.jobs.results.get(path.removeprefix("/result/"))
            if thumb is None:
                await respond(send, 404, {"error": "no result for this job (yet)"})
            else:
                await respond_bytes(send, 200, thumb.data, thumb.content_type)
        else:
            await respond(send, 404, {"error": f"no route for {method} {path}"})

    async def post_job(self, scope: Scope, receive: Receive, send: Send) -> None:
        query = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
        size = parse_size(query.get("size"))
        if isinstance(size, str):  # a bad size= is refused before the body is read
            await respond(send, 400, {"error": size})
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await respond(send, 413, {"error": f"image over {self.max_bytes} bytes"})
                return
            if not message.get("more_body", False):
                break
        job = Job(uuid.uuid4().hex, bytes(body), size)
        self.jobs.add(job.id)
        try:
            self.flow.send_nowait(job)
        except PipelineFull:
            # The reject strategy: say so at once; the client retries later.
            self.jobs.forget(job.id)
            await respond(send, 429, {"error": "too many jobs queued; retry later"}, retry=1)
            return
        status_url = f"/status/{job.id}"
        await respond(send, 202, {**self.jobs.status[job.id], "status_url": status_url})


#: The largest thumbnail side ``size=`` may ask for, in pixels.
MAX_SIZE = 4096


def parse_size(text: str | None) -> int | str:
    """``size=`` as pixels (128 when absent), or the error to answer with 400."""
    if text is None:
        return 128
    if not (text.isascii() and text.isdigit() and len(text) <= 5 and 1 <= int(text) <= MAX_SIZE):
        return f"size must be a whole number of pixels from 1 to {MAX_SIZE}, got {text!r}"
    return int(text)


async def respond(send: Send, status: int, payload: Any, *, retry: int | None = None) -> None:
    extra = [(b"retry-after", str(retry).encode())] if retry is not None else []
    await respond_bytes(send, status, json.dumps(payload).encode(), "application/json", extra)


async def respond_bytes(
    send: Send,
    status: int,
    body: bytes,
    content_type: str,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", b"%d" % len(body))]
    await send(
        {"type": "http.response.start", "status": status, "headers": headers + (extra or [])}
    )
    await send({"type": "http.response.body", "body": body})


# -- running it ------------------------------------------------------------------------


async def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int | None = None,
    queue: int = 1000,
    job_timeout: float = 30.0,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the service until cancelled; ``task_status.started`` gets its base URL."""
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    jobs = Jobs()
    pipeline = build_pipeline(
        jobs, workers=workers or os.cpu_count() or 1, queue=queue, job_timeout=job_timeout
    )
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None
    async with pipeline.open() as flow, trio.open_nursery() as nursery:
        binds = await nursery.start(functools.partial(hypercorn_serve, App(flow, jobs), config))
        task_status.started(binds[0])


async def demo_client(base: str, image: bytes, *, max_posts: int = 400) -> dict[str, Any]:
    """Post jobs in bursts of 8 until the service answers 429, then poll every accepted
    job until it is done or failed. Returns what happened."""
    import httpx

    accepted: list[str] = []
    rejected = 0
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:

        async def post() -> None:
            nonlocal rejected
            r = await client.post("/jobs?size=32", content=image)
            if r.status_code == 202:
                accepted.append(r.json()["id"])
            elif r.status_code == 429:
                rejected += 1
            else:
                r.raise_for_status()

        posts = 0
        while not rejected and posts < max_posts:
            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(post)
            posts += 8
        statuses: dict[str, Status] = {}
        with trio.fail_after(60):
            for job_id in accepted:
                while True:
                    status = (await client.get(f"/status/{job_id}")).json()
                    if status["status"] != "queued":
                        statuses[job_id] = status
                        break
                    await trio.sleep(0.02)
    done = sum(1 for s in statuses.values() if s["status"] == "done")
    return {"posted": posts, "accepted": len(accepted), "rejected": rejected, "done": done}


def sample_image(width: int = 96, height: int = 64) -> bytes:
    """A gradient as a binary PPM image (Pillow reads PPM too)."""
    pixels = bytes(
        v
        for y in range(height)
        for x in range(width)
        for v in (x * 255 // width, y * 255 // height, 128)
    )
    return make_ppm(width, height, pixels)


async def demo(workers: int, queue: int, job_timeout: float) -> dict[str, Any]:
    async with trio.open_nursery() as nursery:
        base = await nursery.start(
            functools.partial(serve, port=0, workers=workers, queue=queue, job_timeout=job_timeout)
        )
        print(f"service on {base}")
        summary = await demo_client(base, sample_image())
        nursery.cancel_scope.cancel()
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Serve until Ctrl+C; with ``--demo``, run the demo and return its summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--queue", type=int, default=1000, help="jobs queued before 429")
    parser.add_argument("--job-timeout", type=float, default=30.0, help="seconds per job")
    parser.add_argument("--demo", action="store_true", help="serve on a free port and try it")
    args = parser.parse_args(argv)
    if args.demo:
        summary = trio.run(demo, args.workers, min(args.queue, 4), args.job_timeout)
        print(
            f"posted {summary['posted']}: {summary['accepted']} accepted (202), "
            f"{summary['rejected']} rejected (429); {summary['done']} thumbnails done"
        )
        return summary
    serve_it = functools.partial(
        serve,
        host=args.host,
        port=args.port,
        workers=args.workers,
        queue=args.queue,
        job_timeout=args.job_timeout,
    )

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            base = await nursery.start(serve_it)
            print(f"serving on {base} (Ctrl+C to stop)")

    try:
        trio.run(run)
    except* KeyboardInterrupt:  # Ctrl+C: every task, thread and worker process is stopped
        print("stopped")
    return None


# The guard matters: worker processes import this module to find resize(), and must not
# start a server when they do.
if __name__ == "__main__":
    main()
