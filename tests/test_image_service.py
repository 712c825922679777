"""examples/image_service.py as a client that sends a bad ``size=``: refused with 400
and a reason, never queued as a job."""

from __future__ import annotations

import functools

import pytest
import trio

from tests.test_examples import load, needs


@pytest.mark.parametrize("size", ["abc", "-5", "0", "4097", "99999999", "", "1.5", "٣"])
async def test_a_bad_size_is_refused_with_400(nursery: trio.Nursery, size: str) -> None:
    """size= must be a whole number of pixels from 1 to 4096: anything else is a 400
    naming the value (it was accepted with 202, then clamped or failed)."""
    needs("httpx", "hypercorn")
    import httpx

    image_service = load("image_service")
    serve = functools.partial(image_service.serve, port=0, workers=1, queue=2, job_timeout=30)
    base = await nursery.start(serve)
    image = image_service.sample_image(16, 16)
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        r = await client.post(f"/jobs?size={size}", content=image)
        assert 400 == r.status_code
        expected = f"size must be a whole number of pixels from 1 to 4096, got {size!r}"
        assert {"error": expected} == r.json()
        ok = await client.post("/jobs?size=4096", content=image)
        assert 202 == ok.status_code
