"""Scale-out on Ray Serve: two replicas of the proxy on this machine both serve traffic, and a
killed replica is replaced. Slow (Ray starts a cluster); skipped unless ray is installed."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")

from conftest import JB_POLICY, trigger_reply

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ray_serve_replicas_serve_traffic_and_a_killed_one_is_replaced(trigger_bundle,
                                                                           tmp_path):
    import openai
    from ray import serve

    from guardmerge.serve import ServeOptions, build_deployment
    from guardmerge.testing import OpenAICompatServer

    policy = tmp_path / "policy.yaml"
    policy.write_text(JB_POLICY)
    port = _free_port()
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=100 * 2**20,
             runtime_env={"env_vars": env}, log_to_driver=False)
    try:
        with OpenAICompatServer(reply=trigger_reply) as llm:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            options = ServeOptions(upstream=llm.url, bundle=str(trigger_bundle),
                                   policy=str(policy))
            app = build_deployment(options, num_replicas=2,
                                   ray_actor_options={"num_cpus": 0.5})
            serve.run(app, name="guardmerge", route_prefix="/")
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k",
                                   max_retries=3, timeout=60)

            def replicas_answering(n_requests):
                seen, lock = set(), threading.Lock()

                def one(i):
                    raw = client.chat.completions.with_raw_response.create(
                        model="m", messages=[{"role": "user", "content": f"hello {i}"}])
                    assert raw.parse().choices[0].message.content == f"You said: hello {i}"
                    with lock:
                        seen.add(raw.headers["x-guardmerge-replica"])

                threads = [threading.Thread(target=one, args=(i,)) for i in range(n_requests)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(120)
                return seen

            before = set()
            for _ in range(10):  # both replicas take traffic (Ray picks one per request)
                before |= replicas_answering(16)
                if len(before) == 2:
                    break
            assert len(before) == 2
            with pytest.raises(openai.BadRequestError) as err:  # the same guard, in Ray
                client.chat.completions.create(model="m", messages=[
                    {"role": "user", "content": "xyzzy"}])
            assert err.value.code == "content_filter"

            victims = [a for a in ray.util.list_named_actors(all_namespaces=True)
                       if a["name"].startswith("SERVE_REPLICA::")]
            assert len(victims) == 2
            ray.kill(ray.get_actor(victims[0]["name"], namespace=victims[0]["namespace"]),
                     no_restart=True)
            deadline = time.monotonic() + 240
            after: set[str] = set()
            while time.monotonic() < deadline:
                after |= replicas_answering(16)
                fresh = after - before
                if fresh and len(after & before) == 1:  # the survivor and its replacement
                    break
                time.sleep(1)
            assert after - before, "no replacement replica answered"
            live = [a for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith("SERVE_REPLICA::")]
            assert len(live) == 2
            serve.shutdown()
    finally:
        ray.shutdown()
