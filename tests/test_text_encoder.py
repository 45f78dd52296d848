"""The prompt encoder on the tiny model: unpadded and padded encodings agree, long prompts are cut; on CUDA, the
graphs give eager's embeddings for prompts of every bucket, and a graph that does not is dropped."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from pipeline import text_encoder
from pipeline.loader import load_pipeline
from pipeline.layouts import LayoutKind
from pipeline.text_encoder import BUCKET_TOKENS, MAX_SEQUENCE_LENGTH, PromptEncoder, bucket_of

PROMPTS = ("a cat", "a red bicycle against a blue wall, late afternoon light, long shadows on the pavement",
           " ".join(["a lighthouse on a cliff at dusk"] * 12), "一只猫坐在窗台上")

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@pytest.fixture
def encoder(loaded_tiny) -> PromptEncoder:
    pipe = loaded_tiny.pipe
    return PromptEncoder(pipe.tokenizer, pipe.text_encoder, loaded_tiny.device)


def test_buckets_round_up_to_whole_blocks():
    assert [bucket_of(n) for n in (1, BUCKET_TOKENS, BUCKET_TOKENS + 1, MAX_SEQUENCE_LENGTH)] == [
        BUCKET_TOKENS, BUCKET_TOKENS, 2 * BUCKET_TOKENS, MAX_SEQUENCE_LENGTH]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_padding_at_the_end_leaves_the_prompts_embeddings_as_they_were(encoder, prompt):
    """What the graphs rely on: they run the prompt padded to its bucket and keep only its own tokens."""
    ids = encoder.token_ids(prompt)
    with torch.inference_mode():
        unpadded = encoder.forward(torch.tensor([ids]))[0]
        padded = encoder.forward(encoder.padded(ids, bucket_of(len(ids))))[0, :len(ids)]
    assert bucket_of(len(ids)) > len(ids)  # each prompt here really is padded
    torch.testing.assert_close(padded, unpadded, rtol=1e-4, atol=1e-4)


def test_a_prompt_past_the_budget_is_cut_and_its_length_reported(encoder):
    encoded = encoder.encode("word " * 600)
    assert encoded.prompt_tokens > MAX_SEQUENCE_LENGTH
    assert encoded.embeddings.shape[0] == MAX_SEQUENCE_LENGTH


def test_no_graphs_off_cuda(encoder):
    assert not encoder.graphs_possible and not encoder.graphed


@pytest.fixture(scope="module")
def cuda_encoder(tiny_models) -> PromptEncoder:
    pipe = load_pipeline(tiny_models[LayoutKind.SINGLE_FILE], torch.device("cuda")).pipe
    return PromptEncoder(pipe.tokenizer, pipe.text_encoder, torch.device("cuda"))


@cuda_only
def test_graphs_give_eagers_embeddings_in_every_bucket(cuda_encoder, caplog):
    caplog.set_level(logging.INFO, "zimage.text_encoder")
    cuda_encoder.capture_graphs()
    assert cuda_encoder.graphed and "text encoder graphs captured buckets=16" in caplog.text
    for prompt in (*PROMPTS, "word " * 600):
        ids = cuda_encoder.token_ids(prompt)[:MAX_SEQUENCE_LENGTH]
        with torch.inference_mode():
            eager = cuda_encoder.forward(torch.tensor([ids], device="cuda"))[0]
        replayed = cuda_encoder.encode(prompt).embeddings
        assert replayed.shape == eager.shape
        torch.testing.assert_close(replayed, eager, rtol=2e-2, atol=2e-2)


@cuda_only
def test_graphs_captured_job_by_job_on_another_thread_while_others_ask_the_driver(cuda_encoder):
    """As the engine captures them after start: each bucket, and the check, one job on its GPU thread, while web
    threads ask the driver how much memory is free (/readyz, /metrics)."""
    stop = threading.Event()

    def ask_for_free_memory():
        while not stop.is_set():
            torch.cuda.mem_get_info()

    asking = threading.Thread(target=ask_for_free_memory)
    jobs = []
    with ThreadPoolExecutor(max_workers=1) as gpu_thread:
        def run(work):
            jobs.append(work)
            return gpu_thread.submit(work).result()

        asking.start()
        try:
            cuda_encoder.capture_graphs(run=run)
        finally:
            stop.set()
            asking.join()
    assert cuda_encoder.graphed and len(jobs) == MAX_SEQUENCE_LENGTH // BUCKET_TOKENS + 1
    ids = cuda_encoder.token_ids(PROMPTS[0])
    with torch.inference_mode():
        eager = cuda_encoder.forward(torch.tensor([ids], device="cuda"))[0]
    torch.testing.assert_close(cuda_encoder.encode(PROMPTS[0]).embeddings, eager, rtol=2e-2, atol=2e-2)


@cuda_only
def test_graphs_that_differ_from_eager_are_dropped(cuda_encoder, monkeypatch, caplog):
    monkeypatch.setattr(text_encoder, "GRAPH_TOLERANCE", -1.0)
    cuda_encoder.capture_graphs()
    assert not cuda_encoder.graphed and "text encoder graphs not used: they differ from eager" in caplog.text
    assert cuda_encoder.encode("a cat").embeddings.shape[0] == len(cuda_encoder.token_ids("a cat"))
