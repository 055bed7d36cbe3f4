"""Repeats, medians, ratios, verdicts, tables and the py-spy summary for relay_bench.py.

Identical runs of one cell differ by up to 30 % on shared machines, so relay_bench.py runs every
cell several times with the targets interleaved (direct, A, B, ..., direct, A, B, ...). This
module turns those repeats into one figure per cell and target:

- `value`: the median of the repeats; `min`/`max` and `spread` ((max - min) / median) beside it;
- `ratio` (x direct): the median of the per-repeat ratios, each repeat's value over direct's value
  in the same round (so a slow minute moves both sides of a ratio), with its min and max;
- latencies, CPU shares and idle figures: medians of the repeats; flags: how many repeats had
  each (`gen-sat 3/3`); errors: summed.

Verdicts are judged on those medians; the heartbeat criterion on the median of the per-round
ratios passthrough / passthrough-no-hb (interleaved runs). Every repeat is kept in `repeats`.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol


class CellLike(Protocol):
    name: str
    mode: str


MEDIAN_KEYS = (
    "p50_us",
    "p99_us",
    "cpu_target",
    "cpu_gen",
    "cpu_backend",
    "cpu0_busy",
    "cpu1_busy",
    "backend_kib_per_session",
    "all_established_s",
    "last_established_s",
    "established",
    "completed",
    "sessions",
)

# issue 22's targets: (what, cell, target, kind, bound); kind "ratio" = median x direct, "kib" = KiB per session
TARGET_CHECKS = [
    ("handshakes/s, plain", "hs plain", "passthrough", "ratio", 0.55),
    ("handshakes/s, TLS", "hs tls", "passthrough", "ratio", 0.90),
    ("1 KiB x 100 round trips", "rt 1KiB x100", "passthrough", "ratio", 0.85),
    ("64 KiB x 100", "rt 64KiB x100", "passthrough", "ratio", 0.85),
    ("1 KiB x 1000", "rt 1KiB x1000", "passthrough", "ratio", 0.75),
    ("1 KiB x 100 over TLS", "rt 1KiB x100 tls", "passthrough", "ratio", 0.95),
    ("idle RSS per session, plain", "idle plain", "passthrough", "kib", 4.5),
    ("idle RSS per session, TLS", "idle tls", "passthrough", "kib", 18.0),
]
HEARTBEAT_BOUND = 0.05
NOISY = ("gen-sat", "cpu1-full", "cpu0-shared")


def _ok(r: dict | None) -> bool:
    return r is not None and "error" not in r and r.get("value") is not None


def _median(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def summarise(runs: dict[str, dict[str, list[dict]]]) -> dict[str, dict[str, dict]]:
    """Per target and cell: medians and spreads of the repeats, ratios to direct per round."""
    direct = runs.get("direct", {})
    out: dict[str, dict[str, dict]] = {}
    for target, cells in runs.items():
        out[target] = {}
        for cell, repeats in cells.items():
            good = [r for r in repeats if _ok(r)]
            if not good:
                first_error = next((r["error"] for r in repeats if "error" in r), "no value")
                out[target][cell] = {"error": first_error, "repeats": repeats}
                continue
            values = [r["value"] for r in good]
            med = statistics.median(values)
            base = direct.get(cell, [])
            ratios = [
                r["value"] / d["value"] for r, d in zip(repeats, base, strict=False) if _ok(r) and _ok(d) and d["value"]
            ]
            flags: Counter[str] = Counter()
            for r in good:
                flags.update({f.split(" ")[0] for f in r.get("flags", [])})
            kinds: Counter[str] = Counter()
            for r in repeats:
                kinds.update(r.get("error_kinds", {}))
            s = {
                "value": round(med, 3),
                "min": min(values),
                "max": max(values),
                "spread": round((max(values) - min(values)) / med, 3) if med else None,
                "n": len(good),
                "ratio": _median(ratios),
                "ratio_min": round(min(ratios), 3) if ratios else None,
                "ratio_max": round(max(ratios), 3) if ratios else None,
                "flags": [f"{f} {n}/{len(good)}" for f, n in sorted(flags.items())]
                + ([f"failed {len(repeats) - len(good)}/{len(repeats)}"] if len(good) < len(repeats) else []),
                "errors": sum(r.get("errors", 0) for r in repeats) + (len(repeats) - len(good)),
                "repeats": repeats,
            }
            if kinds:
                s["error_kinds"] = dict(kinds)
            for key in MEDIAN_KEYS:
                vals = [r[key] for r in good if r.get(key) is not None]
                if vals:
                    s[key] = _median(vals)
            out[target][cell] = s
    return out


def verdicts(summary: dict[str, dict[str, dict]], runs: dict[str, dict[str, list[dict]]]) -> list[dict]:
    out = []
    for what, cell, target, kind, bound in TARGET_CHECKS:
        r = summary.get(target, {}).get(cell)
        if r is None or r.get("value") is None:
            continue
        if kind == "ratio":
            got = r.get("ratio")
            met = got is not None and got >= bound
        else:
            got = r["value"]
            met = got <= bound
        noisy = [f for f in r.get("flags", []) if f.startswith(NOISY)]
        if r.get("spread") is not None and r["spread"] > 0.3:
            noisy.append(f"spread {r['spread']:.0%}")
        out.append({"target": what, "bound": bound, "kind": kind, "measured": got, "met": met, "caveats": noisy})
    on, off = runs.get("passthrough", {}), runs.get("passthrough-no-hb", {})
    for cell, offs in off.items():
        pairs = [a["value"] / b["value"] for a, b in zip(on.get(cell, []), offs, strict=False) if _ok(a) and _ok(b)]
        if pairs:
            moved = round(statistics.median(pairs) - 1, 3)
            out.append(
                {
                    "target": f"heartbeats on vs off, {cell}",
                    "bound": HEARTBEAT_BOUND,
                    "kind": "moved",
                    "measured": moved,
                    "met": abs(moved) <= HEARTBEAT_BOUND,
                    "caveats": [f"per-round {min(pairs) - 1:+.1%} .. {max(pairs) - 1:+.1%}"],
                }
            )
    return out


def fmt_us(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1000:.2f}ms" if v >= 1000 else f"{v:.0f}us"


def fmt_value(mode: str, r: dict) -> str:
    if "error" in r:
        return "error"
    v = r.get("value")
    if v is None:
        return "-"
    if mode == "idle":
        return f"{v:.1f} KiB/sess"
    if mode == "storm":
        t = r.get("all_established_s")
        when = f"all in {t:.2f}s" if t is not None else f"{r.get('established', 0):.0f} in bound"
        return f"{v:,.0f}/s ({when})"
    return f"{v:,.0f}/s"


def fmt_spread(r: dict) -> str:
    if r.get("spread") is None or r.get("n", 0) < 2:
        return "-"
    return f"±{r['spread'] / 2:.0%}"


def table(cells: Sequence[CellLike], summary: dict[str, dict[str, dict]], order: list[str]) -> str:
    head = ["cell", "target", "median", "spread", "x direct (min-max)", "p50", "p99", "target CPU", "CPU0 busy"]
    head += ["gen+backend", "CPU1 busy", "flags"]
    rows = [head]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.0%}"

    for cell in cells:
        for t in order:
            r = summary.get(t, {}).get(cell.name)
            if r is None:
                continue
            flags = list(r.get("flags", []))
            if r.get("error_kinds"):
                flags.append("errors " + ",".join(f"{k}={n}" for k, n in sorted(r["error_kinds"].items())))
            elif r.get("errors"):
                flags.append(f"errors={r['errors']}")
            if "error" in r:
                flags = [r["error"][:60]]
            ratio = r.get("ratio")
            ratio_s = "-" if ratio is None else f"{ratio:.2f}"
            if ratio is not None and r.get("n", 0) > 1:
                ratio_s += f" ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"
            gen = None if r.get("cpu_gen") is None else r["cpu_gen"] + (r.get("cpu_backend") or 0.0)
            rows.append(
                [
                    cell.name,
                    t,
                    fmt_value(cell.mode, r),
                    fmt_spread(r),
                    ratio_s,
                    fmt_us(r.get("p50_us")),
                    fmt_us(r.get("p99_us")),
                    pct(r.get("cpu_target")),
                    pct(r.get("cpu0_busy")),
                    pct(gen),
                    pct(r.get("cpu1_busy")),
                    ", ".join(flags),
                ]
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def verdict_table(checks: list[dict]) -> str:
    lines = ["| target (issue 22) | bound | measured (median) | met | caveat |", "|---|---|---|---|---|"]
    for c in checks:
        if c["kind"] == "kib":
            bound, got = f"<= {c['bound']:g} KiB", f"{c['measured']:.1f} KiB"
        elif c["kind"] == "moved":
            bound, got = f"within {c['bound']:.0%}", f"{c['measured']:+.1%}"
        else:
            bound = f">= {c['bound']:.2f} x direct"
            got = "-" if c["measured"] is None else f"{c['measured']:.2f}"
        caveat = ", ".join(c.get("caveats", []))
        lines.append(f"| {c['target']} | {bound} | {got} | {'met' if c['met'] else 'NOT met'} | {caveat} |")
    return "\n".join(lines)


def summarise_speedscope(path: Path, top: int = 25) -> dict:
    """Share of samples per function (lines of one function merged): self and inclusive."""
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]

    def label(f: dict) -> str:
        file = f.get("file") or ""
        short = "/".join(Path(file).parts[-2:]) if file else "?"
        return f"{f['name']} ({short})"

    names = [label(f) for f in frames]
    self_w: Counter[str] = Counter()
    total_w: Counter[str] = Counter()
    weight = 0.0
    for prof in data["profiles"]:
        weights = prof.get("weights") or [1] * len(prof["samples"])
        for stack, w in zip(prof["samples"], weights, strict=True):
            if not stack:
                continue
            weight += w
            self_w[names[stack[-1]]] += w
            for name in {names[i] for i in stack}:
                total_w[name] += w

    def ranked(c: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(w / weight, 4)) for name, w in c.most_common(top)]

    return {"sampled": round(weight, 2), "self": ranked(self_w), "inclusive": ranked(total_w), "file": str(path)}


def render_profile(summary: dict, default_cell: str) -> str:
    if "error" in summary:
        return f"profile: {summary['error']}"
    where = f"{summary.get('target', 'passthrough')}, {summary.get('cell', default_cell)}"
    lines = [f"py-spy, {summary['sampled']:g} s sampled ({where}); share of samples per function:"]
    for title in ("self", "inclusive"):
        lines.append(f"  {title}:")
        lines += [f"    {share:6.1%}  {name}" for name, share in summary[title]]
    return "\n".join(lines)
