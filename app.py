"""Z-Image-Turbo service: settings → logging → load the model once → serve the UI on 127.0.0.1:7860.

    python app.py --demo                       # tiny random-weight model, built on first use
    python app.py --model-dir /srv/zimage      # the real weights (layout A or B, see README)
    python app.py --help                       # every flag
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
from importlib import metadata
from pathlib import Path

import pipeline  # noqa: F401  (must come before any Hugging Face import: it turns their network use off)
from config import Settings, SettingsError, load_settings
from config import log_lines
from config.log_lines import seconds_since_process_start
from config.lock import unlocked_libraries
from config.settings import PROJECT_DIR
from webui.connections import OccasionalRepeats, check_port_free, raise_fd_limit

log = logging.getLogger("zimage.app")


def configure_logging(level: str) -> None:
    """The service's log lines (config.log_lines), and one line an interval for what floods asyncio's and uvicorn's
    loggers."""
    log_lines.configure_logging(level, libraries=False)  # start_service routes them, once the weights are found
    repeats = OccasionalRepeats()
    for flooded in ("asyncio", "uvicorn.error"):
        logging.getLogger(flooded).addFilter(repeats)


def log_banner(settings: Settings) -> None:
    import torch

    try:
        version = metadata.version("z-image-turbo-service")
    except metadata.PackageNotFoundError:
        version = "unknown (not installed: run scripts/setup.sh)"
    if torch.cuda.is_available():
        # The device's properties, not its free memory: that would give this process a CUDA context (seconds, and
        # GPU memory) that it does not need when the engine runs in a process of its own.
        properties = torch.cuda.get_device_properties(0)
        gpu = f"{properties.name!r} gpu_memory_gib={properties.total_memory / 2**30:.1f}"
    else:
        gpu = "none"
    # seconds_since_process_start: the imports, the first share of a start's account (the ready line gives the
    # whole). Versions from the installed metadata: importing diffusers and transformers here would cost seconds
    # in a process that, with an engine process, never uses them.
    log.info("start version=%s pid=%d python=%s torch=%s diffusers=%s transformers=%s gradio=%s uvicorn=%s gpu=%s "
             "seconds_since_process_start=%.2f", version, os.getpid(), platform.python_version(), torch.__version__,
             metadata.version("diffusers"), metadata.version("transformers"), metadata.version("gradio"),
             metadata.version("uvicorn"), gpu, seconds_since_process_start())
    for sentence in unlocked_libraries():
        log.warning("UNLOCKED: %s", sentence)
    log.info("settings %s", " ".join(f"{key}={value}" for key, value in settings.as_log_fields().items()))


def stop_child_processes(timeout_s: float = 3.0) -> None:
    """Children (compile workers, anything a library spawned) must not outlive the service: supervisor's
    stopasgroup only sends them the SIGTERM they may ignore, and killasgroup acts only if *we* overstay."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        child.terminate()
    _, alive = psutil.wait_procs(children, timeout=timeout_s)
    for child in alive:
        log.warning("child pid=%d ignored SIGTERM; killing it", child.pid)
        child.kill()
    psutil.wait_procs(alive, timeout=timeout_s)


def use_private_gradio_temp_dir(port: int) -> Path:
    """Gradio copies every file it serves (the PNG download) into its temp dir, /tmp/gradio by default: shared with
    every user of the machine, and kept forever. This service's own (one per port: instances side by side do not
    share one), readable by its user only and emptied at each start (it holds copies; the images themselves are in
    the output dir). GRADIO_TEMP_DIR, when set, is kept. Must run before Gradio is imported: it reads it then."""
    configured = os.environ.get("GRADIO_TEMP_DIR")
    temp_dir = Path(configured) if configured else PROJECT_DIR / ".cache" / "gradio-temp" / str(port)
    if not configured:
        shutil.rmtree(temp_dir, ignore_errors=True)
        os.environ["GRADIO_TEMP_DIR"] = str(temp_dir)
    temp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    temp_dir.chmod(0o700)
    log.info("gradio temp dir %s (mode 700%s)", temp_dir, ", from GRADIO_TEMP_DIR" if configured else ", emptied")
    return temp_dir


def import_ui_in_background(loads_here: bool) -> threading.Thread:
    """Gradio's import is seconds of pure Python. Run it while the weights load (file reads and copies to the GPU,
    which release the interpreter), so "ready" comes that much sooner after a restart. A failed import is not lost:
    main's own import of the UI raises it again, with its traceback. `loads_here`: this process loads the weights
    (no engine process, no replicas), and imports the model libraries first, in this thread."""
    if loads_here:
        from pipeline.loader import import_model_libraries

        import_model_libraries()

    def import_ui() -> None:
        with contextlib.suppress(Exception):
            importlib.import_module("webui.ui")
            # Gradio switches matplotlib's backend around every event, importing pyplot where matplotlib is
            # installed (it is no dependency of ours): 0.3 s on the first request after a start, and 4.6 s measured
            # on a machine without matplotlib's font cache. Imported here, it costs no request anything.
            if importlib.util.find_spec("matplotlib") is not None:
                importlib.import_module("matplotlib.pyplot")

    thread = threading.Thread(target=import_ui, name="import-ui", daemon=True)
    thread.start()
    return thread


def model_source(settings: Settings) -> tuple[Path, str]:
    """The weights directory to load (the demo model built there first, with --demo) and the model's name."""
    from pipeline.random_model import ensure_demo_model

    if settings.demo:
        log.warning("DEMO MODEL: serving a tiny random-weight model from %s; its images are noise", settings.demo_dir)
        return ensure_demo_model(settings.demo_dir), "DEMO tiny random-weight model"
    return settings.model_dir, "Z-Image-Turbo"


def read_weights_ahead(settings: Settings):
    """Start reading the weight files onto their devices, so the reads overlap the imports that come next
    (pipeline/read_ahead.py). None for the demo model (tiny, and maybe not built yet), with an engine process or
    --replicas (this process loads no weights), and for a device that is not there (load_model says so)."""
    if settings.demo or settings.replicas != "0" or settings.engine_process:
        return None
    from pipeline.loader import DeviceError, resolve_device
    from pipeline.read_ahead import ReadAhead

    try:
        device = resolve_device(settings.device)
    except DeviceError:
        return None
    return ReadAhead.of_model(settings.model_dir, device)


def load_model(settings: Settings, read_ahead):
    """The weights, loaded once onto the configured device, with the device-wide settings applied first.
    `read_ahead`: from read_weights_ahead."""
    from pipeline.acceleration import load_for_serving
    from pipeline.loader import resolve_device

    model_dir, model_name = model_source(settings)
    device = resolve_device(settings.device)
    if device.type != "cuda" and (settings.compile or settings.low_vram or settings.gpu_memory_limit_gib):
        log.info("compile, low_vram and gpu_memory_limit_gib apply on CUDA only; the CPU runs the model eagerly")
    loaded = load_for_serving(model_dir, device, verify=settings.verify_weights,
                              compile_cache_dir=settings.compile_cache_dir if settings.compile else None,
                              low_vram=settings.low_vram, gpu_memory_limit_gib=settings.gpu_memory_limit_gib,
                              read_ahead=read_ahead)
    return loaded, model_name


def engine_options(settings: Settings, model_name: str, on_gpu: bool):
    """The engine's slice of the settings: the one place Settings become EngineOptions."""
    from pipeline.engine_types import EngineOptions
    from pipeline.requests import Limits

    return EngineOptions(
        limits=Limits(max_h=settings.max_h, max_w=settings.max_w), output_dir=settings.output_dir,
        model_name=model_name, attention=settings.attention, nan_check=settings.nan_check,
        log_prompts=settings.log_prompts, hang_timeout_s=settings.hang_timeout_s,
        queue_timeout_s=settings.queue_timeout_s, compile_model=on_gpu and settings.compile,
        prompt_cache_size=settings.prompt_cache_size,
        gpu_memory_limit_bytes=settings.gpu_memory_limit_gib * 2**30 if on_gpu else 0,
        lora_dir=adapter_folder(settings), lora_max_rank=settings.lora_max_rank,
    )


def adapter_folder(settings: Settings) -> Path:
    """--lora-dir, or the folder "loras" beside the weights (the demo model's too)."""
    if settings.lora_dir:
        return Path(settings.lora_dir).expanduser()
    return (settings.demo_dir if settings.demo else settings.model_dir) / "loras"


def start_engine(settings: Settings, faults, loaded, model_name: str, metrics):
    """The engine around the loaded pipeline, warmed up (and so ready). Compilation, where on, starts later, from
    webui.server.serve once the first request is answered: minutes of Python that would slow the start and it."""
    from pipeline.engine import Engine
    from pipeline.snapshot import exit_on_fatal

    options = engine_options(settings, model_name, on_gpu=loaded.device.type == "cuda")
    engine = Engine(loaded, options, faults=faults, on_fatal=exit_on_fatal(settings.crash_dir), metrics=metrics)
    engine.warm_up()
    return engine, f"{model_name} ({loaded.source})"


def engine_spec(settings: Settings, faults):
    """What an engine process or a replica builds its engine from, and the model's name."""
    from pipeline.engine_events import EngineSpec
    from pipeline.loader import resolve_device
    from webui.resolutions import offered_sizes

    model_dir, model_name = model_source(settings)
    # A replica runs on the same kind of device as this host offers (CUDA_VISIBLE_DEVICES narrows each to one).
    on_gpu = resolve_device(settings.device).type == "cuda"
    return EngineSpec(
        model_dir=model_dir, device=settings.device, options=engine_options(settings, model_name, on_gpu=on_gpu),
        crash_dir=settings.crash_dir, verify_weights=settings.verify_weights,
        compile_cache_dir=settings.compile_cache_dir, low_vram=settings.low_vram,
        compile_delay_s=settings.compile_delay_s, log_level=settings.log_level, faults=faults,
        plan_sizes=tuple(offered_sizes(settings.max_w, settings.max_h))), model_name


def start_engine_process(settings: Settings, faults, metrics, first):
    """The engine in a child process that this one restarts when it dies (pipeline.engine_process), started and
    ready; the web side stays in this process. `first`: the engine process started for it (engine_spawn)."""
    from pipeline.engine_process import ProcessEngine

    spec, model_name = engine_spec(settings, faults)
    engine = ProcessEngine(spec, metrics=metrics, first=first)
    engine.start()
    return engine, f"{model_name} ({engine.source})"


def start_replicas(settings: Settings, faults, metrics):
    """The engines as Ray Serve replicas (scale/, the optional extra), each loading the weights on its own GPU; this
    process is only the front and loads none. Ray is imported here and nowhere on the single-GPU path."""
    try:
        import scale
    except ImportError as error:
        from pipeline.messages import StartupError

        raise StartupError(f"--replicas needs Ray Serve, which is not installed ({error}); install the scale extra "
                           f"with scripts/setup.sh --scale, or leave --replicas at 0") from None
    from pipeline.loader import resolve_device

    spec, model_name = engine_spec(settings, faults)
    replicas = settings.replicas if settings.replicas == "auto" else int(settings.replicas)
    engine = scale.start(spec, replicas=replicas, num_gpus=1 if resolve_device(settings.device).type == "cuda" else 0,
                         queue_size=settings.queue_size, ray_address=settings.ray_address or None, metrics=metrics,
                         temp_dir=Path(tempfile.gettempdir()) / f"zimage-ray-{settings.port}")
    return engine, f"{model_name} ({engine.replicas} replicas)"


def start_service(settings: Settings, read_ahead):
    """Everything between settings and serving: the output dir checked, the weights loaded, the engine warmed up.
    Any problem a person must fix raises a StartupError (pipeline.messages) naming it. `read_ahead`: from
    read_weights_ahead."""
    from pipeline.layouts import find_weights
    from pipeline.output_dir import prepare_output_dir

    if not settings.demo and settings.replicas == "0":
        # First (headers only: milliseconds, before torch, diffusers and gradio are imported): weights that cannot
        # load end the start well inside supervisord's startsecs, so its retries and FATAL tell the story in
        # seconds. Replicas may run on hosts of their own, with the weights where those keep them.
        find_weights(settings.model_dir)
    prepare_output_dir(settings.output_dir)
    first_engine = None
    if settings.engine_process and settings.replicas == "0":
        from pipeline.engine_spawn import spawn_engine_process

        # Now, before this process imports torch: the engine process's imports (seconds) run beside this one's, not
        # after them. This process never imports diffusers or transformers: the engine process runs the model.
        first_engine = spawn_engine_process()
    else:
        log_lines.route_library_logs()
    from pipeline.faults import FaultPlan
    from pipeline.metrics import ServiceMetrics
    from pipeline.snapshot import enable_fault_tracebacks, install_snapshot_hooks
    from pipeline.storage import remove_partial_files

    # Here, not in an engine: replicas share the output dir, and one that starts (a replacement) while another
    # saves would delete that save's file mid-write. This process starts before every engine it serves.
    if removed := remove_partial_files(settings.output_dir):
        log.warning("removed %d partial image file(s) left by an interrupted save in %s", removed,
                    settings.output_dir)
    enable_fault_tracebacks()
    faults = FaultPlan.from_env(os.environ)
    faults.at_start()
    use_private_gradio_temp_dir(settings.port)
    ui_import = import_ui_in_background(loads_here=settings.replicas == "0" and not settings.engine_process)
    metrics = ServiceMetrics()
    if settings.replicas != "0":
        ui_import.join()
        engine, model_label = start_replicas(settings, faults, metrics)
    elif settings.engine_process:
        # Loaded before the UI's imports are done: the engine process imports its libraries and loads the weights
        # in a process of its own, and a restart of the service waits for the two side by side, not in a row.
        engine, model_label = start_engine_process(settings, faults, metrics, first_engine)
        ui_import.join()
    else:
        loaded, model_name = load_model(settings, read_ahead)
        # The attention probe and the warm-up time GPU work: no import competing with them for the interpreter.
        ui_import.join()
        engine, model_label = start_engine(settings, faults, loaded, model_name, metrics)
    install_snapshot_hooks(settings.crash_dir, engine.state)
    return engine, metrics, model_label


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
        check_port_free(settings.host, settings.port)  # before minutes of loading, not after
    except SettingsError as error:
        print(f"app.py: error: {error}", file=sys.stderr)
        return 2
    read_ahead = read_weights_ahead(settings)  # first: the imports configure_logging starts overlap the reads
    configure_logging(settings.log_level)
    log_banner(settings)
    credentials = settings.credentials()
    if settings.exposed and not credentials:
        log.warning("INSECURE: serving host %s without authentication (--insecure-public); anyone who reaches it "
                    "can use the GPU and see every image", settings.host)
    for warning in settings.credential_warnings(argv):
        log.warning("INSECURE: %s", warning)
    if link_warning := settings.link_warning():
        log.warning("%s", link_warning)
    max_connections = raise_fd_limit(settings.max_connections)

    from pipeline.messages import StartupError

    try:
        engine, metrics, model_label = start_service(settings, read_ahead)
    except StartupError as error:
        log.error("cannot start: %s", error)
        return error.exit_code

    from webui.admission import AdmissionLine
    from webui.editor_uploads import UploadFolder
    from webui.gradio_surface import upload_folder
    from webui.server import serve
    from webui.ui import build_ui

    line = AdmissionLine(capacity=settings.queue_size, parallel=engine.parallel_jobs, metrics=metrics)
    uploads = UploadFolder(upload_folder(), max_bytes=settings.max_upload_mb * 10**6,
                           max_pixels=settings.max_upload_megapixels * 10**6)
    blocks = build_ui(engine, line, uploads, demo=settings.demo, model_label=model_label, max_w=settings.max_w,
                      max_h=settings.max_h)
    exit_code = serve(blocks, engine, line, host=settings.host, port=settings.port,
                      shutdown_grace_s=settings.shutdown_grace_s, metrics=metrics,
                      credentials=credentials, max_connections=max_connections,
                      header_timeout_s=settings.header_timeout_s, send_timeout_s=settings.send_timeout_s,
                      ssl_certfile=settings.ssl_certfile, ssl_keyfile=settings.ssl_keyfile,
                      public_url=settings.public_url, trusted_proxies=settings.trusted_proxy,
                      compile_delay_s=settings.compile_delay_s,
                      recycle=engine.recycle if settings.engine_process and settings.replicas == "0" else None,
                      uploads=uploads)
    if settings.replicas != "0":
        import scale

        scale.shutdown()  # Serve's actors and a private cluster's processes, before the last sweep of children
    elif settings.engine_process:
        engine.close()  # before the sweep below: the keeper would start another in place of one it ends
    stop_child_processes()
    return exit_code


if __name__ == "__main__":
    exit_code = main()
    logging.shutdown()
    # os._exit: a job abandoned at shutdown still runs in a worker thread, and a normal exit would wait for it.
    os._exit(exit_code)
