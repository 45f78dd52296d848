"""The watchdog's decisions, driven tick by tick. Supervisor's RPC is a small recording stand-in here (the real
one is exercised in test_supervisor_e2e.py); the probe answers as a healthy, hung or loading service would."""

import io

import pytest

from tests.helpers import load_listener

watchdog = load_listener("watchdog")


class RecordingSupervisor:
    def __init__(self, pid=100, start=1000.0, now=2000.0):
        self.process = {"statename": "RUNNING", "pid": pid, "start": start, "now": now}
        self.calls = []

    def getProcessInfo(self, name):
        return dict(self.process)

    def stopProcess(self, name, wait):
        self.calls.append(("stop", name))

    def startProcess(self, name, wait):
        self.calls.append(("start", name))
        self.process["pid"] += 1

    def signalProcess(self, name, signal):
        self.calls.append(("signal", signal))


class Rpc:
    def __init__(self, **process):
        self.supervisor = RecordingSupervisor(**process)


def make(rpc, answers, **options):
    settings = dict(timeout=1, failures=3, startup_grace=300, min_free_gpu_mib=0, low_memory_ticks=2)
    settings.update(options)
    probe = lambda url, timeout: answers[url.rsplit("/", 1)[1]]()  # noqa: E731
    return watchdog.Watchdog(rpc, "svc", "http://127.0.0.1:1", probe=probe, **settings)


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch):
    monkeypatch.setattr(watchdog.time, "sleep", lambda seconds: None)


def test_restarts_after_the_configured_failures_in_a_row():
    rpc = Rpc()
    dog = make(rpc, {"healthz": lambda: (False, {})})
    dog.tick()
    dog.tick()
    assert rpc.supervisor.calls == []
    dog.tick()
    assert rpc.supervisor.calls == [("signal", "USR1"), ("stop", "svc"), ("start", "svc")]


def test_a_success_resets_the_count():
    rpc = Rpc()
    answers = iter([(False, {}), (False, {}), (True, {}), (False, {}), (False, {})])
    dog = make(rpc, {"healthz": lambda: next(answers)})
    for _ in range(5):
        dog.tick()
    assert rpc.supervisor.calls == []


def test_failures_while_still_loading_do_not_count():
    rpc = Rpc(start=1000.0, now=1010.0)  # up for 10 s, grace 300 s, never healthy yet
    dog = make(rpc, {"healthz": lambda: (False, {})})
    for _ in range(10):
        dog.tick()
    assert rpc.supervisor.calls == []
    rpc.supervisor.process["now"] = 1400.0  # past the grace: a service that never came up counts
    for _ in range(3):
        dog.tick()
    assert ("stop", "svc") in rpc.supervisor.calls


def test_once_healthy_the_grace_no_longer_applies():
    rpc = Rpc(start=1000.0, now=1010.0)
    answers = iter([(True, {})] + [(False, {})] * 3)
    dog = make(rpc, {"healthz": lambda: next(answers)})
    for _ in range(4):
        dog.tick()
    assert ("stop", "svc") in rpc.supervisor.calls


def test_a_stopped_program_is_left_alone():
    rpc = Rpc()
    rpc.supervisor.process["statename"] = "STOPPED"
    dog = make(rpc, {"healthz": lambda: (False, {})})
    for _ in range(5):
        dog.tick()
    assert rpc.supervisor.calls == []


def test_low_gpu_memory_restarts_only_while_idle():
    rpc = Rpc()
    state = {"gpu_free_mib": 500, "busy": True}
    dog = make(rpc, {"healthz": lambda: (True, {}), "readyz": lambda: (True, dict(state))},
               min_free_gpu_mib=1000, low_memory_ticks=2)
    for _ in range(4):
        dog.tick()
    assert rpc.supervisor.calls == []  # a job is running: never kill it
    state["busy"] = False
    dog.tick()
    assert ("stop", "svc") in rpc.supervisor.calls


def test_low_gpu_memory_asks_a_service_with_an_engine_process_to_replace_it_and_never_restarts_it():
    """The service waits for its line to empty itself (webui.server), so the watchdog asks at once, busy or not."""
    rpc = Rpc()
    dog = make(rpc, {"healthz": lambda: (True, {}),
                     "readyz": lambda: (True, {"gpu_free_mib": 500, "busy": True, "engine_process": True})},
               min_free_gpu_mib=1000, low_memory_ticks=2)
    for _ in range(4):
        dog.tick()
    assert rpc.supervisor.calls == [("signal", "USR2"), ("signal", "USR2")]  # every 2 ticks under the mark


def test_enough_gpu_memory_never_restarts():
    rpc = Rpc()
    dog = make(rpc, {"healthz": lambda: (True, {}), "readyz": lambda: (True, {"gpu_free_mib": 5000, "busy": False})},
               min_free_gpu_mib=1000)
    for _ in range(5):
        dog.tick()
    assert rpc.supervisor.calls == []


def test_main_speaks_the_event_listener_protocol():
    rpc = Rpc()
    rpc.supervisor.process["statename"] = "STOPPED"
    body = "when:1700000000"
    stdin = io.StringIO(f"ver:3.0 serial:1 pool:watchdog poolserial:1 eventname:TICK_5 len:{len(body)}\n{body}")
    stdout = io.StringIO()
    with pytest.raises(KeyError):  # the stream ends after one event: the next wait() finds no header
        watchdog.main(["--program", "svc"], stdin=stdin, stdout=stdout, rpc=rpc)
    assert stdout.getvalue().startswith("READY\nRESULT 2\nOKREADY\n")


def test_http_probe_against_nothing_listening_fails_fast():
    ok, body = watchdog.http_probe("http://127.0.0.1:9/healthz", timeout=2)
    assert (ok, body) == (False, {})


def test_says_once_per_process_when_it_starts_counting_failures(capsys):
    rpc = Rpc()
    dog = make(rpc, {"healthz": lambda: (True, {})})
    dog.tick()
    dog.tick()
    rpc.supervisor.process["pid"] = 101  # a new process
    dog.tick()
    lines = [line for line in capsys.readouterr().err.splitlines() if "healthz=ok watching" in line]
    assert len(lines) == 2 and "pid=100" in lines[0] and "pid=101" in lines[1]
