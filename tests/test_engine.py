import contextvars
import logging
import sys
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline import attention
from pipeline.engine import COMPILE_SWITCH_INTERVAL_S, Engine, GenerationError, ServiceBusy
from pipeline.memory import GIB, Line, MemoryGuard
from pipeline.requests import GenerationRequest, RequestError
from pipeline.storage import read_parameters
from pipeline.text_encoder import PromptEncoder
from tests.helpers import SMALL, engine_options, engine_with

# Proving the compiler waits for a request needs a window in which it does not start; without that wait the compile
# thread would report "compiling" within milliseconds of its start.
COMPILE_NOT_STARTED_WINDOW_S = 0.25


def _pixels(result):
    return np.asarray(result.image)


def test_same_seed_same_pixels(engine):
    first = engine.generate(GenerationRequest("a red fox", seed=11, **SMALL))
    second = engine.generate(GenerationRequest("a red fox", seed=11, **SMALL))
    np.testing.assert_array_equal(_pixels(first), _pixels(second))
    assert first.path != second.path


def test_different_seeds_prompts_and_shifts_change_the_image(engine):
    base = _pixels(engine.generate(GenerationRequest("a red fox", seed=11, **SMALL)))
    for change in ({"seed": 12}, {"prompt": "一只红狐狸"}, {"shift": 6.0}):
        fields = {"prompt": "a red fox", "seed": 11, **SMALL, **change}
        assert not np.array_equal(base, _pixels(engine.generate(GenerationRequest(**fields)))), change


def test_random_seed_is_returned_and_reproduces_the_image(engine):
    drawn = engine.generate(GenerationRequest("a red fox", seed=None, **SMALL))
    again = engine.generate(GenerationRequest("a red fox", seed=drawn.request.seed, **SMALL))
    np.testing.assert_array_equal(_pixels(drawn), _pixels(again))


def test_result_has_the_requested_size_and_is_saved_with_its_parameters(engine):
    result = engine.generate(GenerationRequest("  a lighthouse  ", width=192, height=128, steps=2, seed=5,
                                               shift=2.5))
    assert result.image.size == (192, 128)
    saved = read_parameters(result.path)
    assert saved["prompt"] == "a lighthouse" and saved["seed"] == 5 and saved["steps"] == 2
    assert (saved["width"], saved["height"], saved["shift"], saved["guidance_scale"]) == (192, 128, 2.5, 0.0)
    assert saved["request_id"] == result.request_id and saved["model"] == "tiny test model"
    assert result.path.is_relative_to(engine.output_dir)


def test_progress_is_reported_for_every_step(engine):
    seen = []
    engine.generate(GenerationRequest("x", seed=1, **SMALL), progress=lambda step, total: seen.append((step, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_every_request_runs_on_one_gpu_thread_whichever_thread_calls(engine):
    """cuDNN's attention plans and cuBLAS handles are per thread: callers on many threads must not rebuild them."""
    ran_on = []
    hook = engine.pipeline.transformer.register_forward_pre_hook(
        lambda _module, _args: ran_on.append(threading.get_ident()))
    variable = contextvars.ContextVar("caller")
    seen_by_progress = []

    def call(name):
        variable.set(name)
        engine.generate(GenerationRequest(f"from {name}", seed=1, **SMALL),
                        progress=lambda _step, _total: seen_by_progress.append(variable.get(None)))

    try:
        callers = [threading.Thread(target=call, args=(f"caller {n}",)) for n in range(3)]
        for caller in callers:
            caller.start()
            caller.join()
    finally:
        hook.remove()
    assert len(ran_on) == 3 * SMALL["steps"] and len(set(ran_on)) == 1
    assert ran_on[0] not in {caller.ident for caller in callers} | {threading.get_ident()}
    # The progress callback runs in its caller's context (Gradio's progress bar finds its request through it).
    assert seen_by_progress == [f"caller {n}" for n in range(3) for _ in range(SMALL["steps"])]


def test_timings_cover_every_stage(engine):
    timings = engine.generate(GenerationRequest("x", seed=1, **SMALL)).timings
    stages = timings.encode_ms + timings.denoise_ms + timings.decode_ms + timings.save_ms
    assert all(value > 0 for value in (timings.encode_ms, timings.denoise_ms, timings.decode_ms, timings.save_ms))
    assert stages <= timings.total_ms + 1


def test_bad_input_is_refused_before_any_work_and_nothing_is_saved(engine):
    for request in (GenerationRequest(""), GenerationRequest("x", width=100), GenerationRequest("x", width=2048)):
        with pytest.raises(RequestError):
            engine.generate(request)
    assert not engine.output_dir.exists()
    assert engine.generate(GenerationRequest("still working", seed=1, **SMALL)).path.is_file()


def test_long_prompt_is_cut_with_a_notice(engine):
    result = engine.generate(GenerationRequest("cat " * 700, seed=1, **SMALL))
    assert any("only the first 512" in notice for notice in result.notices)
    assert engine.generate(GenerationRequest("cat", seed=1, **SMALL)).notices == ()


@pytest.fixture
def nan_vae(loaded_tiny):
    weight = loaded_tiny.pipe.vae.decoder.conv_out.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0, 0, 0] = float("nan")
    yield
    with torch.no_grad():
        weight.copy_(saved)


def test_nan_output_is_refused_and_not_saved(engine, nan_vae):
    with pytest.raises(GenerationError, match="NaN"):
        engine.generate(GenerationRequest("x", seed=1, **SMALL))
    assert not engine.output_dir.exists()


def test_nan_check_can_be_turned_off(loaded_tiny, tmp_path, nan_vae):
    unchecked = Engine(loaded_tiny, engine_options(tmp_path, nan_check=False))
    assert unchecked.generate(GenerationRequest("x", seed=1, **SMALL)).path.is_file()


@pytest.fixture
def black_vae(loaded_tiny):
    conv = loaded_tiny.pipe.vae.decoder.conv_out
    saved = conv.weight.detach().clone(), conv.bias.detach().clone()
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.fill_(-5.0)  # every pixel decodes far below -1, i.e. black
    yield
    with torch.no_grad():
        conv.weight.copy_(saved[0])
        conv.bias.copy_(saved[1])


def test_black_output_is_refused(engine, black_vae):
    with pytest.raises(GenerationError, match="all-black"):
        engine.generate(GenerationRequest("x", seed=1, **SMALL))


def test_missing_backend_falls_back_to_sdpa_with_one_warning(loaded_tiny, tmp_path, caplog):
    for choice in ("xformers", "flash"):
        caplog.clear()
        engine = Engine(loaded_tiny, engine_options(tmp_path, attention=choice))
        assert engine.attention_backend is None  # the probe is slow work: warm_up's, not the constructor's
        engine.warm_up()
        assert engine.attention_backend == attention.SDPA
        warnings = [r for r in caplog.records if r.levelname == "WARNING" and r.name == "zimage.attention"]
        assert len(warnings) == 1 and f"attention={choice} is not usable" in warnings[0].getMessage()


@pytest.fixture
def attention_put_back(loaded_tiny):
    """For a test that sets the shared transformer's attention backend itself: SDPA again afterwards, on the
    transformer and as diffusers' process-wide active backend, as every engine here sets them."""
    yield
    loaded_tiny.pipe.transformer.set_attention_backend(attention.SDPA)


def test_backend_that_fails_its_first_call_falls_back_at_warm_up(loaded_tiny, tmp_path, caplog, attention_put_back,
                                                                 monkeypatch):
    # cuDNN attention is accepted by diffusers but has no CPU kernel: it fails on its first real call.
    monkeypatch.setattr(attention, "candidates", lambda _choice, _device_type: ["_native_cudnn", attention.SDPA])
    engine = Engine(loaded_tiny, engine_options(tmp_path))
    engine.warm_up()
    assert engine.ready and engine.attention_backend == attention.SDPA
    assert any("failed its first call" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert engine.generate(GenerationRequest("x", seed=1, **SMALL)).path.is_file()


def test_engine_is_not_ready_before_warm_up(engine):
    assert engine.ready is False
    engine.warm_up()
    assert engine.ready is True


def test_wait_idle_waits_for_a_running_request(engine):
    started, release = threading.Event(), threading.Event()

    def held_progress(step, total):
        started.set()
        release.wait(30)

    worker = threading.Thread(target=lambda: engine.generate(GenerationRequest("x", seed=1, **SMALL),
                                                             progress=held_progress))
    worker.start()
    assert started.wait(10)
    assert engine.wait_idle(timeout=0.1) is False
    release.set()
    assert engine.wait_idle(timeout=30) is True
    worker.join()
    assert engine.served == 1 and engine.state()["busy"] is False


def test_draining_engine_refuses_new_requests(engine):
    engine.stop_accepting()
    with pytest.raises(GenerationError, match="shutting down"):
        engine.generate(GenerationRequest("x", seed=1, **SMALL))


def test_a_new_engine_leaves_a_save_in_progress_in_the_shared_output_dir_alone(loaded_tiny, tmp_path):
    """A replacement replica starts while another replica writes into the same dir: the other's temporary file
    is not its to delete (the service clears leftovers once, before any engine starts)."""
    saving = tmp_path / "outputs" / "2026-11-24" / ".050048-b6e6d9326301-seed3-x.tmp"
    saving.parent.mkdir(parents=True)
    saving.write_bytes(b"\x89PNG being written")
    engine_with(loaded_tiny, tmp_path)
    assert saving.exists()


def test_an_output_dir_that_cannot_take_images_refuses_the_request_before_any_gpu_work(loaded_tiny, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")  # where the output directory's parent should be: unwritable even for root
    engine = Engine(loaded_tiny, engine_options(blocker / "outputs"))
    calls = []
    hooks = [module.register_forward_hook(lambda *args: calls.append(1))
             for module in (engine._pipe.text_encoder, engine._pipe.transformer)]
    try:
        with pytest.raises(ServiceBusy, match="cannot save images right now"):
            engine.generate(GenerationRequest("never drawn", seed=1, **SMALL))
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [] and engine.served == 0
    assert engine.output_dir_problem().endswith(f"(missing; its parent {blocker}) is not a directory")
    blocker.unlink()  # fixed: the next request is served
    assert engine.generate(GenerationRequest("drawn", seed=1, **SMALL)).path.is_file()


def test_out_of_memory_fails_that_request_only_and_the_next_ones_are_unharmed(loaded_tiny, tmp_path, caplog):
    from pipeline.faults import FaultPlan

    engine = engine_with(loaded_tiny, tmp_path, FaultPlan("oom", 2, every=2))
    first = engine.generate(GenerationRequest("a red fox", seed=11, **SMALL))
    with pytest.raises(GenerationError, match="Out of GPU memory at 128×128; try a smaller size"):
        engine.generate(GenerationRequest("a red fox", seed=11, **SMALL))
    third = engine.generate(GenerationRequest("a red fox", seed=11, **SMALL))
    np.testing.assert_array_equal(_pixels(first), _pixels(third))
    assert len(list(engine.output_dir.rglob("*.png"))) == 2
    assert "CUDA out of memory" in caplog.text and "outcome=oom" in caplog.text
    assert engine.state()["healthy"] and not engine.state()["busy"]


def test_nan_latents_are_refused_by_the_check(loaded_tiny, tmp_path):
    from pipeline.faults import FaultPlan

    engine = engine_with(loaded_tiny, tmp_path, FaultPlan("nan", 2))
    with pytest.raises(GenerationError, match="NaN"):
        engine.generate(GenerationRequest("x", seed=1, **SMALL))
    assert not engine.output_dir.exists()


def test_poisoned_gpu_error_goes_to_the_fatal_handler(loaded_tiny, tmp_path):
    from pipeline.faults import FaultPlan

    seen = []
    engine = engine_with(loaded_tiny, tmp_path, FaultPlan("poison", 1),
                         on_fatal=lambda error, state: seen.append((error, state)))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        engine.generate(GenerationRequest("a poisoned request", seed=1, **SMALL))
    [(error, state)] = seen
    assert "illegal memory access" in str(error)
    assert state["healthy"] is False and state["in_flight"] and "a poisoned request" in state["recent_prompts"][0]


@pytest.mark.parametrize(("message", "poisoned"), [
    ("CUDA error: an illegal memory access was encountered", True),
    ("CUDA error: device-side assert triggered", True),
    ("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx", True),
    ("mat1 and mat2 shapes cannot be multiplied", False),
])
def test_poisoned_context_errors_are_told_apart(message, poisoned):
    from pipeline.engine import is_poisoned_gpu_error

    assert is_poisoned_gpu_error(RuntimeError(message)) is poisoned
    assert is_poisoned_gpu_error(torch.OutOfMemoryError("CUDA error: out of memory")) is False


def test_a_generation_past_the_hang_timeout_dumps_stacks_and_goes_to_the_fatal_handler(loaded_tiny, tmp_path, capfd):
    import threading

    fatal = threading.Event()
    seen = []

    def on_fatal(error, state):
        seen.append((error, state))
        fatal.set()

    engine = engine_with(loaded_tiny, tmp_path, hang_timeout_s=1, on_fatal=on_fatal)

    def stuck(step, total):
        fatal.wait(30)  # a GPU call that does not return, until the detector has acted

    engine.generate(GenerationRequest("x", seed=1, **SMALL), progress=stuck)
    [(error, state)] = seen
    assert isinstance(error, TimeoutError) and state["healthy"] is False
    dump = capfd.readouterr().err  # faulthandler's stacks of every thread: the stuck one and the detector
    assert "in stuck" in dump and "in _watch" in dump


def test_running_out_of_ram_fails_that_request_only(engine, caplog):
    def exhausted(step, total):
        raise MemoryError("cannot allocate 2 GiB")

    with pytest.raises(GenerationError, match="Out of memory at 128×128; try a smaller size"):
        engine.generate(GenerationRequest("x", seed=1, **SMALL), progress=exhausted)
    assert "outcome=oom" in caplog.text
    assert engine.generate(GenerationRequest("x", seed=1, **SMALL)).path.is_file()


def test_the_unpadded_prompt_gives_the_embeddings_padding_to_512_gives(engine):
    padded, _ = engine._pipe.encode_prompt("a red bicycle against a blue wall", device=engine.device,
                                           do_classifier_free_guidance=False, max_sequence_length=512)
    unpadded, _ = engine.encode_prompt("a red bicycle against a blue wall")
    assert padded[0].shape == unpadded[0].shape
    torch.testing.assert_close(unpadded[0], padded[0], rtol=1e-4, atol=1e-4)


def test_the_text_encoder_runs_without_cudnn_attention_and_the_rest_keeps_it(engine):
    seen = []
    hook = engine.pipeline.text_encoder.register_forward_pre_hook(
        lambda *args: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    try:
        engine.encode_prompt("a prompt of a new length for the plan cache")
    finally:
        hook.remove()
    assert seen == [False]
    assert torch.backends.cuda.cudnn_sdp_enabled()  # the DiT's attention is the probe's choice, untouched


def test_a_repeated_prompt_skips_the_text_encoder_and_gives_the_same_image(loaded_tiny, tmp_path):
    engine = engine_with(loaded_tiny, tmp_path, prompt_cache_size=2)
    first = engine.generate(GenerationRequest("a cached prompt", width=256, height=256, steps=2, seed=5))
    calls = []
    hook = engine._pipe.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        again = engine.generate(GenerationRequest("a cached prompt", width=256, height=256, steps=2, seed=5))
        other = engine.generate(GenerationRequest("another prompt", width=256, height=256, steps=2, seed=5))
    finally:
        hook.remove()
    assert np.array_equal(_pixels(again), _pixels(first))
    assert len(calls) == 1  # only "another prompt" reached the encoder
    assert not np.array_equal(_pixels(other), _pixels(first))


def test_the_memory_guard_refuses_a_size_that_cannot_fit_before_any_work(loaded_tiny, tmp_path, caplog):
    engine = engine_with(loaded_tiny, tmp_path)
    engine.memory_guard = MemoryGuard(available_bytes=GIB, denoise=Line(0.1 * GIB, 1000), decode=Line(0, 0))
    caplog.set_level(logging.INFO, logger="zimage.engine")
    with pytest.raises(RequestError, match="needs about .* GiB of GPU memory"):
        engine.generate(GenerationRequest("too big", width=1024, height=1024, steps=1, seed=1))
    assert engine.served == 0 and not list(engine.output_dir.rglob("*.png"))
    assert "outcome=rejected" in caplog.text
    assert engine.generate(GenerationRequest("fits", width=256, height=256, steps=1, seed=1)).path.is_file()


def test_compiled_engine_matches_eager_and_never_recompiles_once_live(loaded_tiny, tmp_path):
    """One compile (minutes of CPU) for every check: the compiled path's pixels, with and without LoRA adapters,
    and no graph compiled after it went live, for prompt lengths from one word to over the token budget, sizes of
    every shape, adapters switched between requests (none, A, B, A+B, A at another strength, none), and edits."""
    from torch._dynamo.utils import counters

    from pipeline.random_adapters import KeyFormat, write_random_adapter

    folder = tmp_path / "loras"
    write_random_adapter(folder / "a.safetensors", KeyFormat.KOHYA, rank=4, seed=1, std=0.2)
    write_random_adapter(folder / "b.safetensors", KeyFormat.DIFFUSERS, rank=8, seed=2, std=0.2)
    request = GenerationRequest("a lighthouse at dusk", width=256, height=384, steps=2, seed=9)
    styled = replace(request, loras=[{"name": "a", "scale": 0.7}, {"name": "b", "scale": -0.4}])
    eager_engine = engine_with(loaded_tiny, tmp_path / "eager", lora_dir=folder, lora_max_rank=16)
    eager, eager_styled = eager_engine.generate(request), eager_engine.generate(styled)
    engine = engine_with(loaded_tiny, tmp_path / "compiled", compile_model=True, lora_dir=folder, lora_max_rank=16)
    assert (engine.state()["compiled"], engine.state()["serving"]) == ("pending", "eager")
    engine.start_background_work().join()
    assert (engine.state()["compiled"], engine.state()["serving"]) == ("on", "compiled")
    graphs_when_live = counters["stats"]["unique_graphs"]

    for compiled, wanted in ((engine.generate(request), eager), (engine.generate(styled), eager_styled)):
        difference = np.abs(np.asarray(compiled.image, dtype=int) - np.asarray(wanted.image, dtype=int))
        assert difference.max() <= 2  # compiler rounding only
    assert not np.array_equal(np.asarray(eager.image), np.asarray(eager_styled.image))
    # Not below the smallest warm-up (256²): on the CPU, each VAE convolution switches kernels under its own size
    # threshold, so tinier images compile again there (CUDA's convolutions have no such thresholds).
    sizes = [(1024, 1024), (512, 320), (320, 512), (576, 1024), (272, 256), (1024, 448)]
    words = [1, 3, 17, 60, 150, 700]  # 700 words is over the 512-token budget: the prompt is cut
    adapters = [[], [{"name": "a"}], [{"name": "b", "scale": 0.5}], [{"name": "a"}, {"name": "b"}],
                [{"name": "a", "scale": -1.5}], []]
    for number, ((width, height), count, loras) in enumerate(zip(sizes, words, adapters, strict=True)):
        engine.generate(GenerationRequest(" ".join(["lantern"] * count) + f" {number}", width=width, height=height,
                                          steps=1, seed=number, loras=loras))
    # Edits run the same DiT and decoder graphs: image-to-image, inpainting, and inpainting with an adapter.
    picture = np.random.default_rng(0).integers(0, 256, (384, 256, 3), dtype=np.uint8)
    mask = np.zeros((384, 256), np.uint8)
    mask[:, :128] = 255
    edit = replace(request, image=picture, strength=0.5, steps=4)
    eager_edit = eager_engine.generate(edit)
    for edited in (edit, replace(edit, mask=mask, strength=None), replace(edit, mask=mask, loras=[{"name": "a"}])):
        compiled = engine.generate(edited)
        if edited is edit:
            difference = np.abs(np.asarray(compiled.image, dtype=int) - np.asarray(eager_edit.image, dtype=int))
            assert difference.max() <= 2
    assert counters["stats"]["unique_graphs"] == graphs_when_live
    # The compiled pipeline is a copy: the loaded one (shared by every test here) stays eager.
    assert all(block._compiled_call_impl is None for block in loaded_tiny.pipe.transformer.layers)


def test_the_eager_path_serves_while_the_compiled_one_compiles(loaded_tiny, tmp_path, caplog):
    import threading

    compiling, release = threading.Event(), threading.Event()

    switch_intervals = []

    def slow_compiler(graph, example_inputs):
        """A compile that takes as long as the test wants (a cold compile cache on a real GPU: a minute or more)."""
        if engine.compiled == "compiling":
            switch_intervals.append(sys.getswitchinterval())
        compiling.set()
        release.wait(60)
        return graph.forward

    caplog.set_level(logging.INFO, logger="zimage.engine")
    engine = engine_with(loaded_tiny, tmp_path, compile_model=True, compile_backend=slow_compiler)
    thread = engine.start_background_work()
    try:
        assert compiling.wait(60)
        during = engine.generate(GenerationRequest("served meanwhile", seed=3, **SMALL))
        assert engine.state()["compiled"] == "compiling" and thread.is_alive()
    finally:
        release.set()
    thread.join(60)
    after = engine.generate(GenerationRequest("served compiled", seed=3, **SMALL))
    assert engine.state()["serving"] == "compiled"
    lines = {result.request_id: next(line for line in caplog.text.splitlines() if f"id={result.request_id}" in line)
             for result in (during, after)}
    assert "path=eager" in lines[during.request_id] and "path=compiled" in lines[after.request_id]
    assert "the eager path serves" in caplog.text and "compiled path live" in caplog.text
    # The compiler hands the interpreter over often while it runs, and the old interval is back once it is done.
    assert switch_intervals and max(switch_intervals) == pytest.approx(COMPILE_SWITCH_INTERVAL_S)
    assert sys.getswitchinterval() > 10 * COMPILE_SWITCH_INTERVAL_S


def test_compiling_waits_for_the_first_answered_request(loaded_tiny, tmp_path, caplog):
    """A restart's first request is served before the compiler takes its share of the interpreter."""
    import threading

    compiling = threading.Event()

    def noting_compiler(graph, example_inputs):
        compiling.set()
        return graph.forward

    caplog.set_level(logging.INFO, logger="zimage.engine")
    engine = engine_with(loaded_tiny, tmp_path, compile_model=True, compile_backend=noting_compiler)
    thread = engine.start_background_work(delay_s=600)
    assert not compiling.wait(COMPILE_NOT_STARTED_WINDOW_S) and engine.state()["compiled"] == "pending"
    engine.generate(GenerationRequest("the first request after a start", seed=3, **SMALL))
    thread.join(120)
    assert compiling.is_set() and engine.state()["compiled"] == "on"
    assert "(after a request was answered)" in caplog.text


def test_text_encoder_graphs_wait_for_the_first_answered_request_and_run_on_the_gpu_thread(loaded_tiny, tmp_path,
                                                                                          monkeypatch):
    """Capturing them takes seconds: not before a restart's first image, and each capture a job of the GPU thread, so
    requests go between them. CUDA graphs themselves need a GPU (test_text_encoder); here the CPU stands in for one
    that has them, and a capture reports where it ran."""
    captures = []

    def capture_graphs(encoder, run):
        captures.append(run(lambda: (threading.current_thread().name, engine.in_flight)))

    monkeypatch.setattr(PromptEncoder, "graphs_possible", property(lambda encoder: True))
    monkeypatch.setattr(PromptEncoder, "capture_graphs", capture_graphs)
    engine = engine_with(loaded_tiny, tmp_path)
    thread = engine.start_background_work(delay_s=600)
    thread.join(COMPILE_NOT_STARTED_WINDOW_S)
    assert thread.is_alive() and captures == []
    engine.generate(GenerationRequest("the first request after a start", seed=3, **SMALL))
    thread.join(60)
    assert captures == [("gpu_0", None)] and engine.state()["compiled"] == "off"


def test_an_image_is_saved_with_its_owner_and_listed_only_for_that_owner(engine):
    alices = engine.generate(GenerationRequest("alice's", seed=1, **SMALL), owner="alice")
    engine.generate(GenerationRequest("bob's", seed=2, **SMALL), owner="bob")
    nobodys = engine.generate(GenerationRequest("nobody's", seed=3, **SMALL))
    assert read_parameters(alices.path)["owner"] == "alice" and "owner" not in read_parameters(nobodys.path)
    assert [path for path, _ in engine.history(10, "alice")] == [alices.path]
    assert engine.history(10, None) == []


def test_the_engine_paints_what_the_stock_pipeline_paints(engine):
    """The test diffusers has for its own pipelines: same prompt, seed and settings through `ZImagePipeline.__call__`
    and through the engine (unpadded encoding, its own decode to bytes, the GPU thread) give the same picture."""
    request = GenerationRequest("a red bicycle against a blue wall", width=128, height=96, steps=3, seed=21,
                                shift=3.0)
    ours = _pixels(engine.generate(request)).astype(int)
    pipe = engine.pipeline
    pipe.scheduler.set_shift(3.0)
    stock = pipe(prompt=request.prompt, height=96, width=128, num_inference_steps=3, guidance_scale=0.0,
                 generator=torch.Generator().manual_seed(21)).images[0]
    stock = np.asarray(stock).astype(int)
    assert ours.shape == stock.shape == (96, 128, 3)
    # Float rounding differs (unpadded vs 512-token attention); a pixel may move by a step or two, not more.
    assert np.abs(ours - stock).max() <= 2 and np.abs(ours - stock).mean() < 0.1
