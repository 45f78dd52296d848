"""Start the replicas on a Ray cluster (a local one, or one joined by address) and stop them, leaving nothing behind."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import psutil
import ray
from ray import serve
from ray.exceptions import AuthenticationError

from pipeline.messages import StartupError, first_line
from pipeline.metrics import ServiceMetrics
from scale.remote_engine import RemoteEngine
from pipeline.engine_events import EngineSpec
from scale.replica import EngineReplica

log = logging.getLogger("zimage.scale")

APP_NAME = "zimage"
DEPLOYMENT_NAME = "EngineReplica"
# How soon Serve notices a replica that died between requests (one that dies mid-request is noticed at once by the
# front's call): a replacement is started only after that.
HEALTH_CHECK_PERIOD_S = 2.0
# Loading weights and warming up take long; a constructor that failed this often fails the start (weights missing,
# out of memory): the message says why, instead of Serve retrying for minutes.
MAX_CONSTRUCTOR_RETRIES = 2
DESCRIBE_TIMEOUT_S = 60


# Whether this process started the cluster it is connected to (ray.init without an address), which decides how
# shutdown() ends it. Module state, as Ray's own connection is: one per process.
_private_cluster = False


class ScaleError(StartupError):
    """The replicas cannot start as asked: too few GPUs or CPUs in the cluster, or a replica failed to load."""


def resolve_replicas(replicas: int | str, num_gpus: float, num_cpus: float) -> int:
    """`replicas` as a number ("auto": one per GPU of the cluster), checked against what the cluster has: Serve
    would otherwise wait forever for a replica no node can place."""
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 0)
    if replicas == "auto":
        if not gpus or not num_gpus:
            raise ScaleError(f"--replicas auto starts one replica per GPU, but the Ray cluster has {gpus:g} GPUs and "
                             f"each replica asks for {num_gpus:g}; give a number of replicas instead.")
        replicas = int(gpus // num_gpus)
    if not isinstance(replicas, int) or replicas < 1:
        raise ScaleError(f"replicas must be a whole number of at least 1, or auto (got {replicas!r}).")
    for kind, each, available in (("GPU", num_gpus, gpus), ("CPU", num_cpus, cpus)):
        if replicas * each > available:
            raise ScaleError(f"{replicas} replicas need {replicas * each:g} {kind}s ({each:g} each), but the Ray "
                             f"cluster has {available:g}; start fewer replicas or add hosts (ray start --address).")
    return replicas


def deployment_failure() -> str:
    """Why the deployment failed: the last line of Serve's message on it, the replica's own error (e.g.
    "pipeline.layouts.WeightsError: model directory ... does not exist ..."); the whole traceback is in the log."""
    application = serve.status().applications.get(APP_NAME)
    deployment = application.deployments.get(DEPLOYMENT_NAME) if application else None
    message = deployment.message.strip() if deployment else ""
    return message.splitlines()[-1] if message else "Serve gave no reason (the replicas' own lines in the log may)"


def clear_leftovers(temp_dir: Path) -> int:
    """End what an earlier private cluster in `temp_dir` left running, and remove its sessions' files; returns how
    many processes were ended. Written by hand because Ray does not: when the front dies by SIGKILL, Ray's reaper
    ends the GCS, the raylet and the replicas, but its DashboardAgent and RuntimeEnvAgent live on (Ray 2.60), one
    pair per crash, and every session leaves a directory of logs."""
    ended = []
    for process in psutil.process_iter():
        try:
            if any(Path(file.path).is_relative_to(temp_dir) for file in process.open_files()):
                process.kill()
                ended.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    psutil.wait_procs(ended, timeout=10)
    for session in temp_dir.glob("session_*"):
        if session.is_dir() and not session.is_symlink():
            shutil.rmtree(session, ignore_errors=True)
    if ended:
        log.warning("ended %d process(es) an earlier cluster left in %s", len(ended), temp_dir)
    return len(ended)


def start(spec: EngineSpec, *, replicas: int | str, num_gpus: float, queue_size: int, ray_address: str | None = None,
          num_cpus: float = 1, metrics: ServiceMetrics | None = None, temp_dir: Path | None = None) -> RemoteEngine:
    """Ray (a new local cluster, or the one at `ray_address`), then the deployment: `replicas` engines, each with
    `num_gpus` GPUs and `num_cpus` CPUs, one request at a time, with up to `queue_size` more waiting at the front.
    Returns once every replica has loaded and warmed up. Any failure raises ScaleError, with Ray shut down again.
    `temp_dir`: a private cluster's own (short: Ray's socket paths must fit 107 bytes), cleared of what an earlier
    one left there before it starts."""
    global _private_cluster
    if ray_address is None and temp_dir is not None:
        clear_leftovers(temp_dir)
    _private_cluster = ray_address is None
    try:
        # log_to_driver: the replicas' log lines reach the front's stdout, the one log the supervisor keeps.
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=True, configure_logging=False,
                 _temp_dir=None if ray_address or temp_dir is None else str(temp_dir))
    except (ConnectionError, RuntimeError, AuthenticationError) as error:
        if ray_address is None:
            raise ScaleError(f"cannot start a private Ray cluster: {first_line(error)}") from None
        raise ScaleError(f"cannot join the Ray cluster at {ray_address}: {first_line(error)}. Is `ray start --head` "
                         f"running there, and is this host's Ray token (RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token) "
                         f"the one it was started with?") from None
    try:
        count = resolve_replicas(replicas, num_gpus, num_cpus)
        deployment = serve.deployment(
            EngineReplica, name=DEPLOYMENT_NAME, num_replicas=count, max_ongoing_requests=1,
            max_queued_requests=queue_size, ray_actor_options={"num_gpus": num_gpus, "num_cpus": num_cpus},
            health_check_period_s=HEALTH_CHECK_PERIOD_S, max_constructor_retry_count=MAX_CONSTRUCTOR_RETRIES,
            # Serve's own line per call ("CALL generate OK 33.4ms") repeats the engine's request line.
            logging_config={"enable_access_log": False})
        # No Serve HTTP proxy: the front is the only way in.
        serve.start(proxy_location="Disabled")
        try:
            handle = serve.run(deployment.bind(spec), name=APP_NAME, route_prefix=None)
        except RuntimeError:
            raise ScaleError(f"a replica failed to start: {deployment_failure()}") from None
        described = handle.describe.remote().result(timeout_s=DESCRIBE_TIMEOUT_S)
    except BaseException:
        shutdown()
        raise
    log.info("replicas ready count=%d num_gpus=%g num_cpus=%g queue_size=%d ray_address=%s", count, num_gpus,
             num_cpus, queue_size, ray_address or "local")
    return RemoteEngine(handle, app_name=APP_NAME, deployment_name=DEPLOYMENT_NAME, replicas=count,
                        queue_size=queue_size, limits=spec.options.limits, output_dir=spec.options.output_dir,
                        memory_guard=described["memory_guard"], engine_state=described["engine_state"],
                        metrics=metrics)


def shutdown() -> None:
    """A joined cluster: the deployment and Serve's own actors deleted, then this process disconnected; the nodes
    stay (they are `ray start`'s), without our replicas. A private cluster: Ray ends all its processes, the
    replicas and Serve's controller with them. Not through serve.shutdown() there: under supervisor, `stop` sends
    SIGTERM to the whole process group, the cluster's processes included, and serve.shutdown() then waits 30 s for a
    controller that is already gone (past the default stopwaitsecs, so the stop would end in SIGKILL)."""
    if ray.is_initialized():
        if not _private_cluster:
            serve.shutdown()
        ray.shutdown()
    log.info("replicas shut down")
