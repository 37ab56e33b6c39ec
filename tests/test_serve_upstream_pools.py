"""The proxy's upstream client splits its connections into small httpcore pools (``Shards``):
exact sizes, light traffic on the first pool, concurrent traffic spread, counts that return
to zero after every response and every failure."""

from __future__ import annotations

import asyncio
import collections
import time

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


def test_at_saturation_a_request_takes_the_first_connection_that_comes_free():
    """Two pools of one: a long stream holds pool 0; a short call and a third, queued call
    both finish while the stream is still open (the third waits for the short call's slot,
    not behind the stream), and a call that cannot get a slot within its pool timeout fails."""
    body = {"model": "m", "messages": [{"role": "user", "content": "one two three four five"}]}

    async def run(url: str) -> None:
        shards = Shards(2, per_pool=1)
        async with httpx.AsyncClient(base_url=url, transport=shards,
                                     timeout=httpx.Timeout(10, pool=5)) as client:
            async with client.stream("POST", "/chat/completions",
                                     json={**body, "stream": True}) as long:  # ~1 s of chunks
                assert shards.in_flight == [1, 0]
                t = time.perf_counter()
                short, third = await asyncio.gather(
                    client.post("/chat/completions", json=body),
                    client.post("/chat/completions", json=body))
                assert short.status_code == third.status_code == 200
                assert time.perf_counter() - t < 0.5 and not long.is_closed
                assert shards.in_flight == [1, 0]
                # every slot taken: a call with a short pool timeout gets PoolTimeout
                async with client.stream("POST", "/chat/completions",
                                         json={**body, "stream": True}):
                    assert shards.in_flight == [1, 1]
                    with pytest.raises(httpx.PoolTimeout):
                        await client.post("/chat/completions", json=body,
                                          timeout=httpx.Timeout(10, pool=0.05))
                assert shards.in_flight == [1, 0]
                await long.aread()
        assert shards.in_flight == [0, 0] and not shards._slots.locked()

    with BackgroundServer(_upstream_app(0.0, collections.Counter(), gap=0.25),
                          wait_ready=False) as srv:
        asyncio.run(run(srv.url + "/v1"))


def test_a_response_gives_its_slot_back_once_and_tls_is_httpx_own():
    calls = []

    class Body(httpx.AsyncByteStream):
        async def __aiter__(self):
            yield b"x"

        async def aclose(self) -> None:
            calls.append("closed")

    from guardmerge.serve.upstream import _Counted

    counted = _Counted(Body(), lambda: calls.append("done"))

    async def close_twice() -> None:
        await counted.aclose()
        await counted.aclose()

    asyncio.run(close_twice())
    assert calls == ["closed", "done", "closed"]
    # the pools verify as httpx's own default client does (certifi's CA bundle)
    shards = Shards(20)
    ctx = shards.pools[0]._pool._ssl_context
    assert ctx is shards.pools[1]._pool._ssl_context
    assert ctx.verify_mode.name == "CERT_REQUIRED" and ctx.check_hostname
    expected = httpx.create_ssl_context(verify=True, trust_env=False)
    assert len(ctx.get_ca_certs()) == len(expected.get_ca_certs()) > 0
