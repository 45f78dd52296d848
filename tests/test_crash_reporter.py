"""The crash reporter's report, from what supervisor's RPC would answer (the real RPC is exercised in
test_supervisor_e2e.py, where kill -9 and a fatal exit produce real reports)."""

import io

import pytest

from tests.helpers import load_listener

crash_reporter = load_listener("crash_reporter")


@pytest.mark.parametrize(("ended", "meaning"), [
    ("terminated by SIGKILL", "OOM killer"),
    ("terminated by SIGSEGV (core dumped)", "segmentation fault"),
    ("terminated by SIGABRT", "device-side assert"),
    ("terminated by SIGBUS", "weight file"),
    ("exit status 1", "fatal error"),
    ("exit status 2", "refused its settings"),
    ("exit status 7", "status 7"),
    ("terminated by SIGUSR2", "killed by SIGUSR2"),
])
def test_each_ending_is_explained(ended, meaning):
    assert meaning in crash_reporter.explain(ended)


class AnsweringSupervisor:
    def __init__(self, supervisord_log, program_log):
        self.supervisord_log, self.program_log = supervisord_log, program_log

    def readLog(self, offset, length):
        return self.supervisord_log

    def readProcessStdoutLog(self, name, offset, length):
        return self.program_log


class Rpc:
    def __init__(self, *logs):
        self.supervisor = AnsweringSupervisor(*logs)


def test_report_names_the_signal_the_snapshot_and_the_last_lines(tmp_path):
    supervisord_log = ("2026-11-22 INFO spawned: 'svc' with pid 41\n"
                       "2026-11-22 WARN exited: svc (exit status 1; not expected)\n"
                       "2026-11-22 WARN exited: svc (terminated by SIGKILL; not expected)\n")
    program_log = "\n".join(f"line {number}" for number in range(300))
    (tmp_path / "snapshot-42-20261122-180000.json").write_text("{}")
    (tmp_path / "snapshot-41-20261122-170000.json").write_text("{}")
    path = crash_reporter.write_report(Rpc(supervisord_log, program_log), "svc", "42", tmp_path, log_lines=100)
    report = path.read_text()
    assert path.name.endswith("-pid42.txt")
    assert "how it ended: terminated by SIGKILL" in report and "OOM killer" in report
    assert "snapshot-42-20261122-180000.json" in report and "snapshot-41" not in report
    assert "line 199" not in report and "line 200" in report and "line 299" in report
    assert "--- GPU state (nvidia-smi) ---" in report


def test_without_a_snapshot_the_report_says_so(tmp_path):
    report = crash_reporter.write_report(Rpc("", "only line"), "svc", "7", tmp_path, log_lines=100).read_text()
    assert "snapshot: none" in report and "how it ended: unknown" in report


def test_only_unexpected_exits_of_the_program_are_reported(tmp_path):
    def event(processname, expected, pid):
        body = f"processname:{processname} groupname:{processname} from_state:RUNNING expected:{expected} pid:{pid}"
        return f"ver:3.0 serial:1 pool:r poolserial:1 eventname:PROCESS_STATE_EXITED len:{len(body)}\n{body}"

    stdin = io.StringIO(event("svc", 1, 10) + event("other", 0, 11) + event("svc", 0, 12))
    rpc = Rpc("WARN exited: svc (exit status 1; not expected)\n", "last line")
    with pytest.raises(KeyError):  # the stream ends after three events
        crash_reporter.main(["--program", "svc", "--crash-dir", str(tmp_path)], stdin=stdin, stdout=io.StringIO(),
                            rpc=rpc)
    assert [path.name.split("-pid")[1] for path in tmp_path.glob("crash-*.txt")] == ["12.txt"]


def test_the_services_word_of_its_engine_process_ending_is_reported_too(tmp_path):
    """The service tells of its engine process's exit in a process-communication block on its stdout, which
    supervisord hands on as PROCESS_COMMUNICATION_STDOUT; anything else in such a block is not a crash."""
    def communication(processname, data):
        body = f"processname:{processname} groupname:{processname} pid:10\n{data}"
        return f"ver:3.0 serial:1 pool:r poolserial:1 eventname:PROCESS_COMMUNICATION_STDOUT len:{len(body)}\n{body}"

    (tmp_path / "snapshot-77-20261207-010203.json").write_text("{}")
    stdin = io.StringIO(communication("svc", "engine-exited pid=77 how=terminated by SIGKILL")
                        + communication("other", "engine-exited pid=78 how=exit status 1")
                        + communication("svc", "something else"))
    with pytest.raises(KeyError):  # the stream ends after three events
        crash_reporter.main(["--program", "svc", "--crash-dir", str(tmp_path)], stdin=stdin, stdout=io.StringIO(),
                            rpc=Rpc("", "the service's last line"))
    [report] = tmp_path.glob("crash-*.txt")
    text = report.read_text()
    assert report.name.endswith("-pid77.txt") and "pid: 77   (its engine process)" in text
    assert "how it ended: terminated by SIGKILL" in text and "killed from outside with SIGKILL" in text
    assert f"snapshot: {tmp_path / 'snapshot-77-20261207-010203.json'}" in text
    assert "the service's last line" in text and "starts a new engine process by itself" in text
