"""Fails when a JUnit report holds a skipped test whose reason is not on the allow-list.

A skip hides a test that did not run; in CI that counts as a failure unless the reason is one
the project accepts (one substring per line in the allow-list file; # starts a comment).
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def allowed(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def skips(report: Path) -> list[tuple[str, str]]:
    out = []
    for case in ET.parse(report).getroot().iter("testcase"):
        for skipped in case.iter("skipped"):
            name = f"{case.get('classname')}::{case.get('name')}"
            out.append((name, f"{skipped.get('message') or ''} {skipped.text or ''}".strip()))
    return out


def main(report: str, allow_list: str) -> int:
    patterns = allowed(Path(allow_list))
    bad = [(name, why) for name, why in skips(Path(report)) if not any(p in why for p in patterns)]
    for name, why in bad:
        print(f"skip not allowed in CI: {name}: {why}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
