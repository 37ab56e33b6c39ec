"""``guardmerge serve`` under hostile input: path tricks on the pass-through routes, malformed
bodies, poisoned batches, a dead batcher, disconnects, open relays. The real openai SDK and
raw HTTP against the proxy, in front of the project's local test upstream."""

from __future__ import annotations

import socket

import httpx
import openai
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from guardmerge import ConfigError
from guardmerge.serve import ServeOptions

from test_serve import Proxy, make_guard, score, user, wait_until  # noqa: F401


def raw_request(url, method, target, body=b"", headers=()):
    """One HTTP/1.1 request with ``target`` sent byte for byte (httpx would normalise it)."""
    host, port = url.split("//")[1].split(":")
    head = [f"{method} {target} HTTP/1.1", "Host: x", f"Content-Length: {len(body)}",
            "Connection: close", *headers]
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), data.split(b"\r\n\r\n", 1)[1]


# -- 1. pass-through paths -----------------------------------------------------------------------

TRICKS = ["/v1/models/../chat/completions", "/v1/models/%2e%2e/chat/completions",
          "/v1/models/..%2Fchat%2Fcompletions", "/v1/models/%2E%2E", "/v1/models/.",
          "/v1/models//chat", "/v1/models/a%3Fb", "/v1/models/a%2Fb", "/v1/models/a%00b",
          "/v1/models/a%5Cb", "/v1//models", "/v1/files/..", "/v1/files/%2e%2e",
          "/v1/files/..%2F..%2Fchat%2Fcompletions", "/v1/files/a%23b"]


def test_path_tricks_never_reach_another_upstream_route(llm):
    with Proxy(llm.url, passthrough=("GET /v1/files/{name}",)) as proxy:
        for target in TRICKS:
            status, body = raw_request(proxy.url, "GET", target)
            assert status == 404, target
            assert b'"not_found"' in body, target  # the proxy's own 404, not the upstream's
        assert llm.paths == []
        assert raw_request(proxy.url, "GET", "/v1/models/fake-model")[0] == 200
        assert raw_request(proxy.url, "GET", "/v1/files/file-abc.txt")[0] == 404  # upstream's
        assert llm.paths == ["/v1/models/fake-model", "/v1/files/file-abc.txt"]
        assert proxy.client().models.retrieve("fake-model").id == "fake-model"


@pytest.mark.parametrize("entry, problem", [
    ("GET /v1/files/{p:path}", "only single-segment parameters"),
    ("GET /v1/{x}/completions", "covers the proxy's own route /v1/chat/completions"),
    ("POST /v1/chat/completions/{id}", "covers the proxy's own route /v1/chat/completions"),
    ("GET /v1/chat/completions", "covers the proxy's own route"),
    ("GET /{anything}", "covers the proxy's own route"),
    ("GET /v1/files/../chat", "segment '..'"),
    ("GET /v1//files", "segment ''"),
    ("GET /v1/files/*", "segment '*'"),
    ("GET /v1/files/%2e%2e", "segment '%2e%2e'"),
    ("FETCH /v1/files", "expected 'METHOD /path'"),
])
def test_a_passthrough_that_could_cover_a_guarded_route_is_a_config_error(tmp_path, entry,
                                                                            problem):
    path = tmp_path / "serve.yaml"
    path.write_text(f"server: {{passthrough: ['GET /v1/files/{{name}}', '{entry}']}}\n")
    from guardmerge.serve import load_config

    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}: server.passthrough[1]: " in str(err.value) and problem in str(err.value)
    with pytest.raises(ConfigError, match=r"passthrough\[0\]"):
        ServeOptions(passthrough=(entry,))


# -- 9. no open relay -------------------------------------------------------------------------------


def test_a_public_address_without_proxy_keys_refuses_to_start(llm, tmp_path, capsys,
                                                               monkeypatch):
    from guardmerge.cli import main
    from guardmerge.serve import create_app

    guard = make_guard()
    for host in ("0.0.0.0", "::", "10.1.2.3", "guard.example.com"):
        options = ServeOptions(upstream=llm.url, host=host)
        with pytest.raises(ConfigError) as err:
            create_app(options, guard=guard, environ={"GUARDMERGE_UPSTREAM_API_KEY": "sk-up"})
        text = str(err.value)
        assert "$GUARDMERGE_API_KEYS" in text and "server.allow_open" in text
        assert "$GUARDMERGE_UPSTREAM_API_KEY" in text and "sk-up" not in text
        with pytest.raises(ConfigError):
            create_app(options, guard=guard, environ={})  # no upstream key either
        create_app(options, guard=guard, environ={"GUARDMERGE_API_KEYS": "k1"})
        create_app(ServeOptions(upstream=llm.url, host=host, allow_open=True), guard=guard,
                   environ={})
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        create_app(ServeOptions(upstream=llm.url, host=host), guard=guard, environ={})
    monkeypatch.delenv("GUARDMERGE_API_KEYS", raising=False)
    path = tmp_path / "serve.yaml"
    path.write_text(f"server: {{host: 0.0.0.0}}\nupstream: {{base_url: '{llm.url}'}}\n"
                    "guard: {bundle: b, policy: p.yaml}\n")
    assert main(["serve", "--config", str(path)]) == 2
    assert "server.allow_open" in capsys.readouterr().err
