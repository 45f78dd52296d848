import threading

from pipeline.hangs import CHECK_INTERVAL_S, HangWatch


def test_a_job_past_its_limit_is_reported_once_with_its_id_and_a_finished_one_never(capfd):
    reported, hung = [], threading.Event()

    def on_hang(job_id, seconds):
        reported.append((job_id, seconds))
        hung.set()

    watch = HangWatch(timeout_s=0.1, on_hang=on_hang)
    watch.begin("quick")
    watch.end()  # finished before any check: never reported
    watch.begin("stuck")
    assert hung.wait(10 * CHECK_INTERVAL_S)
    [(job_id, seconds)] = reported
    assert job_id == "stuck" and seconds >= 0.1
    assert "in _watch" in capfd.readouterr().err  # every thread's stack, the watcher's own among them
