"""Writes tests/fixtures/reference/manifest.json: every fixture file with its size and sha256.

A Rust test can check the manifest against the files to catch an edited or truncated fixture, and a
regeneration shows in one diff which fixtures changed.

Usage: python tests/reference/manifest.py
"""

from __future__ import annotations

import hashlib

from common import FIXTURES, write_json


def main() -> None:
    files = {}
    for path in sorted(p for p in FIXTURES.rglob("*") if p.is_file() and p.name != "manifest.json"):
        data = path.read_bytes()
        files[path.relative_to(FIXTURES).as_posix()] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    total = sum(f["bytes"] for f in files.values())
    write_json(FIXTURES / "manifest.json", {"total_bytes": total, "files": files})
    print(f"{len(files)} files, {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
