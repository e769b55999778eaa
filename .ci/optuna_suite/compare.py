"""Compare the baseline and patched runs written by the ``outcomes`` plugin.

Usage: python compare.py BASELINE.jsonl PATCHED.jsonl [--list-diff] [--max N]

Prints passed/failed/errors/skipped for both runs, the tests that pass plain but not
patched (at most --max, default 50; all with --list-diff, which also lists the reverse
direction), and the commonest failure messages of the patched run. Exit status 1 when any
test that passes plain does not pass patched (a test the patched run never reached counts
as not passing), else 0.
"""

from __future__ import annotations

import argparse
from collections import Counter
import json
import re
import sys


def load(path: str) -> dict[str, tuple[str, str]]:
    """nodeid -> (outcome, message); outcome in passed/failed/error/skipped/xfailed/xpassed."""
    phases: dict[str, dict[str, dict]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                rec = json.loads(line)
                phases.setdefault(rec["nodeid"], {})[rec["when"]] = rec
    result = {}
    for nodeid, ph in phases.items():
        if "collect" in ph:
            result[nodeid] = ("error", ph["collect"]["message"])
            continue
        setup, call, teardown = ph.get("setup"), ph.get("call"), ph.get("teardown")
        if call is not None and call["outcome"] == "failed":
            result[nodeid] = ("failed", call["message"])
        elif setup is not None and setup["outcome"] == "failed":
            result[nodeid] = ("error", setup["message"])
        elif teardown is not None and teardown["outcome"] == "failed":
            result[nodeid] = ("error", "teardown: " + teardown["message"])
        elif any(p["outcome"] == "skipped" for p in ph.values()):
            xf = any(p["xfail"] for p in ph.values())
            msg = next(p["message"] for p in ph.values() if p["outcome"] == "skipped")
            result[nodeid] = ("xfailed" if xf else "skipped", msg)
        elif call is None:
            result[nodeid] = ("error", "no call phase recorded (run interrupted?)")
        else:
            result[nodeid] = ("xpassed" if call["xfail"] else "passed", "")
    return result


def counts(res: dict[str, tuple[str, str]]) -> str:
    c = Counter(o for o, _ in res.values())
    shown = ["passed", "failed", "error", "skipped"] + [k for k in ("xfailed", "xpassed") if c[k]]
    return ", ".join(f"{c[k]} {k}" for k in shown) + f" (total {len(res)})"


def first_line(msg: str) -> str:
    return (msg.strip().splitlines() or [""])[0]


def category(msg: str) -> str:
    """A failure message with its specifics blanked, to group alike failures."""
    s = first_line(msg)
    s = re.sub(r"0x[0-9a-fA-F]+", "0x…", s)
    s = re.sub(r"'[^']*'", "'…'", s)
    s = re.sub(r"\"[^\"]*\"", '"…"', s)
    s = re.sub(r"<[^<>]*>", "<…>", s)
    s = re.sub(r"\d+(\.\d+)?", "N", s)
    return s[:150]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("baseline")
    ap.add_argument("patched")
    ap.add_argument("--list-diff", action="store_true")
    ap.add_argument("--max", type=int, default=50)
    ap.add_argument("--categories", type=int, default=12)
    ap.add_argument("--lost-ids", action="store_true",
                    help="only print the ids of tests that pass plain but not patched")
    args = ap.parse_args()
    base, pat = load(args.baseline), load(args.patched)
    if args.lost_ids:
        print("\n".join(n for n, (o, _) in sorted(base.items()) if o == "passed"
                        and pat.get(n, ("not run", ""))[0] != "passed"))
        return 0

    print(f"baseline (plain optuna):        {counts(base)}")
    print(f"patched (optuna_mlflow_nested): {counts(pat)}")

    lost = sorted(n for n, (o, _) in base.items() if o == "passed"
                  and pat.get(n, ("not run", ""))[0] != "passed")
    gained = sorted(n for n, (o, _) in pat.items() if o == "passed"
                    and base.get(n, ("not run", ""))[0] != "passed")
    limit = None if args.list_diff else args.max
    if lost:
        print(f"\n{len(lost)} test(s) pass plain but not patched"
              + ("" if limit is None or len(lost) <= limit else f" (first {limit})") + ":")
        for n in lost[:limit]:
            o, m = pat.get(n, ("not run", ""))
            print(f"  {o.upper():7} {n}  --  {first_line(m)[:160]}")
    if gained and args.list_diff:
        print(f"\n{len(gained)} test(s) pass patched but not plain:")
        for n in gained:
            o, m = base.get(n, ("not run", ""))
            print(f"  plain {o.upper():7} {n}  --  {first_line(m)[:160]}")

    lost_set = set(lost)
    cats = Counter(category(m) for n, (o, m) in pat.items() if n in lost_set)
    if cats:
        print(f"\ncommonest failure messages among those {len(lost)} (count, message):")
        for msg, k in cats.most_common(args.categories):
            print(f"  {k:5}  {msg}")

    bp = sum(o == "passed" for o, _ in base.values())
    pp = sum(o == "passed" for o, _ in pat.values())
    if lost:
        print(f"\nRESULT: FAIL - patched run passes {pp} tests, baseline {bp}; "
              f"{len(lost)} baseline-passing test(s) do not pass patched")
        return 1
    print(f"\nRESULT: OK - every test that passes on plain Optuna ({bp}) passes patched ({pp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
