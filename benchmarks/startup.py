"""Where the main job's time goes outside training (issue 16, item 5; budget 8 s on CPU).

    FLAXCONV_DATA_DIR=../shared/datasets python benchmarks/startup.py [--repeat 3] [-- --epochs 1]

Runs ``experiments/mnist_convnet.py`` (flags after ``--`` go to it) in a fresh workdir as a
subprocess under ``python -X importtime``, stamps each line it prints on arrival, and prints
one line per phase and run, cut at the lines the job prints itself:

* ``start``: interpreter start, imports, the dataset read, model init (up to the summary);
* ``fit setup``: from the summary to ``Epoch 1/N`` (workdir, checkpoint manager);
* ``training``: ``Epoch 1/N`` to the last epoch's line (compilation included: it is
  training's own cost);
* ``after``: the last epoch's line to the test line (curves.png, checkpoint, evaluation);
* ``serving``: the test line to ``saved ...`` (saved_model and model.exported);
* ``exit``: the rest, up to the process's end.

``outside training`` is the wall time less ``training``. Each phase also gets the job's CPU
seconds (user + system, all threads, from ``/proc/<pid>/stat`` read as each line arrives): on
a loaded machine wall time stretches, CPU time much less. The heaviest imports (cumulative
``-X importtime`` microseconds of each top-level package, whenever it was first imported)
follow. The machine is shared: repeat and take the best.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "experiments" / "mnist_convnet.py"
BUDGET_S = 8.0
EPOCH_LINE = re.compile(r"^\d+/\d+ - [\d.]+s - ")  # fit's per-epoch line
HEAVY = ("flaxconv", "jax", "flax", "optax", "orbax", "tensorflow", "tensorflow_datasets",
         "matplotlib", "keras", "grain", "PIL", "ml_collections", "chex")


def top_level_imports(importtime: str) -> dict[str, float]:
    """Seconds each top-level package took to import (its first import's cumulative time),
    from ``python -X importtime``'s stderr text."""
    seconds: dict[str, float] = {}
    for line in importtime.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| ( *)(\S+)", line)
        if m and not m.group(2):  # no indentation: imported by the job's code itself
            top = m.group(3).split(".")[0]
            seconds[top] = seconds.get(top, 0.0) + int(m.group(1)) / 1e6
    return seconds


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used so far (Linux; NaN elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def phases(stamped: list[tuple[float, str]], wall: float) -> dict[str, float]:
    """Phase lengths from ``(seconds since start, line)`` pairs (wall or CPU seconds at the
    line's arrival; ``wall`` is the total); see the module docstring. Raises ValueError
    naming the marker line the job did not print."""
    def first(pred, what):
        for t, line in stamped:
            if pred(line):
                return t
        raise ValueError(f"the job printed no {what} line; its output:\n"
                         + "\n".join(line for _, line in stamped[-20:]))

    summary = stamped[0][0] if stamped else first(lambda _: False, "first")
    epoch1 = first(lambda s: re.match(r"^Epoch 1/\d+$", s), "'Epoch 1/N'")
    last_epoch = max(t for t, s in stamped if EPOCH_LINE.match(s)) if any(
        EPOCH_LINE.match(s) for _, s in stamped) else first(lambda _: False, "epoch result")
    test = first(lambda s: s.startswith("test_loss") or "test images)" in s, "test result")
    saved = first(lambda s: s.startswith("saved "), "'saved ...'")
    return {"start": summary, "fit setup": epoch1 - summary, "training": last_epoch - epoch1,
            "after": test - last_epoch, "serving": saved - test, "exit": wall - saved}


def run_once(job_args: list[str]) -> tuple[dict, dict, dict[str, float], float]:
    """One run: wall phases, CPU phases, top-level import seconds, wall seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-u", "-X", "importtime", str(JOB), "--workdir",
               os.path.join(tmp, "run"), *job_args]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=REPO)
        stamped, cpu_stamped = [], []
        err: list[str] = []
        reader = threading.Thread(target=lambda: err.append(proc.stderr.read()))
        reader.start()
        for line in proc.stdout:
            stamped.append((time.perf_counter() - start, line.rstrip("\n")))
            cpu = cpu_seconds(proc.pid)
            cpu_stamped.append((cpu, line.rstrip("\n")))
        _, status, usage = os.wait4(proc.pid, 0)  # CPU seconds of the whole run, exit included
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        reader.join()
    if proc.returncode:
        tail = "\n".join(s for _, s in stamped[-10:])
        other = "\n".join(ln for ln in err[0].splitlines() if not ln.startswith("import time:"))
        raise SystemExit(f"{' '.join(cmd)} exited with {proc.returncode}:\n{tail}\n{other[-3000:]}")
    cpu_total = usage.ru_utime + usage.ru_stime
    return (phases(stamped, wall), phases(cpu_stamped, cpu_total), top_level_imports(err[0]),
            wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs; the best is reported")
    parser.add_argument("job_args", nargs="*", help="flags for mnist_convnet.py (after --)")
    args = parser.parse_args()
    if not os.environ.get("FLAXCONV_DATA_DIR"):
        raise SystemExit("set FLAXCONV_DATA_DIR (the dataset must be prepared already)")
    best = None
    for i in range(args.repeat):
        times, cpu, imports, wall = run_once(args.job_args)
        outside = wall - times["training"]
        print(f"run {i + 1}: " + "  ".join(f"{k} {v:.1f}s" for k, v in times.items())
              + f"  | wall {wall:.1f}s, outside training {outside:.1f}s", flush=True)
        print("  cpu:  " + "  ".join(f"{k} {v:.1f}s" for k, v in cpu.items())
              + f"  | outside training {sum(cpu.values()) - cpu['training']:.1f}s", flush=True)
        if best is None or outside < best[0]:
            best = (outside, imports)
    outside, imports = best
    heavy = sorted(((v, k) for k, v in imports.items() if k in HEAVY), reverse=True)
    print("imports (best run): " + ", ".join(f"{k} {v:.2f}s" for v, k in heavy))
    verdict = "within" if outside <= BUDGET_S else "OVER"
    print(f"startup: outside training {outside:.1f}s (best of {args.repeat}), {verdict} the "
          f"{BUDGET_S:.0f}s budget")


if __name__ == "__main__":
    main()
