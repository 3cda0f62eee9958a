"""Deployments behind llmos serve: the autoscaling policy on a driven clock, and real
replicas (llmos processes spawned by serve, each with its own alloc_gpu allocation):
scale up under a burst and down after it within min..max, a SIGKILLed replica
replaced with no request lost, a full queue answered 429 that the openai client's
retries get through, scale-up waiting in the devices queue for GPU memory.

The autoscaler's clock is driven through LLMOS_SERVE_CLOCK (a file of seconds added
to serve's clock), so Ray Serve's default delays (30 s up, 600 s down) are tested in
seconds.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

import openai
import pytest

from conftest import ROOT, Booted, errno_of, wait_until
from hf_models import make_hf_dir

sys.path.insert(0, str(ROOT / "bench"))
from serveboot import ServeProcess  # noqa: E402

from syscalls import Errno  # noqa: E402
from userland.serve import deploy, deployments, undeploy  # noqa: E402
from userland.serve._deploy import Autoscaler, check_spec  # noqa: E402

PROMPT = "def add(a, b):"


# -- the policy alone ----------------------------------------------------------------

def spec(**kw):
    return check_spec({"name": "d", "model": "/models/m", "owner": 0, "look_back_s": 0, **kw})


def test_policy_waits_its_delays_and_keeps_to_min_max():
    a = Autoscaler(spec(min=1, max=3, target_ongoing=2, upscale_delay_s=30,
                        downscale_delay_s=600))
    assert a.decide(0, ongoing=5, current=1) == 1      # wanted 3: not yet
    assert a.decide(29.9, ongoing=5, current=1) == 1
    assert a.decide(30, ongoing=5, current=1) == 3     # held for the delay
    assert a.decide(31, ongoing=100, current=3) == 3   # never above max
    assert a.decide(40, ongoing=0, current=3) == 3     # wanted 1: not yet
    assert a.decide(500, ongoing=1, current=3) == 3
    assert a.decide(640, ongoing=0, current=3) == 1    # 600 s of wanting fewer
    assert a.decide(2000, ongoing=0, current=1) == 1   # never below min


def test_policy_restarts_its_delay_when_the_load_turns():
    a = Autoscaler(spec(min=1, max=4, target_ongoing=1, upscale_delay_s=10))
    assert a.decide(0, 3, 1) == 1
    assert a.decide(5, 1, 1) == 1       # the burst ended: the wait starts again
    assert a.decide(12, 3, 1) == 1
    assert a.decide(21, 3, 1) == 1
    assert a.decide(22, 3, 1) == 3


def test_policy_averages_the_load_over_its_look_back():
    a = Autoscaler(spec(min=1, max=8, target_ongoing=1, upscale_delay_s=0, look_back_s=10))
    assert a.decide(0, 8, 1) == 8     # one sample: itself
    a = Autoscaler(spec(min=1, max=8, target_ongoing=1, upscale_delay_s=0, look_back_s=10))
    for t in range(10):               # 0 and 8 by turns: 4 on average
        a.decide(t, 8 * (t % 2), 1)
    assert a.decide(10, 8, 1) == 5    # (5 x 8 + 8) / 11 samples = 4.4
    assert a.decide(100, 0, 1) == 1   # the old ones are out of the window


def test_policy_scales_from_zero_at_once_and_clamps_current():
    a = Autoscaler(spec(min=0, max=2, upscale_delay_s=30))
    assert a.decide(0, 0, 0) == 0
    assert a.decide(1, 1, 0) == 1       # a request waits: no delay from zero
    assert Autoscaler(spec(min=2, max=3)).decide(0, 0, 0) == 2
    assert Autoscaler(spec(min=1, max=2)).decide(0, 0, 5) == 2


@pytest.mark.parametrize("bad", [{"min": 3, "max": 2}, {"max": 0}, {"target_ongoing": 0},
                                 {"min": -1}, {"name": "no spaces"}, {"model": "rel/path"},
                                 {"upscale_delay_s": float("inf")}, {"max_ongoing": 0},
                                 {"min": True}])
def test_bad_specs_are_einval(bad):
    from syscalls import SyscallError
    with pytest.raises(SyscallError) as e:
        spec(**bad)
    assert e.value.errno == Errno.EINVAL


# -- real replicas -------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_hf_dir(tmp_path_factory.mktemp("hf") / "llama", "llama", seed=2,
                       max_position_embeddings=4096, eos_token_id=None)


class Cluster:
    """A kernel, /models/tiny, serve on a driven clock."""

    def __init__(self, booted, model_dir, tmp_path):
        self.b = booted
        self.clock = tmp_path / "clock"
        self.clock.write_text("0")
        with booted.connect(uid=0) as osh:
            osh.import_model(model_dir, "/models/tiny")
        self.serve = ServeProcess(booted.root, ("--uid", "0"),
                                  env={"LLMOS_SERVE_CLOCK": str(self.clock)})
        self.client = openai.OpenAI(base_url=self.serve.url + "/v1", api_key="none",
                                    max_retries=0, timeout=120)

    def advance(self, seconds: float) -> None:
        self.clock.write_text(str(float(self.clock.read_text()) + seconds))

    def deploy(self, **kw) -> None:
        with self.b.connect(uid=0) as osh:
            deploy(osh, "/models/tiny", "tinyd", **kw)

    def state(self) -> dict:
        return self.serve.deployment("tinyd")

    def running(self) -> int:
        return self.state().get("running", 0)

    def stream(self, max_tokens=4000) -> "Holder":
        return Holder(self.client, max_tokens)

    def close(self) -> None:
        self.client.close()
        self.serve.stop()


class Holder:
    """A streaming request that keeps generating until closed."""

    def __init__(self, client, max_tokens):
        self.s = client.completions.create(model="tinyd", prompt=PROMPT,
                                           max_tokens=max_tokens, temperature=0, stream=True)
        self.first = threading.Event()
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self):
        try:
            for _ in self.s:
                self.first.set()
        except Exception:
            pass

    def close(self):
        self.s.close()


@pytest.fixture
def cluster(model_dir, tmp_path):
    with Booted({"sim_gpus": "1x64MiB"}) as b:
        c = Cluster(b, model_dir, tmp_path)
        try:
            yield c
        finally:
            c.close()


def test_scale_up_under_a_burst_and_down_after(cluster):
    # a short look-back: the load before the burst (a slow replica start's zeros)
    # leaves the average at once (the averaging has its own test above)
    cluster.deploy(min=1, max=3, target_ongoing=1, max_ongoing=1, gpu_mem=4 << 20,
                   look_back_s=2)
    assert wait_until(lambda: cluster.running() == 1, 60)
    holders = [cluster.stream() for _ in range(5)]  # 5 ongoing: 3 wanted (max)
    assert wait_until(lambda: cluster.state().get("ongoing", 0) + cluster.state().get(
        "queued", 0) == 5, 30)
    # the load asks for 3 (max), the 30 s delay holds it at 1
    assert wait_until(lambda: cluster.state()["wanted"] == 3, 30)
    assert cluster.state()["desired"] == 1 and cluster.running() == 1
    cluster.advance(31)
    assert wait_until(lambda: cluster.state()["desired"] == 3, 10)
    assert wait_until(lambda: cluster.running() == 3, 60)
    assert wait_until(lambda: cluster.state()["ongoing"] == 3, 10)  # one per replica
    for h in holders:
        h.close()
    assert wait_until(lambda: cluster.state()["ongoing"] + cluster.state()["queued"] == 0, 30)
    cluster.advance(3)  # past the look-back: the load it averages is 0 now
    assert wait_until(lambda: cluster.state()["wanted"] == 1, 10)
    assert cluster.state()["desired"] == 3  # the 600 s delay holds it
    cluster.advance(600)
    assert wait_until(lambda: cluster.running() == 1 and len(cluster.state()["replicas"]) == 1,
                      30)
    with cluster.b.connect(uid=0) as osh:  # the stopped replicas' allocations are freed
        assert wait_until(lambda: len(osh.devices()["gpus"][0]["allocations"]) == 1, 10)
    r = cluster.client.completions.create(model="tinyd", prompt=PROMPT, max_tokens=4)
    assert r.usage.completion_tokens == 4


def test_a_killed_replica_is_replaced_and_no_request_is_lost(cluster):
    cluster.deploy(min=2, max=2, max_ongoing=4, gpu_mem=4 << 20)
    assert wait_until(lambda: cluster.running() == 2, 60)
    with cluster.b.connect(uid=0) as osh:
        want = osh.infer("/models/tiny", PROMPT, max_tokens=400, temperature=0,
                         top_k=0)["text"]
    results: list = []

    def ask():
        try:
            r = cluster.client.completions.create(model="tinyd", prompt=PROMPT,
                                                  max_tokens=400, temperature=0)
            results.append(r.choices[0].text)
        except Exception as e:  # pragma: no cover - what the test would report
            results.append(e)
    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    assert wait_until(lambda: any(r["ongoing"] for r in cluster.state()["replicas"]), 30)
    victim = max(cluster.state()["replicas"], key=lambda r: r["ongoing"])
    os.kill(victim["os_pid"], signal.SIGKILL)
    for t in threads:
        t.join(120)
    assert results == [want] * 6  # retried on the other replica: same seedless greedy text
    assert wait_until(lambda: cluster.running() == 2 and cluster.state()["lost_replicas"] == 1,
                      60)
    assert victim["pid"] not in [r["pid"] for r in cluster.state()["replicas"]]


def test_a_full_queue_is_429_and_the_client_retries_through(cluster):
    cluster.deploy(min=1, max=1, max_ongoing=1, max_queued=0, gpu_mem=4 << 20)
    assert wait_until(lambda: cluster.running() == 1, 60)
    holder = cluster.stream()
    assert holder.first.wait(30)
    retrying = openai.OpenAI(base_url=cluster.serve.url + "/v1", api_key="none",
                             max_retries=4, timeout=120)
    out: list = []
    t = threading.Thread(target=lambda: out.append(retrying.completions.create(
        model="tinyd", prompt=PROMPT, max_tokens=5)))
    t.start()
    assert wait_until(lambda: cluster.state()["rejected"] >= 1, 30)
    with pytest.raises(openai.RateLimitError):  # without retries the 429 shows
        cluster.client.completions.create(model="tinyd", prompt=PROMPT, max_tokens=5)
    holder.close()  # the slot frees: a retry gets in
    t.join(60)
    retrying.close()
    assert out and out[0].usage.completion_tokens == 5


def test_scale_up_waits_for_gpu_memory(cluster):
    with cluster.b.connect(uid=0) as osh:
        hog = osh.alloc_gpu("40MiB")
        cluster.deploy(min=1, max=1, gpu_mem=32 << 20)
        assert wait_until(lambda: [r["state"] for r in cluster.state().get("replicas", [])]
                          == ["waiting"], 60)
        assert wait_until(lambda: len(osh.devices()["queue"]) == 1, 10)
        assert cluster.running() == 0
        osh.free_gpu(hog["id"])
        assert wait_until(lambda: cluster.running() == 1, 60)
        gpu = osh.devices()["gpus"][0]
        assert [a["bytes"] for a in gpu["allocations"]] == [32 << 20]
    r = cluster.client.completions.create(model="tinyd", prompt=PROMPT, max_tokens=3)
    assert r.usage.completion_tokens == 3


def test_deploy_checks_and_undeploy_stops_replicas(cluster):
    with cluster.b.connect(uid=1000) as osh:
        assert errno_of(deploy, osh, "/models/nothing", "x") == Errno.ENOENT
        assert errno_of(deploy, osh, "/models/tiny", "bad name") == Errno.EINVAL
    cluster.deploy(min=1, max=1, gpu_mem=4 << 20)
    with cluster.b.connect(uid=0) as osh:
        assert errno_of(deploy, osh, "/models/tiny", "tinyd") == Errno.EEXIST
    with cluster.b.connect(uid=1000) as osh:  # another uid's: not to replace or remove
        assert errno_of(deploy, osh, "/models/tiny", "tinyd", replace=True) == Errno.EPERM
    assert errno_of(undeploy, cluster.b.home, "tinyd", 1000) == Errno.EPERM
    assert [d["owner"] for d in deployments(cluster.b.home)] == [0]
    assert wait_until(lambda: cluster.running() == 1, 60)
    assert [d["state"] for d in deployments(cluster.b.home)] == ["served"]
    pid = cluster.state()["replicas"][0]["pid"]
    undeploy(cluster.b.home, "tinyd", 0)
    assert wait_until(lambda: cluster.state() == {}, 10)  # serve read the change
    with pytest.raises(openai.NotFoundError):
        cluster.client.completions.create(model="tinyd", prompt=PROMPT, max_tokens=2)
    with cluster.b.connect(uid=0) as osh:
        assert wait_until(lambda: pid not in [p["pid"] for p in osh.ps()], 30)
        assert wait_until(lambda: osh.devices()["gpus"][0]["allocations"] == [], 10)


def test_a_changed_spec_replaces_the_replicas(cluster):
    cluster.deploy(min=1, max=1, gpu_mem=4 << 20)
    assert wait_until(lambda: cluster.running() == 1, 60)
    old = cluster.state()["replicas"][0]["pid"]
    with cluster.b.connect(uid=0) as osh:
        deploy(osh, "/models/tiny", "tinyd", replace=True, min=1, max=1, gpu_mem=8 << 20)
    assert wait_until(lambda: [r["bytes"] for r in cluster.state()["replicas"]
                               if r["state"] == "ready"] == [8 << 20], 60)
    assert old not in [r["pid"] for r in cluster.state()["replicas"]]


def test_replicas_of_a_dead_serve_leave_when_a_new_one_starts(cluster):
    cluster.deploy(min=1, max=1, gpu_mem=4 << 20)
    assert wait_until(lambda: cluster.running() == 1, 60)
    orphan = cluster.state()["replicas"][0]["os_pid"]
    cluster.serve.proc.kill()  # no goodbye: its replica is left behind
    cluster.serve.stop()
    cluster.client.close()
    cluster.serve = ServeProcess(cluster.b.root, ("--uid", "0"),
                                 env={"LLMOS_SERVE_CLOCK": str(cluster.clock)})
    cluster.client = openai.OpenAI(base_url=cluster.serve.url + "/v1", api_key="none",
                                   max_retries=0, timeout=120)
    import psutil
    assert wait_until(lambda: not psutil.pid_exists(orphan) or
                      psutil.Process(orphan).status() == psutil.STATUS_ZOMBIE, 30)
    assert wait_until(lambda: cluster.running() == 1, 60)  # the new serve's own
    with cluster.b.connect(uid=0) as osh:
        assert wait_until(lambda: len(osh.devices()["gpus"][0]["allocations"]) == 1, 10)


def test_a_failed_choice_stops_the_others_and_limits_hold(cluster):
    cluster.deploy(min=1, max=1, max_ongoing=2, max_queued=8, queue_timeout_s=1,
                   gpu_mem=4 << 20)
    assert wait_until(lambda: cluster.running() == 1, 60)
    with pytest.raises(openai.BadRequestError) as e:  # infer_max_tokens, as infer says
        cluster.client.completions.create(model="tinyd", prompt=PROMPT, max_tokens=5000)
    assert "infer_max_tokens" in str(e.value)
    # 8 choices, 2 run, 6 wait: those time out (503), and the 2 running are stopped
    with pytest.raises(openai.InternalServerError) as e:
        cluster.client.completions.create(model="tinyd", prompt=PROMPT, max_tokens=4000, n=8)
    assert e.value.status_code == 503
    assert wait_until(lambda: cluster.state()["ongoing"] == 0, 3)  # not 8 s of 4000 tokens
