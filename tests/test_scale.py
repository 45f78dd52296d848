"""The engines as Ray Serve replicas: two tiny CPU replicas (num_gpus 0) on a real local Ray cluster, one for the
module, driven through the front's RemoteEngine as the web layer drives a local engine."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from PIL import Image

# Not importorskip: scale must be imported before Ray, to set how Ray forwards the replicas' log lines.
if importlib.util.find_spec("ray") is None:
    pytest.skip("the scale extra (ray[serve]) is not installed: pip install '.[scale]'", allow_module_level=True)

import scale  # noqa: E402
import ray  # noqa: E402
from pipeline.engine_types import ServiceBusy  # noqa: E402
from pipeline.engine_events import EngineSpec  # noqa: E402
from pipeline.faults import FaultPlan  # noqa: E402
from pipeline.layouts import LayoutKind  # noqa: E402
from pipeline.metrics import ServiceMetrics  # noqa: E402
from pipeline.requests import GenerationRequest, RequestError  # noqa: E402
from pipeline.storage import read_parameters  # noqa: E402
from tests.helpers import engine_options, parse_samples, wait_until  # noqa: E402

REPLICAS = 2
QUEUE_SIZE = 4  # Serve counts a request as queued until a replica takes it: a burst of 4 must fit
CONCURRENT = 4
QUEUE_SETTLE_S = 0.3
TINY = dict(width=64, height=64, steps=2)
SLOW = dict(width=1024, height=1024, steps=4)  # seconds on one CPU core: holds a replica while the test acts
REPLACE_TIMEOUT_S = 90  # a replacement loads and warms up on a machine whose cores the other replica shares
POISON_PROMPT = "poison this replica's GPU"  # every replica raises a poisoned CUDA context's error for this prompt


@dataclass
class Cluster:
    engine: scale.RemoteEngine
    metrics: ServiceMetrics
    crash_dir: Path
    processes: list[psutil.Process]  # the Ray processes the cluster started: children of this one


@pytest.fixture(scope="module")
def cluster(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    spec = EngineSpec(model_dir=tiny_models[LayoutKind.SINGLE_FILE], device="cpu",
                             options=engine_options(root / "outputs"), crash_dir=root / "crashes",
                             faults=FaultPlan("poison", 1, prompt=POISON_PROMPT))
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    metrics = ServiceMetrics()
    engine = scale.start(spec, replicas=REPLICAS, num_gpus=0, queue_size=QUEUE_SIZE, metrics=metrics)
    started = [child for child in psutil.Process().children(recursive=True) if child.pid not in before]
    yield Cluster(engine, metrics, spec.crash_dir, started)
    scale.shutdown()


def generate(engine, seed: int, size=TINY, progress=None, prompt="a red cube"):
    return engine.generate(GenerationRequest(prompt=prompt, seed=seed, **size), progress=progress)


def concurrently(engine, seeds) -> list:
    with ThreadPoolExecutor(max_workers=CONCURRENT) as pool:
        return list(pool.map(lambda seed: generate(engine, seed), seeds))


def replica_pids(engine) -> dict[str, int]:
    """Replica id → pid, as the replicas report them in their results: rounds of concurrent requests until every
    replica has answered one."""
    pids: dict[str, int] = {}

    def all_answered() -> bool:
        pids.update({result.replica.id: result.replica.pid for result in concurrently(engine, range(CONCURRENT))})
        return len(pids) == REPLICAS

    wait_until(all_answered, 30, "every replica answering")
    return pids


def running_on(engine) -> list[str]:
    """The replica ids that have a request of ours running now."""
    return [entry.partition("/")[0] for entry in (engine.in_flight or "").split() if not entry.startswith("pending/")]


def sample(metrics: ServiceMetrics, name: str, **labels) -> float:
    return parse_samples(metrics.text().decode()).get((name, tuple(sorted(labels.items()))), 0.0)


def test_the_replicas_engine_states_read_as_one():
    from scale.remote_engine import summarize

    eager = dict(attention="native", compiled="no", serving="eager", text_encoder="eager")
    compiled = dict(eager, compiled="yes", serving="compiled")
    assert summarize([eager, eager]) == eager
    assert summarize([compiled, eager, compiled]) == dict(eager, compiled="no×1 yes×2",
                                                          serving="compiled×2 eager×1")
    assert summarize([]) == dict.fromkeys(eager, "unknown")


# The two failed starts come first: each starts and stops Ray of its own, before the module's cluster exists.

def test_a_start_asking_for_more_than_the_cluster_has_fails_at_once(tmp_path):
    spec = EngineSpec(model_dir=tmp_path / "model", device="cpu", options=engine_options(tmp_path / "outputs"),
                             crash_dir=tmp_path / "crashes")
    with pytest.raises(scale.ScaleError, match=r"2 replicas need 2000 GPUs \(1000 each\), but the Ray cluster has"):
        scale.start(spec, replicas=2, num_gpus=1000, queue_size=1)
    assert not ray.is_initialized()


def test_a_replica_that_cannot_load_fails_the_start_with_its_reason(tmp_path):
    spec = EngineSpec(model_dir=tmp_path / "missing", device="cpu",
                             options=engine_options(tmp_path / "outputs"), crash_dir=tmp_path / "crashes")
    with pytest.raises(scale.ScaleError, match="a replica failed to start: .*WeightsError: model directory .*missing "
                                               "does not exist"):
        scale.start(spec, replicas=1, num_gpus=0, queue_size=1)
    assert not ray.is_initialized()


def test_both_replicas_serve_concurrent_requests_with_progress_and_their_id_in_the_log(cluster, capfd):
    engine = cluster.engine
    steps: dict[int, list[tuple[int, int]]] = {seed: [] for seed in range(8)}
    with ThreadPoolExecutor(max_workers=CONCURRENT) as pool:
        results = list(pool.map(lambda seed: generate(engine, seed, progress=lambda *step: steps[seed].append(step)),
                                steps))

    assert len({result.replica.id for result in results}) == REPLICAS
    assert len({result.replica.pid for result in results} - {os.getpid()}) == REPLICAS
    for seed, result in enumerate(results):
        assert result.request.seed == seed and result.image is None  # the image stays in its file
        with Image.open(result.path) as image:
            assert image.size == (64, 64)
        assert read_parameters(result.path)["request_id"] == result.request_id
        assert steps[seed] == [(1, 2), (2, 2)]
    # Each replica's own request line carries its id: Ray forwards the replicas' stdout to the front's.
    printed = []

    def logged(result) -> bool:
        printed.append(capfd.readouterr().out)
        return f"replica={result.replica.id} request id={result.request_id} " in "".join(printed)

    # Ray's log monitor forwards a replica's output as it polls the replica's log file: on a loaded 2-core machine
    # (a fresh-clone CI run, 2026-12-07) one line took more than 10 s.
    for result in results:
        wait_until(lambda: logged(result), 60, f"the request line of {result.request_id} in the log")
    state = engine.state()
    assert (state["ready"], state["replicas_ready"], state["replicas_total"], state["busy"]) == (True, 2, 2, False)
    assert state["served"] >= len(results) and state["serving"] == "eager"
    for replica in {result.replica.id for result in results}:
        assert sample(cluster.metrics, "zimage_replica_requests_total", replica=replica, outcome="ok") >= 1
    assert sample(cluster.metrics, "zimage_replicas_ready") == REPLICAS


def test_the_engines_errors_reach_the_front_as_they_are(cluster):
    with pytest.raises(RequestError, match="width must be a multiple of 16"):
        generate(cluster.engine, 0, size=dict(width=72, height=64, steps=2))


def test_a_full_queue_is_busy(cluster):
    """Both replicas hold a slow request; QUEUE_SIZE more wait, and the next one is refused at once."""
    engine = cluster.engine
    with ThreadPoolExecutor(max_workers=REPLICAS + QUEUE_SIZE + 1) as pool:
        slow = [pool.submit(generate, engine, seed, SLOW) for seed in range(REPLICAS)]
        wait_until(lambda: len(set(running_on(engine))) == REPLICAS, 30, "both replicas running a slow request")
        assert engine.running_jobs == REPLICAS
        waiting = []
        for seed in range(QUEUE_SIZE + 1):
            waiting.append(pool.submit(generate, engine, seed))
            # One at a time: Serve compares the queue's length with its limit as a request comes in, and counts it
            # in a moment later; requests sent in the same instant would all pass. A refusal comes within
            # milliseconds, so one still pending after this long is in the queue.
            wait([waiting[-1]], timeout=QUEUE_SETTLE_S)
        outcomes = [future.exception(timeout=60) for future in waiting]
        assert [future.exception(timeout=60) for future in slow] == [None] * REPLICAS

    assert outcomes[:QUEUE_SIZE] == [None] * QUEUE_SIZE
    assert isinstance(outcomes[-1], ServiceBusy) and "busy" in str(outcomes[-1]) and "Try again" in str(outcomes[-1])
    assert sample(cluster.metrics, "zimage_requests_total", outcome="busy") == 1


def test_a_killed_replica_fails_only_its_request_and_comes_back(cluster):
    """kill -9 of the replica running a slow request: that request gets a retryable error, a 20-request run beside
    it all succeeds, and Serve starts a replacement that serves."""
    engine = cluster.engine
    pids = replica_pids(engine)
    with ThreadPoolExecutor(max_workers=3) as pool:
        doomed = pool.submit(generate, engine, 100, SLOW)
        wait_until(lambda: running_on(engine), 30, "the slow request running")
        victim = running_on(engine)[0]
        run = [pool.submit(generate, engine, seed) for seed in range(20)]
        os.kill(pids[victim], signal.SIGKILL)
        with pytest.raises(scale.ReplicaLost, match=f"replica {victim}.*Try again"):
            doomed.result(timeout=30)
        served_by = [future.result(timeout=60).replica.id for future in run]

    assert victim not in served_by
    assert sample(cluster.metrics, "zimage_replica_requests_total", replica=victim, outcome="error") == 1
    # Serve notices the death (health check), starts a replacement, and once it has loaded, it serves.
    survivor = (set(pids) - {victim}).pop()
    wait_until(lambda: engine.replica_counts() == (REPLICAS, REPLICAS) and not psutil.pid_exists(pids[victim]),
               REPLACE_TIMEOUT_S, "the replica replaced")
    replacement = set(replica_pids(engine)) - {survivor}
    assert replacement and victim not in replacement


def test_a_poisoned_gpu_ends_only_its_replica_which_comes_back(cluster):
    """A poisoned CUDA context in one replica: it writes its crash snapshot and exits, its request gets a retryable
    error, the other replica serves a 20-request run meanwhile, and Serve replaces the one that exited."""
    engine = cluster.engine
    pids = replica_pids(engine)
    with ThreadPoolExecutor(max_workers=3) as pool:
        run = [pool.submit(generate, engine, seed) for seed in range(20)]
        with pytest.raises(scale.ReplicaLost, match="Try again") as lost:
            generate(engine, 7, prompt=POISON_PROMPT)
        served_by = [future.result(timeout=60).replica.id for future in run]

    victim = next(replica for replica in pids if f"replica {replica})" in str(lost.value))
    survivor = (set(pids) - {victim}).pop()
    assert survivor in served_by
    wait_until(lambda: not psutil.pid_exists(pids[victim]), 30, "the poisoned replica's process ended")
    assert psutil.pid_exists(pids[survivor])
    [snapshot] = [json.loads(path.read_text()) for path in cluster.crash_dir.glob("*.json")]
    assert snapshot["reason"].startswith("fatal in replica: CUDA error: an illegal memory access")
    wait_until(lambda: engine.replica_counts() == (REPLICAS, REPLICAS), REPLACE_TIMEOUT_S, "the replica replaced")
    assert set(replica_pids(engine)) - {survivor, victim}


def test_shutdown_leaves_no_process(cluster):
    """Last: stops the module's cluster (the fixture's own shutdown then has nothing left to do)."""
    engine = cluster.engine
    assert cluster.processes, "no Ray process was seen to start"
    engine.stop_accepting()
    assert engine.wait_idle(timeout=5)
    with pytest.raises(ServiceBusy, match="shutting down"):
        generate(engine, 0)
    scale.shutdown()
    wait_until(lambda: not any(process.is_running() and process.status() != psutil.STATUS_ZOMBIE
                               for process in cluster.processes), 30, "every Ray process ended")
    assert not ray.is_initialized()


def test_clear_leftovers_ends_the_processes_holding_files_in_the_temp_dir_and_removes_old_sessions(tmp_path):
    from scale.cluster import clear_leftovers

    temp_dir, elsewhere = tmp_path / "zimage-ray", tmp_path / "other"
    (temp_dir / "session_2026-11-24_01-00-00_1" / "logs").mkdir(parents=True)
    elsewhere.mkdir()
    hold = "import sys, time; f = open(sys.argv[1], 'w'); print('open', flush=True); time.sleep(600)"

    def holding(path):
        process = subprocess.Popen([sys.executable, "-c", hold, str(path)], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline() == "open\n"
        return process

    leftover = holding(temp_dir / "session_2026-11-24_01-00-00_1" / "logs" / "agent.out")
    bystander = holding(elsewhere / "mine.log")
    try:
        assert clear_leftovers(temp_dir) == 1
        assert not psutil.pid_exists(leftover.pid)  # ended, and reaped by clear_leftovers' wait
        assert bystander.poll() is None
        assert list(temp_dir.iterdir()) == []
    finally:
        for process in (leftover, bystander):
            process.kill()
            process.wait()
