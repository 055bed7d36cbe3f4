"""Run the fuzz targets for a while: `python -m tests.fuzz --minutes 10` (see docs/fuzzing.md).

Every target runs in rounds of fresh random examples (no example database, a new seed each
round) until the time is up; each target runs at least one round. On the first failure the
falsifying example, shrunk by hypothesis, is printed with a blob to reproduce it, and the exit
status is 1.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections import Counter

from hypothesis import HealthCheck, settings

from tests.fuzz.targets import TARGETS


def run(seconds: float, names: list[str], examples: int) -> int:
    deadline = time.monotonic() + seconds
    rounds: Counter[str] = Counter()
    config = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
    )
    tests = {name: config(TARGETS[name]) for name in names}  # settings go on once; each call draws anew
    while True:
        for name in names:
            if rounds[name] and time.monotonic() >= deadline:
                continue
            try:
                tests[name]()
            except Exception:
                traceback.print_exc()
                print(f"fuzz target {name} FAILED after {rounds[name]} clean round(s)", file=sys.stderr)
                return 1
            rounds[name] += 1
        if time.monotonic() >= deadline and all(rounds[n] for n in names):
            break
    for name in names:
        print(f"{name}: {rounds[name]} round(s) x {examples} examples, no failure")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.splitlines()[0])
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="how long to run (default 1)")
    length.add_argument("--seconds", type=float, help="how long to run, in seconds")
    parser.add_argument("--target", action="append", choices=sorted(TARGETS), help="only these (repeatable)")
    parser.add_argument("--examples", type=int, default=200, help="examples per round (default 200)")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else 60.0 * (args.minutes if args.minutes is not None else 1.0)
    return run(seconds, args.target or list(TARGETS), args.examples)


if __name__ == "__main__":
    sys.exit(main())
