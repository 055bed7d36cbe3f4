"""The command line: `wsproxy run|check|demo -c FILE`, `--version`. Exit codes: 0 ok, 2 bad config.

Other tooling drives wsproxy through these commands, so they are extended, never renamed.
"""

from __future__ import annotations

import argparse
import logging
import sys

import trio

from wsproxy import __version__
from wsproxy.config import ConfigError, load_config

EXIT_OK = 0
EXIT_BAD_CONFIG = 2


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wsproxy", description="A WebSocket-aware L7 load balancer.")
    p.add_argument("--version", action="version", version=f"wsproxy {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve in the foreground, logging to stderr")
    run.add_argument("-c", "--config", required=True, help="YAML configuration file")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    check = sub.add_parser("check", help="validate a configuration file and exit")
    check.add_argument("-c", "--config", required=True, help="YAML configuration file")
    demo = sub.add_parser("demo", help="run two demo backends and the proxy on conf/demo.yaml")
    demo.add_argument("-c", "--config", default=None, help="default: conf/demo.yaml")
    demo.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    demo.add_argument(
        "--self-check-only", action="store_true", help="run the self-check, then stop (exit 1 if it fails)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(exc.render(), file=sys.stderr)
            return EXIT_BAD_CONFIG
        print(config.summary())
        return EXIT_OK
    if args.command == "run":
        _setup_logging(args.log_level)
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(exc.render(), file=sys.stderr)
            return EXIT_BAD_CONFIG
        from wsproxy import supervisor

        try:
            trio.run(supervisor.run, config)
        except OSError as exc:
            logging.getLogger("wsproxy").error("cannot start: %s", exc)
            return 1
        return EXIT_OK
    if args.command == "demo":
        _setup_logging(args.log_level)
        from wsproxy import demo

        return demo.main(args.config, self_check_only=args.self_check_only)
    return EXIT_BAD_CONFIG  # argparse rejects unknown commands before this


if __name__ == "__main__":
    sys.exit(main())
