"""`wsproxy ctl`: runtime control of a running proxy from the command line.

It reads the admin address and the token from the same config file the proxy runs (so there is
nothing else to configure), talks to the admin write API (runtime/admin_api.py) with
`Authorization: Bearer`, and prints what happened: for people by default, JSON with `--json`.
With `workers: N` every worker has its own admin listener (admin port + i) and its own sessions:
ctl asks each one and sums (sessions are listed with the worker that holds them).
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
from typing import Any
from urllib.parse import urlencode

from wsproxy.config import Config, ConfigError, defaults, load_config
from wsproxy.config.control import read_admin_token

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_CONFIG = 2

DESCRIPTION = """\
Control a running wsproxy through its admin listener (admin.address of the config; writes need
admin.token_file or admin.token_env). With workers: N, every worker is asked and the answers summed.

commands:
  sessions                     list open sessions (filters: --pool --backend --client --route --older-than)
  drain POOL BACKEND           no new sessions for BACKEND; its open sessions go on
  maint POOL BACKEND           no new sessions, and its open sessions close with 1012 spread over
                               --spread (default: reload.drain_window)
  ready POOL BACKEND           take new sessions again (slow start when health checks run)
  close                        close the sessions a selector matches (--pool --backend --client --route
                               --older-than) with --code and --reason, spread over --spread
  rebalance POOL               close --percent of the busiest backends' sessions (or of --backend's)
                               over --over, so their clients reconnect through the balancer

BACKEND is host:port as the config spells it. Human output by default; --json for scripts.
Exit codes: 0 done, 1 the proxy refused or could not be reached, 2 bad config.
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """The `ctl` subcommand and its own subcommands (cli.py calls this)."""
    ctl: argparse.ArgumentParser = sub.add_parser(
        "ctl",
        help="runtime control: sessions, drain, maint, ready, close, rebalance",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ctl.add_argument("-c", "--config", required=True, help="the YAML file the proxy runs (admin address, token)")
    ctl.add_argument("--json", action="store_true", help="print JSON (one document) instead of text")
    ctl.add_argument("--timeout", type=float, default=defaults.CTL_TIMEOUT, help="seconds per admin request")
    cmds = ctl.add_subparsers(dest="ctl_command", required=True, metavar="COMMAND")

    def selector_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--pool", help="only sessions of this pool")
        p.add_argument("--backend", help="only sessions on this backend (host:port)")
        p.add_argument("--client", help="only sessions of this client address (or address:port)")
        p.add_argument("--route", help="only sessions whose request path starts with this")
        p.add_argument("--older-than", dest="older_than", help="only sessions older than this (e.g. 10m)")

    s = cmds.add_parser("sessions", help="list open sessions")
    selector_args(s)
    s.add_argument("--limit", type=int, default=defaults.SESSIONS_PAGE, help="at most this many per worker")
    for name, what in (
        ("drain", "no new sessions; the open ones go on"),
        ("maint", "no new sessions; the open ones close with 1012, spread"),
        ("ready", "take new sessions again"),
    ):
        p = cmds.add_parser(name, help=what)
        p.add_argument("pool")
        p.add_argument("backend", help="host:port as in the config")
        p.add_argument("--weight", type=int, help="also set the balancing weight (1..1000)")
        if name == "maint":
            p.add_argument("--spread", help="close over this long (default: reload.drain_window)")
    c = cmds.add_parser("close", help="close the sessions a selector matches")
    selector_args(c)
    c.add_argument("--code", type=int, default=1000, help="close code 1000..4999 (default 1000)")
    c.add_argument("--reason", default="closed by the operator", help="close reason (at most 123 bytes)")
    c.add_argument("--spread", default="0s", help="close at a flat rate over this long (e.g. 60s)")
    r = cmds.add_parser("rebalance", help="close a share of sessions so clients reconnect elsewhere")
    r.add_argument("pool")
    r.add_argument("--backend", help="take the share of this backend (default: the most loaded ones)")
    r.add_argument("--percent", type=float, required=True, help="share of sessions to move, (0, 100]")
    r.add_argument("--over", default="30s", help="spread the closes over this long (default 30s)")
    return ctl


def add_upgrade_parser(sub: Any) -> argparse.ArgumentParser:
    """`wsproxy upgrade`: a binary upgrade without refused connections (cli.py calls this)."""
    up: argparse.ArgumentParser = sub.add_parser(
        "upgrade",
        help="validate the file, then tell the running proxy to hand its listeners to a new process (SIGUSR2)",
        description="Validate FILE, then send SIGUSR2 to the proxy named by the pid file: it starts a new "
        "wsproxy (the installed one) on FILE, hands it the listening sockets, and once the new process "
        "accepts, stops accepting and drains its own sessions with 1001 over shutdown.drain_window. A new "
        "process that fails to start leaves the old one serving. With workers: N, every worker is replaced.",
    )
    up.add_argument("-c", "--config", required=True, help="YAML configuration file")
    up.add_argument("--pid-file", default=None, help="default: pid_file of the config")
    return up


def run_upgrade(args: argparse.Namespace) -> int:
    """Validate first (a bad file never reaches the running proxy), then SIGUSR2 it."""
    import signal

    from wsproxy.cli import signal_proxy

    return signal_proxy(args, signal.SIGUSR2, "it logs whether the new process took over")


class CtlError(Exception):
    """The proxy could not be reached or refused the request."""


def _admin_ports(config: Config) -> tuple[str, list[int]]:
    admin = config.admin
    if admin is None:
        raise CtlError(f"{config.source}: admin: not set; the proxy has no admin listener to talk to")
    host = admin.address.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1" if host != "::" else "::1"
    return host, [admin.address.port + i for i in range(config.workers)]


def _request(host: str, port: int, method: str, path: str, body: Any, token: bytes | None, timeout: float) -> Any:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    headers = {"Connection": "close"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token is not None:
        headers["Authorization"] = "Bearer " + token.decode("latin-1")
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read(1 << 24)
    except OSError as exc:
        raise CtlError(f"cannot reach the admin listener at {host}:{port}: {exc}") from None
    finally:
        conn.close()
    try:
        doc = json.loads(raw) if raw.strip() else {}
    except ValueError:
        doc = {"error": raw.decode(errors="replace").strip()}
    if resp.status != 200:
        raise CtlError(f"{host}:{port}: {resp.status} {doc.get('error', '') if isinstance(doc, dict) else doc}")
    return doc


def _selector(args: argparse.Namespace) -> dict[str, str]:
    return {k: v for k in ("pool", "backend", "client", "route", "older_than") if (v := getattr(args, k, None))}


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_BAD_CONFIG
    try:
        host, ports = _admin_ports(config)
        token = None
        if config.admin is not None and config.admin.writable:
            try:
                token = read_admin_token(config.admin.token_file, config.admin.token_env)
            except ValueError as exc:
                if args.ctl_command != "sessions":
                    raise CtlError(str(exc)) from None
        answers = [(i, _one(args, host, port, token)) for i, port in enumerate(ports)]
    except CtlError as exc:
        print(f"wsproxy ctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    result = _sum(args.ctl_command, answers)
    print(json.dumps(result, indent=2) if args.json else _human(args.ctl_command, result))
    return EXIT_OK


def _one(args: argparse.Namespace, host: str, port: int, token: bytes | None) -> Any:
    cmd, t = args.ctl_command, args.timeout
    if cmd == "sessions":
        rows: list[dict[str, Any]] = []
        after = 0
        while len(rows) < args.limit:
            query = {**_selector(args), "limit": str(min(args.limit - len(rows), defaults.SESSIONS_PAGE_MAX))}
            if after:
                query["after"] = str(after)
            doc = _request(host, port, "GET", "/sessions?" + urlencode(query), None, token, t)
            rows += doc["sessions"]
            if doc["next"] is None:
                break
            after = doc["next"]
        return rows
    if cmd in ("drain", "maint", "ready"):
        body: dict[str, Any] = {"pool": args.pool, "backend": args.backend, "state": cmd}
        if args.weight is not None:
            body["weight"] = args.weight
        if cmd == "maint" and args.spread:
            body["spread"] = args.spread
        return _request(host, port, "POST", "/backends/state", body, token, t)
    if cmd == "close":
        body = {"selector": _selector(args), "code": args.code, "reason": args.reason, "spread": args.spread}
        return _request(host, port, "POST", "/sessions/close", body, token, t)
    body = {"pool": args.pool, "percent": args.percent, "over": args.over}
    if args.backend:
        body["backend"] = args.backend
    return _request(host, port, "POST", "/rebalance", body, token, t)


def _sum(cmd: str, answers: list[tuple[int, Any]]) -> dict[str, Any]:
    """One document for every worker's answer: counts summed, sessions listed with their worker."""
    if cmd == "sessions":
        rows = [{"worker": i, **row} for i, doc in answers for row in doc]
        return {"sessions": rows, "count": len(rows), "workers": len(answers)}
    first = answers[0][1]
    total: dict[str, Any] = {k: v for k, v in first.items() if not isinstance(v, int | float) or k == "spread_s"}
    total["workers"] = len(answers)
    for key in ("closing", "active_sessions"):
        if key in first:
            total[key] = sum(doc.get(key, 0) for _, doc in answers)
    if "by_backend" in first:
        merged: dict[str, int] = {}
        for _, doc in answers:
            for name, n in doc["by_backend"].items():
                merged[name] = merged.get(name, 0) + n
        total["by_backend"] = merged
    for key in ("weight", "code"):
        if key in first:
            total[key] = first[key]
    return total


def _human(cmd: str, r: dict[str, Any]) -> str:
    if cmd == "sessions":
        if not r["sessions"]:
            return "no open sessions match"
        head = f"{'worker':>6} {'id':>6}  {'client':<22} {'pool':<10} {'backend':<22} {'age':>9}  msgs in/out  route"
        lines = [head]
        for s in r["sessions"]:
            lines.append(
                f"{s['worker']:>6} {s['id']:>6}  {s['client']:<22} {s['pool'] or '-':<10} {s['backend'] or '-':<22} "
                f"{s['age_s']:>8.1f}s  {s['messages_to_backend']}/{s['messages_to_client']}  {s['route'] or '-'}"
            )
        lines.append(f"{r['count']} session(s) on {r['workers']} worker(s)")
        return "\n".join(lines)
    if cmd in ("drain", "maint", "ready"):
        text = (
            f"pool {r['pool']} backend {r['backend']}: {r['state']} (was {r['previous']}), weight {r['weight']}, "
            f"{r['active_sessions']} open session(s)"
        )
        if r.get("closing"):
            text += f"; closing {r['closing']} with 1012 over {r['spread_s']:g}s"
        return text
    if cmd == "close":
        return f"closing {r['closing']} session(s) with {r['code']} over {r['spread_s']:g}s"
    per = ", ".join(f"{name}: {n}" for name, n in sorted(r.get("by_backend", {}).items())) or "nothing to move"
    return f"pool {r['pool']}: closing {r['closing']} session(s) over {r['spread_s']:g}s ({per})"
