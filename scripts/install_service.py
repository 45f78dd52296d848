"""Install Z-Image-Turbo as a supervisord program: fill in deploy/supervisor/z-image-turbo.conf, write it to the
conf.d directory, then `supervisorctl reread` + `update` and print the status.

    sudo .venv/bin/python scripts/install_service.py --model-dir /opt/z-image-turbo/weights
    .venv/bin/python scripts/install_service.py --standalone ~/zimage-supervisor -- --demo   # no system supervisor

Works with Debian's supervisor package (conf.d under /etc/supervisor) and with the pip one (--supervisor-conf or
--standalone). Everything after `--` is passed to app.py.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
TEMPLATES = PROJECT_DIR / "deploy" / "supervisor"

# Above the measured start-to-ready times (README, "Measured"): 21-38 s for the full-size model on an H100 reading
# 20 GB from a warm page cache (a cold cache adds ~20 s), ~10 s for the tiny --demo model on 2 CPU cores. startsecs
# must cover loading so that a crash while loading is a failed start, not an endless restart loop (see the
# template); meanwhile `supervisorctl start` waits and status says STARTING, so it is no larger than that.
DEFAULT_STARTSECS = 60
DEMO_STARTSECS = 15
SYSTEM_LOG_FILE = Path("/var/log/z-image-turbo.log")
SYSTEM_CRASH_DIR = Path("/var/log/z-image-turbo-crashes")


def _default_python() -> Path:
    venv_python = PROJECT_DIR / ".venv" / "bin" / "python"
    return venv_python if venv_python.exists() else Path(sys.executable)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--name", default="z-image-turbo", help="supervisor program name")
    parser.add_argument("--conf-dir", type=Path, default=Path("/etc/supervisor/conf.d"),
                        help="where supervisord includes program blocks from")
    parser.add_argument("--supervisor-conf", type=Path,
                        help="supervisord.conf to pass to supervisorctl -c (default: supervisorctl's own search)")
    parser.add_argument("--standalone", type=Path, metavar="DIR",
                        help="no system supervisor: write DIR/supervisord.conf (unix socket, mode 0700) and "
                        "DIR/conf.d/, and start supervisord from it if it is not running")
    parser.add_argument("--supervisorctl", default=None, help="supervisorctl to run (default: with --standalone "
                        "the one beside --python, else the one on PATH, e.g. Debian's)")
    parser.add_argument("--python", type=Path, default=_default_python(), help="Python that runs the service")
    parser.add_argument("--project-dir", type=Path, default=PROJECT_DIR, help="the service's checkout")
    parser.add_argument("--model-dir", type=Path, default=Path("/opt/z-image-turbo/weights"), help="weights")
    parser.add_argument("--output-dir", type=Path, default=PROJECT_DIR / "outputs", help="where images are saved")
    parser.add_argument("--port", type=int, default=7860, help="UI port (bound to 127.0.0.1)")
    parser.add_argument("--log-file", type=Path,
                        help=f"the service's log (stdout and stderr) (default: {SYSTEM_LOG_FILE}; with --standalone "
                        f"DIR/log/z-image-turbo.log)")
    parser.add_argument("--log-maxbytes", default="10MB", help="rotate the log at this size")
    parser.add_argument("--log-backups", type=int, default=5, help="rotated logs kept")
    parser.add_argument("--crash-dir", type=Path,
                        help=f"crash reports and snapshots (default: {SYSTEM_CRASH_DIR}; with --standalone "
                        f"DIR/crashes)")
    parser.add_argument("--startsecs", type=int,
                        help=f"seconds up to count as started; supervisorctl start waits this long (default: "
                        f"{DEFAULT_STARTSECS}, with --demo {DEMO_STARTSECS})")
    parser.add_argument("--stopwaitsecs", type=int, default=30,
                        help="seconds between SIGTERM and SIGKILL; the running job gets this minus 10")
    parser.add_argument("--watchdog-failures", type=int, default=3, help="failed /healthz probes before a restart")
    parser.add_argument("--startup-grace", type=int, default=300,
                        help="seconds after a start before the watchdog counts failures, unless it saw the "
                        "service healthy sooner")
    parser.add_argument("--min-free-gpu-mib", type=int, default=0,
                        help="restart while idle when free GPU memory stays under this (0: off)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the service (repeatable)")
    parser.add_argument("--no-update", action="store_true", help="only write the files; no reread/update")
    parser.add_argument("app_args", nargs="*", help="after --: extra arguments for app.py (e.g. --demo)")
    return parser


def render_program(args: argparse.Namespace) -> str:
    for pair in args.env:
        if "=" not in pair or '"' in pair:
            raise SystemExit(f"install_service: --env takes KEY=VALUE without double quotes (got {pair!r})")
    environment = "".join(f',{key}="{value}"' for key, value in (pair.split("=", 1) for pair in args.env))
    return (TEMPLATES / "z-image-turbo.conf").read_text().format(
        name=args.name, python=args.python, project_dir=args.project_dir.resolve(), port=args.port,
        model_dir=args.model_dir, output_dir=args.output_dir, crash_dir=args.crash_dir,
        shutdown_grace=max(args.stopwaitsecs - 10, 0), app_args="".join(f" {arg}" for arg in args.app_args),
        startsecs=args.startsecs, stopwaitsecs=args.stopwaitsecs, log_file=args.log_file,
        log_maxbytes=args.log_maxbytes, log_backups=args.log_backups, log_dir=args.log_file.parent,
        environment=environment, watchdog_failures=args.watchdog_failures, startup_grace=args.startup_grace,
        min_free_gpu_mib=args.min_free_gpu_mib,
        scheme="https" if any(arg.startswith("--ssl-certfile") for arg in args.app_args) else "http",
    )


def render_standalone(run_dir: Path, log_dir: Path, conf_dir: Path, name: str) -> str:
    return (TEMPLATES / "supervisord.conf").read_text().format(run_dir=run_dir, log_dir=log_dir,
                                                               conf_dir=conf_dir, name=name)


def supervisor_binary(name: str, python: Path, standalone: bool) -> str:
    """A standalone install runs the pip supervisor installed beside `python` (on PATH where pip put it elsewhere,
    as `pip --target` does); a system install uses the host's (Debian's /usr/bin/supervisorctl talks to the system
    supervisord), falling back to the pip one."""
    beside_python = python.parent / name
    if standalone and beside_python.exists():
        return str(beside_python)
    return shutil.which(name) or str(beside_python)


def _supervisorctl(args: argparse.Namespace) -> list[str]:
    binary = args.supervisorctl or supervisor_binary("supervisorctl", args.python, bool(args.standalone))
    return [binary, *(["-c", str(args.supervisor_conf)] if args.supervisor_conf else [])]


def _start_standalone_supervisord(args: argparse.Namespace, socket_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(socket_path))
            return  # already running
        except OSError:
            pass
    supervisord = supervisor_binary("supervisord", args.python, bool(args.standalone))
    subprocess.run([supervisord, "-c", str(args.supervisor_conf)], check=True)
    deadline = time.monotonic() + 15
    while not socket_path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    standalone_root = args.standalone.resolve() if args.standalone else None
    args.log_file = args.log_file or (standalone_root / "log" / "z-image-turbo.log" if standalone_root
                                      else SYSTEM_LOG_FILE)
    args.crash_dir = args.crash_dir or (standalone_root / "crashes" if standalone_root else SYSTEM_CRASH_DIR)
    args.startsecs = args.startsecs or (DEMO_STARTSECS if "--demo" in args.app_args else DEFAULT_STARTSECS)
    if args.standalone:
        root = args.standalone.resolve()
        args.conf_dir = root / "conf.d"
        args.supervisor_conf = root / "supervisord.conf"
        args.conf_dir.mkdir(parents=True, exist_ok=True)
        args.supervisor_conf.write_text(render_standalone(root, args.log_file.parent, args.conf_dir, args.name))
    program = render_program(args)
    target = args.conf_dir / f"{args.name}.conf"
    try:
        for directory in (args.conf_dir, args.log_file.parent, args.crash_dir):
            directory.mkdir(parents=True, exist_ok=True)
        target.write_text(program)
    except PermissionError as error:
        print(f"install_service: cannot write {error.filename}: run as root (sudo) or choose other directories "
              f"(--conf-dir, --log-file, --crash-dir, or --standalone DIR).", file=sys.stderr)
        return 1
    print(f"wrote {target}")
    if args.no_update:
        return 0
    if args.standalone:
        _start_standalone_supervisord(args, args.standalone.resolve() / "supervisor.sock")
    supervisorctl = _supervisorctl(args)
    for command in (["reread"], ["update"]):
        result = subprocess.run([*supervisorctl, *command], capture_output=True, text=True)
        print(result.stdout.strip() or result.stderr.strip())
        if result.returncode != 0:
            print(f"install_service: `{' '.join(supervisorctl + command)}` failed; is supervisord running with "
                  f"{args.conf_dir} in its [include]?", file=sys.stderr)
            return 1
    status = subprocess.run([*supervisorctl, "status"], capture_output=True, text=True)
    print(status.stdout.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
