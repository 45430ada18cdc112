"""Run the timing-sensitive tests N times and print each test's pass count (`make test-stress`).

A support script, not a test file: flaky tests hide in single runs, so the reliability, locking,
stopping and two-process tests are run STRESS_N times (default 5), each round in a fresh pytest
process, and every test's outcomes are counted from pytest's junit XML.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = [
    "tests/test_reliability.py",
    "tests/test_locking.py",
    "tests/test_stopping.py",
    "tests/test_training.py::test_two_processes_agree",
]


def run_round(targets: list[str], extra: list[str], xml: Path) -> None:
    """One pytest process over `targets`; its results go to `xml` (its exit code is read from there)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *targets, *extra]
    subprocess.run(cmd, cwd=REPO, check=False)


def outcomes(xml: Path) -> dict[str, str]:
    """test id -> 'passed' / 'failed' / 'skipped' from a junit XML file (absent file: no results)."""
    if not xml.is_file():
        return {}
    found = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        found[name] = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
    return found


def main(argv: list[str]) -> int:
    rounds = int(os.environ.get("STRESS_N", "5"))
    # test paths first, pytest's options after them (an option's value, "-m 'not slow'", stays with it)
    cut = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    targets, extra = argv[:cut] or TARGETS, argv[cut:]
    passed, seen = Counter(), Counter()
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(rounds):
            xml = Path(tmp) / f"round{n}.xml"
            run_round(targets, extra, xml)
            for name, result in outcomes(xml).items():
                if result != "skipped":
                    seen[name] += 1
                    passed[name] += result == "passed"
    width = max((len(n) for n in seen), default=0)
    for name in sorted(seen):
        print(f"{name:<{width}}  {passed[name]}/{rounds}")
    flaky = [n for n in seen if passed[n] < rounds]
    print(f"{len(seen) - len(flaky)} of {len(seen)} tests passed {rounds}/{rounds}")
    return 1 if flaky or not seen else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
