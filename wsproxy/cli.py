"""The command line: `wsproxy run|check|reload|demo -c FILE`, `--version`. Exit codes: 0 ok,
1 cannot start / cannot signal, 2 bad config.

Other tooling drives wsproxy through these commands, so they are extended, never renamed.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

import trio

from wsproxy import __version__
from wsproxy.config import Config, ConfigError, load_config

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_CONFIG = 2


def _setup_logging(level: str, fmt: str = "text") -> None:
    from wsproxy.observe.session_log import setup_logging

    setup_logging(level, fmt, sys.stderr)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wsproxy", description="A WebSocket-aware L7 load balancer.")
    p.add_argument("--version", action="version", version=f"wsproxy {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve in the foreground, logging to stderr")
    run.add_argument("-c", "--config", required=True, help="YAML configuration file")
    run.add_argument(
        "--log-level", default=None, choices=["debug", "info", "warning", "error"], help="default: log.level"
    )
    run.add_argument("--pid-file", default=None, help="write the process id here (default: pid_file of the config)")
    run.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # its index, from the supervisor
    check = sub.add_parser("check", help="validate a configuration file and exit")
    check.add_argument("-c", "--config", required=True, help="YAML configuration file")
    reload = sub.add_parser("reload", help="validate the file, then tell the running proxy to reload it (SIGHUP)")
    reload.add_argument("-c", "--config", required=True, help="YAML configuration file")
    reload.add_argument("--pid-file", default=None, help="default: pid_file of the config")
    demo = sub.add_parser("demo", help="run two demo backends and the proxy on the packaged demo config")
    demo.add_argument(
        "-c",
        "--config",
        default=None,
        help="default: the packaged demo config (conf/demo.yaml in a checkout); its relative TLS paths name "
        "files in --certs",
    )
    demo.add_argument(
        "--certs",
        default=None,
        metavar="DIR",
        help="where the development certificates are made and kept (default: $XDG_CACHE_HOME/wsproxy/certs "
        "or ~/.cache/wsproxy/certs)",
    )
    demo.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    demo.add_argument(
        "--self-check-only", action="store_true", help="run the self-check, then stop (exit 1 if it fails)"
    )
    demo.add_argument(
        "--free-ports",
        action="store_true",
        help="let the system pick free loopback ports for the listeners and backends (printed by the self-check)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        try:
            config = load_config(args.config)
            _check_files(config)
        except ConfigError as exc:
            print(exc.render(), file=sys.stderr)
            return EXIT_BAD_CONFIG
        print(config.summary())
        return EXIT_OK
    if args.command == "run":
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(exc.render(), file=sys.stderr)
            return EXIT_BAD_CONFIG
        _setup_logging(args.log_level or config.log.level, config.log.format)
        return _run(config, args)
    if args.command == "reload":
        return _reload(args)
    if args.command == "demo":
        _setup_logging(args.log_level)
        from wsproxy import demo

        return demo.main(
            args.config, certs_dir=args.certs, self_check_only=args.self_check_only, free_ports=args.free_ports
        )
    return EXIT_BAD_CONFIG  # argparse rejects unknown commands before this


def _check_files(config: Config) -> None:
    """What `run` loads beyond the YAML, loaded the way `run` will: every TLS certificate and key."""
    from wsproxy.runtime.listen import tls_problems

    problems = tls_problems(config)
    if problems:
        raise ConfigError(config.source, problems)


def _run(config: Config, args: argparse.Namespace) -> int:
    from wsproxy.runtime import supervisor

    pid_file = None if args.worker is not None else (Path(args.pid_file) if args.pid_file else config.pid_file)
    # Until the signal receiver is up, a SIGHUP (an early `wsproxy reload`, or one passed on to a
    # starting worker) must not kill the process: the config it is about to serve is already fresh.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        if pid_file is not None:
            write_pid_file(pid_file)
        if config.workers > 1 and args.worker is None:
            tail = ["--log-level", args.log_level] if args.log_level else []
            trio.run(supervisor.Supervisor(config.workers, args.config, tail).run)
        else:
            trio.run(supervisor.run, config, args.config, args.worker or 0)
    except (OSError, BaseExceptionGroup) as exc:  # trio wraps startup errors (a port in use) in a group
        errors = supervisor.startup_errors(exc)
        if errors is None:
            raise
        for err in errors:  # runtime/listen.py's errors name the listener, its address and the file
            logging.getLogger("wsproxy").error("cannot start: %s: %s", config.source, err)
        return EXIT_FAILED
    finally:
        if pid_file is not None:
            with contextlib.suppress(OSError):
                if pid_file.read_text().strip() == str(os.getpid()):
                    pid_file.unlink()
    return EXIT_OK


def _reload(args: argparse.Namespace) -> int:
    """Validate first (a bad file never reaches the running proxy), then SIGHUP it."""
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_BAD_CONFIG
    pid_file = Path(args.pid_file) if args.pid_file else config.pid_file
    if pid_file is None:
        print(f"{args.config}: pid_file: not set; give --pid-file or set pid_file in the config", file=sys.stderr)
        return EXIT_FAILED
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        print(f"cannot signal the proxy named by {pid_file}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"sent SIGHUP to wsproxy (pid {pid}); it logs whether the reload was applied")
    return EXIT_OK


def write_pid_file(pid_file: Path) -> None:
    """Written whole, then renamed, so a reader never sees the file empty or half written; where
    the directory does not allow a new file (a pid file pre-created in /run), in place."""
    partial = pid_file.with_name(f".{pid_file.name}.{os.getpid()}")
    try:
        partial.write_text(f"{os.getpid()}\n")
        partial.replace(pid_file)
    except OSError:
        partial.unlink(missing_ok=True)
        pid_file.write_text(f"{os.getpid()}\n")


if __name__ == "__main__":  # `python -m wsproxy.cli ...`, the same as `python -m wsproxy ...`
    sys.exit(main())
