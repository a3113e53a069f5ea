"""Copy the result reports into ``bench/README.md`` (not a benchmark).

Every ``<!-- copied from results/<name>.md -->`` marker in the README (``<name>`` may
start with ``archive/``) is followed by the current contents of
``bench/results/<name>.md``, headings demoted two levels (``#`` -> ``###``), up to the
next marker or the next ``## `` section. Run it after a benchmark so
that the README shows exactly what the scripts wrote::

    .venv/bin/python bench/sync_readme.py          # rewrite bench/README.md
    .venv/bin/python bench/sync_readme.py --check  # exit 1 if the README is stale

``tests/test_readme.py`` runs the check, so a README table can never drift from its
result file.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
MARKER = re.compile(r"^<!-- copied from results/((?:archive/)?[\w.-]+\.md) -->$")


IMAGE = re.compile(r"\]\((?!https?:|results/)([\w.-]+\.png)\)")


def demote(report: str) -> list[str]:
    """The report's lines with every markdown heading two levels deeper and image links
    made relative to ``bench/``."""
    lines = report.rstrip("\n").split("\n")
    return [IMAGE.sub(r"](results/\1)", ("##" + line) if line.startswith("#") else line) for line in lines]


def synced(readme: str, results: Path) -> str:
    """``readme`` with every copied block replaced by its result file."""
    out: list[str] = []
    lines = readme.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        match = MARKER.match(line)
        if not match:
            continue
        out += demote((results / match.group(1)).read_text())
        out.append("")
        while i < len(lines) and not MARKER.match(lines[i]) and not lines[i].startswith("## "):
            i += 1
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only report whether the README is stale")
    args = p.parse_args(argv)
    readme = BENCH / "README.md"
    current = readme.read_text()
    fresh = synced(current, BENCH / "results")
    if args.check:
        if fresh != current:
            print("bench/README.md is stale: run bench/sync_readme.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(fresh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
