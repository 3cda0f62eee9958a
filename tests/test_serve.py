"""llmos serve against the official openai client and raw HTTP: completions, chat,
streaming, models, keys, errors, cancellation on disconnect, /metrics.

One kernel and one serve for the module (with API keys), a tiny Llama imported as
/models/tiny (no eos: it generates exactly max_tokens; context 2048) and a private
copy /models/secret that only uid 7 may read.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from urllib.parse import urlparse

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, Booted, examples, wait_until
from hf_models import make_hf_dir

sys.path.insert(0, str(ROOT / "bench"))
from serveboot import ServeProcess  # noqa: E402

from userland.serve import create_key  # noqa: E402

PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    src = make_hf_dir(tmp_path_factory.mktemp("hf") / "llama", "llama", seed=2,
                      max_position_embeddings=2048, eos_token_id=None)
    with Booted() as b:
        with b.connect(uid=0) as osh:
            osh.mkdir("/models", 0o1777)
        with b.connect(uid=1000) as osh:
            osh.import_model(src, "/models/tiny")
        with b.connect(uid=7) as osh:
            osh.import_model(src, "/models/secret", perm=0o600)
            osh.chmod("/models/secret", 0o700)
        alice, _ = create_key(b.home, 1000, "alice")
        seven, _ = create_key(b.home, 7, "seven")
        with ServeProcess(b.root) as s:
            s.alice, s.seven, s.booted, s.clients, s.src = alice, seven, b, {}, src
            yield s
            for c in s.clients.values():
                c.close()


def client(served, key=None) -> openai.OpenAI:
    """The openai client with key (alice's by default), one per key for the module."""
    key = key or served.alice
    if key not in served.clients:
        served.clients[key] = openai.OpenAI(base_url=served.url + "/v1", api_key=key,
                                            max_retries=0)
    return served.clients[key]


def metrics(served) -> dict:
    text = httpx.get(served.url + "/metrics",
                     headers={"Authorization": f"Bearer {served.alice}"}).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_completion_matches_the_library(served):
    r = client(served).completions.create(model="tiny", prompt=PROMPT, max_tokens=12,
                                          temperature=0, seed=5)
    with served.booted.connect(uid=1000) as osh:
        lib = osh.infer("/models/tiny", PROMPT, max_tokens=12, temperature=0, top_k=0,
                        seed=5)
    assert r.object == "text_completion" and r.model == "tiny"
    assert r.choices[0].text == lib["text"]
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == lib["prompt_tokens"]
    assert r.usage.total_tokens == 12 + lib["prompt_tokens"]


def test_chat_and_its_stream_agree(served):
    c = client(served)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    whole = c.chat.completions.create(model="/models/tiny", messages=msgs, max_tokens=10,
                                      temperature=0)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    chunks = list(c.chat.completions.create(model="/models/tiny", messages=msgs,
                                            max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finals[-1] == "length" and set(finals[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_n_choices_use_their_own_seeds(served):
    r = client(served).completions.create(model="tiny", prompt=PROMPT, max_tokens=8,
                                          temperature=1.0, seed=11, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 24
    with served.booted.connect(uid=1000) as osh:
        second = osh.infer("/models/tiny", PROMPT, max_tokens=8, temperature=1.0, top_k=0,
                           seed=12)["text"]
    assert r.choices[1].text == second


def test_models_list_follows_permissions(served):
    alice = {m.id for m in client(served).models.list().data}
    seven = {m.id for m in client(served, served.seven).models.list().data}
    assert "/models/tiny" in alice and "/models/secret" not in alice
    assert {"/models/tiny", "/models/secret"} <= seven


def test_keys_decide_who_may_call(served):
    with pytest.raises(openai.AuthenticationError):
        client(served, "llmos-not-a-key").models.list()
    r = httpx.get(served.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    with pytest.raises(openai.PermissionDeniedError):
        client(served).completions.create(model="/models/secret", prompt="x", max_tokens=2)
    r = client(served, served.seven).completions.create(model="/models/secret", prompt="x",
                                                        max_tokens=2)
    assert r.usage.completion_tokens == 2


def test_client_mistakes_are_4xx_with_openai_errors(served):
    c = client(served)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:  # over the context, no truncate
        c.completions.create(model="tiny", prompt="word " * 3000, max_tokens=2)
    assert "tokens" in str(e.value)
    auth = {"Authorization": f"Bearer {served.alice}"}
    for body, param in [({"model": "tiny", "prompt": "x", "n": 9}, "n"),
                        ({"model": "tiny", "prompt": "x", "logprobs": 2}, "logprobs"),
                        ({"model": "tiny", "prompt": "x", "temperature": "hot"}, "temperature"),
                        ({"model": "tiny", "prompt": [1, 2]}, "prompt"),
                        ({"prompt": "x"}, "model"),
                        ({"model": "tiny", "messages": [{"role": "x"}]}, "messages[0]")]:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        r = httpx.post(served.url + path, json=body, headers=auth)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["type"] == "invalid_request_error" \
            and err["message"]
    r = httpx.post(served.url + "/v1/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def _raw_stream(served, body: dict) -> socket.socket:
    u = urlparse(served.url)
    sock = socket.create_connection((u.hostname, u.port), timeout=30)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nAuthorization: Bearer " + served.alice.encode() +
                 b"\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


def _dechunk(raw: bytes) -> bytes:
    """The body of a chunked HTTP/1.1 response."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b"200 OK" in head.split(b"\r\n")[0] and b"text/event-stream" in head
    out = b""
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out, rest = out + rest[:n], rest[n + 2:]
    return out


def test_unknown_urls_and_model_lookup_are_openai_errors(served):
    auth = {"Authorization": f"Bearer {served.alice}"}
    r = httpx.get(served.url + "/v1/nothing", headers=auth)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.delete(served.url + "/v1/models", headers=auth)
    assert r.status_code == 405 and r.json()["error"]["message"]
    assert client(served).models.retrieve("/models/tiny").id == "/models/tiny"
    with pytest.raises(openai.NotFoundError):
        client(served).models.retrieve("/models/secret")  # uid 1000 may not read it
    u = urlparse(served.url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
                     served.alice.encode() + b"\r\nContent-Length: 999999999\r\n\r\n{}")
        head = sock.recv(65536)  # refused by its declared size, not read
    assert head.startswith(b"HTTP/1.1 413")


def test_sse_framing(served):
    sock = _raw_stream(served, {"model": "tiny", "prompt": PROMPT, "max_tokens": 6,
                                "temperature": 0, "stream": True,
                                "stream_options": {"include_usage": True}})
    raw = b""
    while not raw.endswith(b"0\r\n\r\n"):
        got = sock.recv(65536)
        assert got, raw
        raw += got
    sock.close()
    events = _dechunk(raw).split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    bodies = [json.loads(e[len(b"data: "):]) for e in events[:-2]]
    assert all(e.startswith(b"data: ") for e in events[:-1])
    assert all(b["object"] == "text_completion" for b in bodies)
    assert bodies[-1]["usage"]["completion_tokens"] == 6 and bodies[-1]["choices"] == []
    assert all(b["usage"] is None for b in bodies[:-1])
    assert bodies[-2]["choices"][0]["finish_reason"] == "length"


def test_disconnect_cancels_the_generation(served):
    with served.booted.connect(uid=0) as osh:
        before = osh.models()["engine"].get("tokens", 0)
        sock = _raw_stream(served, {"model": "tiny", "prompt": PROMPT, "max_tokens": 2000,
                                    "temperature": 0, "stream": True})
        raw = b""
        while raw.count(b"data: ") < 3:  # a few tokens in: it is generating
            raw += sock.recv(65536)
        sock.close()
        assert wait_until(lambda: osh.models()["engine"]["running"] == 0, 30)
        made = osh.models()["engine"]["tokens"] - before
    assert 0 < made < 2000  # stopped, not run to max_tokens


def test_disconnect_cancels_a_request_that_is_not_streamed(served):
    with served.booted.connect(uid=0) as osh:
        before = osh.models()["engine"].get("tokens", 0)
        sock = _raw_stream(served, {"model": "tiny", "prompt": PROMPT, "max_tokens": 2000,
                                    "temperature": 0})
        assert wait_until(lambda: osh.models()["engine"]["running"] == 1, 30)
        sock.close()
        assert wait_until(lambda: osh.models()["engine"]["running"] == 0, 30)
        made = osh.models()["engine"]["tokens"] - before
    assert made < 2000


def test_metrics_parse_and_move(served):
    before = metrics(served)
    client(served).completions.create(model="tiny", prompt=PROMPT, max_tokens=3)
    after = metrics(served)
    infer = ("llmos_syscalls_total", (("syscall", "infer"),))
    assert after[infer] == before.get(infer, 0) + 1
    ok = ("llmos_serve_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))
    assert after[ok] == before.get(ok, 0) + 1
    assert after[("llmos_serve_tokens_total", ())] == before.get(("llmos_serve_tokens_total",
                                                                 ()), 0) + 3
    count = ("llmos_syscall_latency_seconds_count", (("syscall", "infer"),))
    assert after[count] == after[infer]
    inf = ("llmos_syscall_latency_seconds_bucket", (("le", "+Inf"), ("syscall", "infer")))
    assert after[inf] == after[infer]
    assert ("llmos_gpu_memory_bytes", (("gpu", "sim0"), ("kind", "capacity"))) in after
    assert after[("llmos_driver_up", (("driver", "executor"),))] == 1
    assert after[("llmos_serve_time_to_first_token_seconds_count", ())] >= 1
    nf = ("llmos_syscall_errors_total", (("errno", "ENOENT"), ("syscall", "infer")))
    client_ = client(served)
    with pytest.raises(openai.NotFoundError):
        client_.completions.create(model="missing", prompt="x", max_tokens=1)
    assert metrics(served)[nf] == after.get(nf, 0) + 1


def test_health_and_status_page(served):
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}
    assert httpx.get(served.url + "/").status_code == 401  # keys are configured
    page = httpx.get(served.url + "/", params={"key": served.alice})
    assert page.status_code == 200 and "<h2>Deployments</h2>" in page.text
    assert "llmos serve --host" in page.text  # its own process in the table


def test_serve_without_keys_binds_loopback_only(booted):
    out = subprocess.run([sys.executable, "-m", "userland.cli", "serve", "--host", "0.0.0.0",
                          "--port", "0"], env={"LLMOS_HOME": str(booted.root),
                                               "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 1
    assert "needs API keys" in out.stderr
    out = subprocess.run([sys.executable, "-m", "userland.cli", "serve", "-d", "--host",
                          "0.0.0.0", "--port", "0"], env={"LLMOS_HOME": str(booted.root),
                                                          "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=20, cwd=ROOT)
    assert out.returncode == 1 and "needs API keys" in out.stderr  # at once, not spawned


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) |
                    st.floats() | st.text(max_size=20),
                    lambda kids: st.lists(kids, max_size=4) |
                    st.dictionaries(st.text(max_size=12), kids, max_size=4), max_leaves=12)
FIELDS = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["tiny", "/models/tiny", "nope", ""]) | JSON,
    "prompt": st.sampled_from([PROMPT, ""]) | JSON,
    "messages": st.just([{"role": "user", "content": "hi"}]) | JSON,
    "max_tokens": st.integers(-5, 5) | JSON, "temperature": JSON, "top_p": JSON,
    "stop": JSON, "seed": JSON, "n": st.integers(-1, 10) | JSON, "stream": JSON,
    "stream_options": JSON, "logprobs": JSON, "user": JSON})


@settings(max_examples=examples(60), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=FIELDS | JSON, chat=st.booleans())
def test_any_body_gets_an_answer_never_a_500(served, body, chat):
    """Whatever the body, serve answers 200 or a 4xx with an OpenAI error, and lives."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    r = httpx.post(served.url + path, content=json.dumps(body), timeout=60,  # NaN too
                   headers={"Authorization": f"Bearer {served.alice}"})
    assert r.status_code in (200, 400, 403, 404), (body, r.status_code, r.text)
    if r.status_code != 200:
        err = r.json()["error"]
        assert err["message"] and err["type"].endswith("_error")
    assert served.proc.poll() is None


def test_revoking_the_last_key_locks_serve_rather_than_opening_it(booted):
    from userland.serve import revoke_key
    key, _ = create_key(booted.home, 1000, "only")
    with ServeProcess(booted.root) as s:
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/v1/models",
                         headers={"Authorization": f"Bearer {key}"}).status_code == 200
        revoke_key(booted.home, "only")
        assert wait_until(lambda: httpx.get(s.url + "/v1/models", headers={
            "Authorization": f"Bearer {key}"}).status_code == 401, 5)
        assert httpx.get(s.url + "/v1/models").status_code == 401


def test_a_deployment_serves_only_whom_its_checkpoint_lets_read(served):
    """A trained model's directory is listable by all, its latest checkpoint private
    to uid 7: uid 1000 neither sees its deployment nor may use it (403)."""
    import numpy as np
    from userland.serve import deploy, undeploy
    with served.booted.connect(uid=7) as osh:
        osh.mkdir("/models/ck", 0o755)
        osh.import_model(served.src, "/models/ck/step-000001", perm=0o600)
        osh.save_tensor("/models/ck/latest", np.frombuffer(b"step-000001", dtype=np.uint8))
        deploy(osh, "/models/ck", "private")
    try:
        assert wait_until(lambda: "private" in {m.id for m in client(
            served, served.seven).models.list().data}, 10)
        assert "private" not in {m.id for m in client(served).models.list().data}
        with pytest.raises(openai.PermissionDeniedError):
            client(served).completions.create(model="private", prompt="x", max_tokens=2)
    finally:
        undeploy(served.booted.home, "private", 7)
