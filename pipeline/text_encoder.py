"""A prompt → the embeddings the DiT reads: what ZImagePipeline._encode_prompt computes, faster.

Two differences from the stock path, neither of which changes the result beyond bf16 rounding:
- No padding to 512 tokens. Qwen3 is causal: tokens after the prompt never change the prompt's hidden states, and
  the pipeline drops the padded ones afterwards anyway.
- On CUDA, one CUDA graph per length bucket (the prompt padded at its end up to a multiple of BUCKET_TOKENS).
  Encoding a new prompt is some 500 small kernels over 36 layers; launched one by one from Python they took
  45-55 ms on an H100 whose own share of the work is a few milliseconds. torch.compile's CUDA graphs
  ("reduce-overhead") would compile the 4B model once per bucket, minutes at every start; capturing the eager model
  with torch.cuda.graph takes a fraction of a second per bucket, and the graphs are checked against eager before
  they are kept.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.messages import first_line

log = logging.getLogger("zimage.text_encoder")

MAX_SEQUENCE_LENGTH = 512  # the text encoder's token budget in stock diffusers; longer prompts are cut
BUCKET_TOKENS = 32  # graph lengths: a multiple of this, the same steps the DiT pads the caption to
# Not cuDNN's attention: it builds an execution plan for every new sequence length, and nearly every new prompt has
# one (an H100 encoded new prompts in 117 ms with it, 53 ms without; a repeated prompt 43 ms either way). At a few
# hundred tokens flash and memory-efficient attention are as fast. Captured graphs keep the kernel chosen here.
ATTENTION_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# The graphs are kept only if a replay matches eager on the same padded input to this relative error (the norm of
# the difference over eager's). Not to rounding: under capture, transformers cannot look at the mask's values and
# attention runs another SDPA kernel than eager's flash. Kernels differ like this among themselves: on an H100 with
# random full-size weights, whose 36 layers amplify every rounding, cuDNN's attention differs from flash by 0.026,
# the graph by 0.027, the math kernel by 0.047; a wrong graph (a stale buffer, an input copied short) is off by
# the whole norm.
GRAPH_TOLERANCE = 0.1


T = TypeVar("T")


def _now(work: Callable[[], T]) -> T:
    return work()


@dataclass(frozen=True)
class Encoded:
    embeddings: torch.Tensor  # (tokens, hidden): the second-to-last layer's hidden states, as the pipeline takes them
    prompt_tokens: int  # the templated prompt's length before the cut to MAX_SEQUENCE_LENGTH


@dataclass(frozen=True)
class _Graph:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor  # (1, bucket): written before each replay
    hidden: torch.Tensor  # (1, bucket, hidden): what each replay writes


def bucket_of(tokens: int) -> int:
    return -(-tokens // BUCKET_TOKENS) * BUCKET_TOKENS


class PromptEncoder:
    def __init__(self, tokenizer, text_encoder, device: torch.device):
        self.tokenizer, self.text_encoder, self.device = tokenizer, text_encoder, device
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._graphs: dict[int, _Graph] = {}

    @property
    def graphs_possible(self) -> bool:
        """On CUDA with the weights resident: an offloaded encoder (the low-VRAM profile) moves its layers onto the
        GPU from hooks as it runs, which a graph cannot replay."""
        return self.device.type == "cuda" and all(p.device.type == "cuda" for p in self.text_encoder.parameters())

    def token_ids(self, prompt: str) -> list[int]:
        """The chat template the pipeline applies, tokenized; not yet cut to MAX_SEQUENCE_LENGTH."""
        templated = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                       add_generation_prompt=True, enable_thinking=True)
        return self.tokenizer(templated).input_ids

    @torch.inference_mode()
    def encode(self, prompt: str) -> Encoded:
        ids = self.token_ids(prompt)
        used = ids[:MAX_SEQUENCE_LENGTH]
        graph = self._graphs.get(bucket_of(len(used)))
        if graph is not None:
            return Encoded(self._replay(graph, used), prompt_tokens=len(ids))
        return Encoded(self.forward(torch.tensor([used], device=self.device))[0], prompt_tokens=len(ids))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, tokens) ids → (batch, tokens, hidden). No attention mask: the encoder's own causal one is the
        whole mask for a prompt with no padding before it."""
        with sdpa_kernel(ATTENTION_KERNELS):
            return self.text_encoder(input_ids=input_ids, output_hidden_states=True, use_cache=False
                                     ).hidden_states[-2]

    def padded(self, ids: list[int], length: int) -> torch.Tensor:
        return torch.tensor([ids + [self._pad_id] * (length - len(ids))])

    def _replay(self, graph: _Graph, ids: list[int]) -> torch.Tensor:
        graph.input_ids.copy_(self.padded(ids, graph.input_ids.shape[1]))
        graph.graph.replay()
        return graph.hidden[0, :len(ids)].clone()

    def capture_graphs(self, run: Callable[[Callable[[], T]], T] = _now,
                       probe_prompt: str = "a lighthouse on a cliff at dusk") -> None:
        """One graph per bucket up to MAX_SEQUENCE_LENGTH, all in one memory pool (one runs at a time, and each
        keeps only its output). Each capture, and the check against eager on a probe prompt, is one call of `run`
        (the engine's puts each on its GPU thread, between requests). Used only once all are captured and checked;
        on a mismatch or an error none is, and encoding stays eager, with a warning."""
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        graphs: dict[int, _Graph] = {}
        try:
            for length in range(BUCKET_TOKENS, MAX_SEQUENCE_LENGTH + 1, BUCKET_TOKENS):
                graphs[length] = run(partial(self._capture, length, pool))
            error = run(partial(self._graph_error, graphs, probe_prompt))
        except Exception as failure:  # eager encoding is slower, not wrong
            self._graphs = {}
            log.warning("text encoder graphs not used (%s: %s)", type(failure).__name__, first_line(failure))
            return
        if not error <= GRAPH_TOLERANCE:
            self._graphs = {}
            log.warning("text encoder graphs not used: they differ from eager by %.4f (limit %s)", error,
                        GRAPH_TOLERANCE)
            return
        self._graphs = graphs
        log.info("text encoder graphs captured buckets=%d seconds=%.2f relative_error=%.5f", len(graphs),
                 time.perf_counter() - started, error)

    @torch.inference_mode()
    def _graph_error(self, graphs: dict[int, _Graph], probe_prompt: str) -> float:
        """How far a replay is from eager on the same padded input: the norm of the difference over eager's."""
        ids = self.token_ids(probe_prompt)[:MAX_SEQUENCE_LENGTH]
        eager = self.forward(self.padded(ids, bucket_of(len(ids))).to(self.device))[0, :len(ids)]
        replayed = self._replay(graphs[bucket_of(len(ids))], ids)
        return float((replayed.float() - eager.float()).norm() / eager.float().norm())

    @torch.inference_mode()
    def _capture(self, length: int, pool) -> _Graph:
        input_ids = torch.full((1, length), self._pad_id, device=self.device)
        # First calls outside the capture, on a side stream as PyTorch's CUDA-graph notes ask: kernels' lazy set-up
        # (cuBLAS workspaces, attention's first-call choices) must not happen inside it.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.forward(input_ids)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the service captures after start, while its web threads may ask the driver for free memory
        # (/readyz, /metrics); only this thread's calls are the capture's business.
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            hidden = self.forward(input_ids)
        return _Graph(graph, input_ids, hidden)

    @property
    def graphed(self) -> bool:
        return bool(self._graphs)
