"""What breaks on the newest releases pyproject.toml allows (`make deps-latest`).

Run with the Python of the separate venv that `make deps-latest` fills with the newest releases within
pyproject.toml's bounds (no constraints). It prints every package whose installed version differs from
constraints.txt (the versions the suite last passed on), runs pytest in this venv (PYTEST_ARGS picks a subset;
default: the whole suite), and closes with a summary naming each failed or errored test and its one-line
error. Exits non-zero when anything broke.

    make deps-latest                                  # whole suite
    make deps-latest PYTEST_ARGS="tests/engine/test_prompt.py -q"
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import shlex
import subprocess
import sys
import tempfile
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONSTRAINTS = REPO / "constraints.txt"
# `make lock` leaves pip out (every venv upgrades it first).
NOT_LOCKED = {"pip"}
GENERIC_MESSAGES = {"", "collection failure"}


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def public(version: str) -> str:
    """2.13.0+cpu -> 2.13.0: constraints.txt lists the public version of a local build."""
    return version.split("+", 1)[0]


def read_constraints(path: Path) -> dict[str, tuple[str, str]]:
    """canonical name -> (name as written, version)."""
    pins: dict[str, tuple[str, str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise SystemExit(f"{path.name}: not a name==version line: {raw!r}")
        pins[canon(name.strip())] = (name.strip(), version.strip())
    return pins


def installed() -> dict[str, tuple[str, str]]:
    """canonical name -> (name, version) of every distribution in this interpreter's environment."""
    project = canon(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["name"])
    found: dict[str, tuple[str, str]] = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if not name:
            continue
        key = canon(name)
        if key in NOT_LOCKED or key == project:
            continue
        found[key] = (name, dist.version)
    return found


def version_table(pins: dict[str, tuple[str, str]], have: dict[str, tuple[str, str]]) -> list[tuple[str, str, str]]:
    rows = []
    for key in sorted(set(pins) | set(have)):
        tested = pins[key][1] if key in pins else "-"
        latest = have[key][1] if key in have else "-"
        if tested == "-" or latest == "-" or public(latest) != tested:
            rows.append(((have.get(key) or pins[key])[0], tested, latest))
    return rows


def print_table(rows: list[tuple[str, str, str]], total: int) -> None:
    print(f"\n== Versions that differ from {CONSTRAINTS.name} ({len(rows)} of {total}; '-' = absent)")
    if not rows:
        print("none: every package is at the tested version")
        return
    header = ("package", "tested", "latest")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def nodeid(case: ET.Element) -> str:
    """pytest's node id from a junit testcase written with junit_family=xunit1 (which records the file)."""
    classname, name, file = case.get("classname", ""), case.get("name", ""), case.get("file")
    if file:
        module = file.removesuffix(".py").replace("/", ".").replace("\\", ".")
        if not classname and name == module:  # a module that failed to collect
            return file
        rest = classname[len(module) + 1:] if classname.startswith(module + ".") else ""
        return "::".join([file, *(rest.split(".") if rest else []), name])
    return "::".join(p for p in (classname, name) if p)


def one_line(problem: ET.Element) -> str:
    lines = [ln.strip() for ln in (problem.get("message") or "").splitlines() if ln.strip()]
    # 'failed on setup with "RuntimeError: ..."' quotes the whole exception: keep all of it on the line.
    line = (" ".join(lines) if lines[0].startswith("failed on ") else lines[0]) if lines else ""
    if line in GENERIC_MESSAGES:
        text = (problem.text or "").splitlines()
        e_lines = [ln[1:].strip() for ln in text if ln.startswith("E ") and ln[1:].strip()]
        rest = [ln.strip() for ln in text if ln.strip()]
        line = e_lines[-1] if e_lines else (rest[-1] if rest else line or "(no message)")
    return line if len(line) <= 240 else line[:237] + "..."


def read_junit(path: Path) -> tuple[dict[str, int], list[tuple[str, str, str]]]:
    counts = {"passed": 0, "failed": 0, "errored": 0, "skipped": 0}
    broke: list[tuple[str, str, str]] = []
    for case in ET.parse(path).getroot().iter("testcase"):
        failures, errors = case.findall("failure"), case.findall("error")
        for problem in failures:
            broke.append(("FAILED", nodeid(case), one_line(problem)))
        for problem in errors:
            broke.append(("ERROR", nodeid(case), one_line(problem)))
        if errors:
            counts["errored"] += 1
        elif failures:
            counts["failed"] += 1
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts, broke


def run_pytest(args: list[str], junit: Path) -> int:
    bindir = str(Path(sys.executable).parent)
    env = dict(os.environ, VIRTUAL_ENV=str(Path(bindir).parent), PATH=bindir + os.pathsep + os.environ["PATH"])
    # A module that no longer imports must not hide the rest: collection errors don't stop the run. xunit1
    # records each test's file, so node ids can be rebuilt; no cache, so .pytest_cache's last-failed list
    # stays that of the tested venv.
    cmd = [sys.executable, "-m", "pytest", *args, "--continue-on-collection-errors", f"--junitxml={junit}",
           "-o", "junit_family=xunit1", "-p", "no:cacheprovider"]
    print(f"\n== {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
    return subprocess.call(cmd, cwd=REPO, env=env)


def main() -> int:
    pins, have = read_constraints(CONSTRAINTS), installed()
    print(f"deps-latest: {sys.executable} (Python {sys.version.split()[0]})")
    rows = version_table(pins, have)
    print_table(rows, len(set(pins) | set(have)))

    args = shlex.split(os.environ.get("PYTEST_ARGS", "")) or ["-q"]
    with tempfile.TemporaryDirectory(prefix="deps-latest-") as tmp:
        junit = Path(tmp) / "junit.xml"
        rc = run_pytest(args, junit)
        report = read_junit(junit) if junit.is_file() else None

    print(f"\n== Summary: the suite on the newest releases the bounds allow (versions differing: {len(rows)})")
    if report is None:
        print(f"pytest exited {rc} without writing a report")
        return rc or 1
    counts, broke = report
    print(", ".join(f"{n} {k}" for k, n in counts.items()))
    for kind, node, message in broke:
        print(f"{kind} {node} - {message}")
    if broke:
        print("BROKE: the tested set is constraints.txt; pin the release that broke or fix the code")
        return rc or 1
    if rc != 0:
        print(f"pytest exited {rc} (2: interrupted, 3: internal error, 4: usage error, 5: no tests collected)")
        return rc
    if rows and not os.environ.get("PYTEST_ARGS", "").strip():
        print("nothing broke: `make lock LOCK_FROM=.venv-latest` takes these versions as the tested set")
    return 0


if __name__ == "__main__":
    sys.exit(main())
