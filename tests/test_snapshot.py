import json
import sys
import threading

import torch

from pipeline.snapshot import install_snapshot_hooks, write_snapshot


def test_snapshot_holds_reason_error_state_and_every_thread(tmp_path):
    try:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    except RuntimeError as error:
        path = write_snapshot(tmp_path / "crashes", "fatal: test", {"in_flight": "abc", "recent_prompts": ["x"]},
                              error)
    snapshot = json.loads(path.read_text())
    assert snapshot["reason"] == "fatal: test" and "illegal memory access" in snapshot["error"]
    assert snapshot["service"]["in_flight"] == "abc"
    assert any("MainThread" in name for name in snapshot["threads"])
    assert snapshot["gpu_memory"]["cuda"] is torch.cuda.is_available()
    assert path.name.startswith(f"snapshot-{snapshot['pid']}-")


def test_unwritable_crash_dir_is_logged_not_raised(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert write_snapshot(blocker / "crashes", "fatal", {}) is None
    assert "could not write the crash snapshot" in caplog.text


def test_an_uncaught_error_in_a_thread_leaves_a_snapshot(tmp_path, monkeypatch):
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    install_snapshot_hooks(tmp_path, lambda: {"served": 3})

    def boom():
        raise ValueError("worker died")

    worker = threading.Thread(target=boom, name="worker")
    worker.start()
    worker.join()
    [path] = tmp_path.glob("snapshot-*.json")
    snapshot = json.loads(path.read_text())
    assert "ValueError in a thread: worker died" in snapshot["reason"] and snapshot["service"] == {"served": 3}
