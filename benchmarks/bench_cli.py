"""How long the command line takes to answer, and whether a verb imports torch (issue 9, part 4).

    python benchmarks/bench_cli.py [--repeats 7] [--data DIR]

Times whole processes, as a user meets them: ``fuse4seg --version``, ``--help``, ``metrics
--help``, ``data check --help``, ``metrics`` on one 256×256 pair (written by this script:
random grey PNGs, F = max(A, B)) and, with ``--data``, ``data check DIR``. Each call runs
``python -X importtime -m fuse4seg ...`` in a fresh interpreter; the commands take turns (the
order reversed every round) so that they share the machine's load, and the table gives the
median wall time over the rounds, whether ``torch`` was imported (read from ``-X importtime``'s
report) and the import time of the slowest top-level package. Two baselines are timed in the
same turns: ``python -c pass`` (the interpreter alone) and ``python -c "import torch"`` (what
every verb paid when the entry point imported torch and every verb's module).

Issue 9's targets: ``--help`` and ``--version`` under 0.5 s; ``metrics`` and ``data check``
without importing torch. The last line says whether they are met on this machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)\s*$")


def top_imports(stderr: str) -> dict[str, float]:
    """Cumulative seconds of each top-level package ``-X importtime`` reports."""
    out: dict[str, float] = {}
    for line in stderr.splitlines():
        m = IMPORT_LINE.match(line)
        if m and len(m.group(3)) == 1:  # one space of indent: imported at the top level
            name = m.group(4).split(".")[0]
            out[name] = out.get(name, 0.0) + int(m.group(2)) / 1e6
    return out


def run(argv: list[str]) -> tuple[float, int, dict[str, float], str]:
    """Wall seconds, exit code, top-level import times and stdout of one fresh process."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-X", "importtime", *argv], capture_output=True,
                          text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return time.perf_counter() - start, proc.returncode, top_imports(proc.stderr), proc.stdout


def write_pair(folder: Path) -> tuple[Path, Path, Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (256, 256), dtype=np.uint8)
    b = rng.integers(0, 256, (256, 256), dtype=np.uint8)
    paths = folder / "a.png", folder / "b.png", folder / "f.png"
    for path, img in zip(paths, (a, b, np.maximum(a, b)), strict=True):
        Image.fromarray(img).save(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="rounds over the commands")
    parser.add_argument("--data", type=Path, default=None,
                        help="a BraTS or phantom folder: also time `data check DIR`")
    args = parser.parse_args(argv)
    from fuse4seg.train.runs import cpu_name

    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.data is not None and not args.data.is_dir():
        parser.error(f"--data {args.data}: no such folder")

    with tempfile.TemporaryDirectory() as tmp:
        a, b, f = write_pair(Path(tmp))
        commands = {
            "python -c pass": ["-c", "pass"],
            'python -c "import torch"': ["-c", "import torch"],
            "fuse4seg --version": ["-m", "fuse4seg", "--version"],
            "fuse4seg --help": ["-m", "fuse4seg", "--help"],
            "fuse4seg metrics --help": ["-m", "fuse4seg", "metrics", "--help"],
            "fuse4seg data check --help": ["-m", "fuse4seg", "data", "check", "--help"],
            "fuse4seg metrics (one 256² pair)": ["-m", "fuse4seg", "metrics", "--fused", str(f),
                                                 "--a", str(a), "--b", str(b)],
        }
        if args.data is not None:
            commands["fuse4seg data check DIR"] = ["-m", "fuse4seg", "data", "check",
                                                   str(args.data)]
        times: dict[str, list[float]] = {name: [] for name in commands}
        imports: dict[str, dict[str, float]] = {}
        for r in range(args.repeats):
            order = list(commands) if r % 2 == 0 else list(reversed(commands))
            for name in order:
                seconds, code, top, out = run(commands[name])
                # data check exits 1 when it finds a bad case (a timed, complete check); any
                # other failure would time an error message
                allowed = (0, 1) if name == "fuse4seg data check DIR" else (0,)
                if code not in allowed:
                    raise SystemExit(f"{name} exited with {code}:\n{out}")
                times[name].append(seconds)
                imports[name] = top

    print(f"# bench_cli: {cpu_name()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, {args.repeats} rounds, load "
          f"{os.getloadavg()[0]:.2f}\n")
    print("| command | median wall (s) | fastest (s) | imports torch | slowest top-level "
          "import |")
    print("|---|---:|---:|---|---|")
    for name in commands:
        top = imports[name]
        slowest = max(top.items(), key=lambda kv: kv[1]) if top else ("-", 0.0)
        print(f"| `{name}` | {statistics.median(times[name]):.3f} | {min(times[name]):.3f} | "
              f"{'yes' if 'torch' in top else 'no'} | {slowest[0]} {slowest[1]:.2f} s |")
    fast = [n for n in ("fuse4seg --version", "fuse4seg --help")
            if statistics.median(times[n]) < 0.5]
    light = [n for n in commands if n.startswith("fuse4seg") and "torch" not in imports[n]]
    print(f"\n--help and --version under 0.5 s: {'yes' if len(fast) == 2 else 'no'}; "
          f"verbs without torch: {len(light)} of {sum(n.startswith('fuse4seg') for n in commands)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
