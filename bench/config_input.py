"""Hostile and broken config files against ``linectl check``: time, peak memory, what it says.

    .venv/bin/python bench/config_input.py

Each input is written to a temporary file and checked by a fresh ``linectl check`` process;
the row shows its wall time, its peak resident memory (from wait4's rusage), its exit code and
the first line it printed. Before the limits (issue 13) the alias bomb took 80 s and 8 GB, the
others ended in a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEMO = (Path(__file__).resolve().parent.parent / "config" / "demo.yaml").read_text()


def bomb() -> str:
    """A "billion laughs" of 817 bytes: nine levels of nine aliases."""
    text = 'lol: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        text += f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]\n"
    return text + "#" * max(0, 816 - len(text)) + "\n"


INPUTS: dict[str, bytes] = {
    "alias bomb": bomb().encode(),
    "self-referencing alias": b"line: &x [*x]\n",
    "3,000-deep nesting": b"line: " + b"[" * 3000 + b"]" * 3000 + b"\n",
    "cycle_s: .inf": DEMO.replace("cycle_s: 8", "cycle_s: .inf", 1).encode(),
    "cycle_s: 1e308": DEMO.replace("cycle_s: 8", "cycle_s: 1.0e308", 1).encode(),
    "a Latin-1 byte": DEMO.encode() + "# café\n".encode("latin-1"),
    "2 MiB file": DEMO.encode() + b"#" + b"x" * (2 * 1024 * 1024) + b"\n",
    "metrics.port = api.port": (DEMO + "metrics: {port: 9600}\napi: {port: 9600}\n").encode(),
}


def run(path: Path) -> tuple[float, int, int, str]:
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "linectl.cli", "check", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    first = next(
        (ln for ln in out.decode(errors="replace").splitlines() if "error" in ln or ":" in ln), ""
    )
    return wall, usage.ru_maxrss, os.waitstatus_to_exitcode(status), first


def main() -> None:
    print(f"{'input':<26} {'bytes':>9} {'wall':>7} {'peak RSS':>9} exit  first line")
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in INPUTS.items():
            path = Path(tmp) / "line.yaml"
            path.write_bytes(data)
            wall, rss_kib, code, first = run(path)
            first = first.replace(str(path), "line.yaml")
            print(
                f"{name:<26} {len(data):>9} {wall:>6.2f}s {rss_kib / 1024:>7.0f} MB {code:>4}  "
                f"{first[:110]}"
            )


if __name__ == "__main__":
    main()
