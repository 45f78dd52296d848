"""Supervisor event listener: a crash report for every unexpected exit of the service, and of its engine process.

Runs outside the service, so it works after kill -9 and segfaults too. On PROCESS_STATE_EXITED with expected=0 it
writes <crash-dir>/crash-<time>-pid<pid>.txt: how the process ended (from supervisord's own log line) and what that
usually means, the snapshot the service wrote if it had the chance, the last lines of its log, and the GPU state.
The engine process is the service's own child, which supervisord does not see end: the service tells of each exit
in a process-communication block on its stdout (pipeline.engine_process; supervisor's PROCESS_COMMUNICATION_STDOUT
event), and the same report is written for it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from supervisor import childutils

LOG_TAIL_BYTES = 256 * 1024
MEANINGS = {
    "SIGKILL": "killed from outside with SIGKILL (a shell shows exit status 137): most often the kernel's OOM killer "
               "(check: dmesg -T | grep -iE 'killed process|out of memory'), or someone ran kill -9.",
    "SIGSEGV": "segmentation fault in native code (exit status 139): the CUDA driver, a compiled extension or torch "
               "itself. faulthandler's Python traceback of every thread is in the log lines below.",
    "SIGABRT": "aborted by native code (exit status 134): a failed assertion, e.g. a CUDA device-side assert, or a C++ "
               "exception nobody caught. faulthandler's traceback is in the log lines below.",
    "SIGBUS": "bus error (exit status 135): often a memory-mapped weight file that changed or shrank on disk while "
              "in use.",
    "SIGTERM": "stopped by a SIGTERM that did not come from supervisor, before it could shut down cleanly.",
    "SIGINT": "interrupted (Ctrl-C or SIGINT from outside supervisor) before it could shut down cleanly.",
}
EXIT_MEANINGS = {
    "1": "the service ended itself after a fatal error (poisoned GPU context, hang, unhandled error) or could not "
         "load its weights: the snapshot (if any) and the log lines below say which.",
    "2": "the service refused its settings (a bad flag or config value, or a test-only switch): see the log lines.",
}


def explain(exit_description: str) -> str:
    signal_name = re.search(r"terminated by (SIG[A-Z0-9]+)", exit_description)
    if signal_name:
        return MEANINGS.get(signal_name[1], f"killed by {signal_name[1]}.")
    status = re.search(r"exit status (\d+)", exit_description)
    if status:
        return EXIT_MEANINGS.get(status[1], f"exited with status {status[1]}; see the log lines below.")
    return "unknown; see the log lines below."


def last_exit_description(rpc, program: str) -> str:
    """supervisord logs "exited: NAME (terminated by SIGKILL; not expected)": the only place the signal is named."""
    supervisord_log = rpc.supervisor.readLog(-LOG_TAIL_BYTES, 0)
    found = re.findall(rf"exited: {re.escape(program)} \((.*?); not expected\)", supervisord_log)
    return found[-1] if found else "unknown (supervisord's log has no exit line for it)"


def gpu_state() -> str:
    if not shutil.which("nvidia-smi"):
        return "nvidia-smi not found (no NVIDIA driver on this host)."
    try:
        return subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=15).stdout
    except subprocess.TimeoutExpired:
        return "nvidia-smi did not answer within 15 s (the GPU or its driver may be hung)."


ENGINE_EXIT = re.compile(r"engine-exited pid=(?P<pid>\d+) how=(?P<how>.+)")


def write_report(rpc, program: str, pid: str, crash_dir: Path, log_lines: int,
                 engine_exit: str | None = None) -> Path:
    """`engine_exit`: how the service's engine process `pid` ended, as the service told it; None for the service's
    own exit (supervisord's log says how)."""
    exit_description = engine_exit or last_exit_description(rpc, program)
    log_tail = rpc.supervisor.readProcessStdoutLog(program, -LOG_TAIL_BYTES, 0).splitlines()[-log_lines:]
    snapshots = sorted(crash_dir.glob(f"snapshot-{pid}-*.json"))
    snapshot = str(snapshots[-1]) if snapshots else "none: the process ended before it could write one"
    report = "\n".join([
        f"Z-Image-Turbo crash report — {time.strftime('%Y-%m-%dT%H:%M:%S%z')}",
        f"program: {program}   pid: {pid}" + ("   (its engine process)" if engine_exit else ""),
        f"how it ended: {exit_description}",
        f"what that usually means: {explain(exit_description)}",
        f"snapshot: {snapshot}",
        "the service starts a new engine process by itself; nothing needs doing unless this repeats." if engine_exit
        else "supervisor restarts the program by itself (autorestart=unexpected); nothing needs doing unless this "
             "repeats.",
        "",
        f"--- last {len(log_tail)} log lines ---",
        *log_tail,
        "",
        "--- GPU state (nvidia-smi) ---",
        gpu_state(),
    ])
    crash_dir.mkdir(parents=True, exist_ok=True)
    path = crash_dir / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-pid{pid}.txt"
    path.write_text(report + "\n", encoding="utf-8")
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} crash-reporter report={path} ended={exit_description!r}",
          file=sys.stderr, flush=True)
    return path


def main(argv=None, stdin=sys.stdin, stdout=sys.stdout, rpc=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--program", default="z-image-turbo", help="supervisor program to report on")
    parser.add_argument("--crash-dir", type=Path, default=Path("/var/log/z-image-turbo-crashes"))
    parser.add_argument("--log-lines", type=int, default=100, help="log lines to include")
    args = parser.parse_args(argv)
    rpc = rpc or childutils.getRPCInterface(os.environ)
    while True:
        headers, payload = childutils.listener.wait(stdin, stdout)
        report = None
        if headers["eventname"] == "PROCESS_STATE_EXITED":
            event, _ = childutils.eventdata(payload + "\n")
            if event["processname"] == args.program and event["expected"] == "0":
                report = (event["pid"], None)
        elif headers["eventname"] == "PROCESS_COMMUNICATION_STDOUT":
            event, data = childutils.eventdata(payload)
            if event["processname"] == args.program and (engine := ENGINE_EXIT.fullmatch(data.strip())):
                report = (engine["pid"], engine["how"])
        if report is not None:
            try:
                write_report(rpc, args.program, report[0], args.crash_dir, args.log_lines, engine_exit=report[1])
            except Exception as error:  # a dead reporter reports nothing more; log and go on instead
                print(f"crash-reporter failed: {error!r}", file=sys.stderr, flush=True)
        childutils.listener.ok(stdout)


if __name__ == "__main__":
    main()
