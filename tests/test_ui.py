from pipeline.memory import GIB, Line, MemoryGuard
from pipeline.metrics import ServiceMetrics
from webui.admission import AdmissionLine
from webui.editor_uploads import UploadFolder
from webui.ui import build_ui


def _ui(engine, folder):
    return build_ui(engine, AdmissionLine(capacity=4, parallel=1, metrics=ServiceMetrics()),
                    UploadFolder(folder, max_bytes=10**6, max_pixels=10**6), demo=False, model_label="t",
                    max_w=2048, max_h=2048)


def _components(blocks):
    return {block.elem_id: block for block in blocks.blocks.values() if getattr(block, "elem_id", None)}


def test_a_capped_card_is_offered_only_the_sizes_that_fit_and_told_which_are_missing(engine, tmp_path):
    # About 1.6 megapixels fit: the 1024 category whole, part of 1280, nothing of 1536.
    engine.memory_guard = MemoryGuard(available_bytes=2 * GIB, denoise=Line(0, 1000), decode=Line(0, 0))
    blocks = _ui(engine, tmp_path)
    components = _components(blocks)
    note = components["sizes-left-out"].value
    assert "2048x1152" in note and "1536x1536" in note and "1024x1024" not in note and "2.0 GiB" in note
    dropdowns = [block for block in blocks.blocks.values() if getattr(block, "label", None) == "Resolution category"]
    assert [choice[0] for choice in dropdowns[0].choices] == ["1024", "1280"]


def test_a_card_with_room_for_every_size_shows_no_note(engine, tmp_path):
    engine.memory_guard = MemoryGuard(available_bytes=60 * GIB, denoise=Line(0, 1000), decode=Line(0, 0))
    blocks = _ui(engine, tmp_path)
    assert "sizes-left-out" not in _components(blocks)
