"""Helpers for the runtime-control tests: admin requests with a token, JSON answers."""

from __future__ import annotations

import json
from typing import Any

import trio

from tests.support import RawClient, raw_http, status_of

TOKEN = "s3cret-token-for-the-tests-0123456789"


async def admin_call(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = TOKEN,
    raw_body: bytes | None = None,
    host: str = "127.0.0.1",
) -> tuple[int, Any, bytes]:
    """(status, JSON document or None, the whole response) of one admin request."""
    data = raw_body if raw_body is not None else (json.dumps(body).encode() if body is not None else b"")
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close", f"Content-Length: {len(data)}"]
    if data:
        head.append("Content-Type: application/json")
    if token is not None:
        head.append(f"Authorization: Bearer {token}")
    answer = await raw_http(port, ("\r\n".join(head) + "\r\n\r\n").encode() + data)
    payload = answer.partition(b"\r\n\r\n")[2]
    try:
        doc = json.loads(payload) if payload.strip() else None
    except ValueError:
        doc = None
    return status_of(answer), doc, answer


def metric_value(exposition: bytes, line_start: str) -> float | None:
    for line in exposition.decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


async def closes_with_times(clients: list[RawClient], start: float, timeout: float = 5.0) -> list[tuple[Any, float]]:
    """Each client's close frame and when it arrived (seconds after `start`), every client
    watched at once, so a close is timed when it arrives, not when the test gets to it."""
    got: list[tuple[Any, float]] = [(None, 0.0)] * len(clients)

    async def watch(i: int, client: RawClient) -> None:
        with trio.fail_after(timeout):
            close = await client.wait_close()
        got[i] = (close, trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        for i, client in enumerate(clients):
            nursery.start_soon(watch, i, client)
    return got
