"""What a front keeps for an engine that runs in another process (pipeline.engine_process's child, or scale's Ray
Serve replicas): the output dir's check and the galleries' history, read from the images the engine saved there,
and the draining flag; each engine builds its attention plans and compiles after its own warm-up."""

from __future__ import annotations

from pathlib import Path

from pipeline.engine_types import RECENT_IMAGES
from pipeline.output_dir import OutputDirCheck
from pipeline.serving import ServingEngine
from pipeline.storage import RecentImages, read_parameters


class EngineElsewhere(ServingEngine):
    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self._output_dir_check = OutputDirCheck(output_dir)
        self._recent_images = RecentImages(output_dir, keep=RECENT_IMAGES)
        self._draining = False

    def output_dir_problem(self) -> str | None:
        return self._output_dir_check.problem()

    def history(self, limit: int, owner: str | None) -> list[tuple[Path, dict[str, object]]]:
        return self._recent_images.newest(limit, owner)

    def saved(self, path: Path) -> None:
        """An image the engine saved: into the galleries' history. OSError when the front cannot read it."""
        self._recent_images.add(path, read_parameters(path))

    def stop_accepting(self) -> None:
        """From now on new requests are refused as "shutting down"; those out at the engine go on."""
        self._draining = True

    def build_attention_plans(self, sizes) -> None:
        """The engine builds its own after its warm-up (EngineSpec.plan_sizes), a restarted one too."""
        return None

    def start_background_work(self, delay_s: float = 0.0) -> None:
        """The engine starts its own after its warm-up (EngineSpec.compile_delay_s), a restarted one too."""
        return None
