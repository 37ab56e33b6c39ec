"""The proxy's upstream client splits its connections into small httpcore pools (``Shards``):
exact sizes, light traffic on the first pool, concurrent traffic spread, counts that return
to zero after every response and every failure."""

from __future__ import annotations

import asyncio
import collections

import httpx
import pytest

from guardmerge.serve import BackgroundServer
from guardmerge.serve.upstream import SHARD_CONNECTIONS, Shards, Upstream
from guardmerge.tools.serve_bench import _upstream_app


def test_pool_sizes_add_up_to_the_limit():
    assert Shards(256).sizes == [16] * 16
    assert Shards(100).sizes == [15, 15, 14, 14, 14, 14, 14] and sum(Shards(100).sizes) == 100
    assert Shards(1).sizes == [1] and Shards(SHARD_CONNECTIONS).sizes == [SHARD_CONNECTIONS]
    with pytest.raises(ValueError):
        Shards(0)


def _connections(shards: Shards) -> list[int]:
    return [len(pool._pool.connections) for pool in shards.pools]


def test_light_traffic_stays_on_the_first_pool_and_concurrent_traffic_spreads():
    body = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}

    async def run(url: str) -> None:
        up = Upstream(url, timeout=10, connect_timeout=5, max_connections=32)
        shards = up.client._transport
        assert isinstance(shards, Shards) and len(shards.pools) == 2
        try:
            for _ in range(5):  # one at a time: one connection, reused, in pool 0
                reply = await up.send("POST", "/chat/completions", "chat",
                                      headers={"content-type": "application/json"}, body=body)
                assert reply.json()["choices"][0]["message"]["content"] == \
                    "You said: hello there"
            assert _connections(shards) == [1, 0] and shards.in_flight == [0, 0]
            # 6 streams held open at once: 3 per pool
            streams = [await up.stream("/chat/completions", "chat",
                                       headers={"content-type": "application/json"},
                                       body={**body, "stream": True}, needs_done=True)
                       for _ in range(6)]
            assert shards.in_flight == [3, 3]
            texts = await asyncio.gather(*(_collect(s) for s in streams))
            assert texts == ["You said: hello there"] * 6
            assert shards.in_flight == [0, 0]
        finally:
            await up.aclose()

    # a keep-alive upstream (the bench's fake one: Starlette on uvicorn, no latency)
    with BackgroundServer(_upstream_app(0.0, collections.Counter()), wait_ready=False) as srv:
        asyncio.run(run(srv.url + "/v1"))


async def _collect(stream) -> str:
    text = ""
    try:
        async for event in stream:
            for choice in event.get("choices", []):
                text += choice.get("delta", {}).get("content") or ""
    finally:
        await stream.aclose()
    await stream.aclose()  # closing twice counts once
    return text


def test_a_failed_request_gives_its_slot_back():
    async def run() -> None:
        shards = Shards(4)
        async with httpx.AsyncClient(transport=shards, timeout=2) as client:
            for _ in range(3):
                with pytest.raises(httpx.ConnectError):
                    await client.get("http://127.0.0.1:9/nothing-listens-here")
        assert shards.in_flight == [0]

    asyncio.run(run())
