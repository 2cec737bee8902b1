"""Where a zoo model's training step spends its time, operation by operation.

    python benchmarks/profile_step.py --model resnet [--steps 30] [--top 25] [--out PATH]

Trains the zoo model (``benchmarks/zoo.py``: a preset or a hand-written Flax module, batch 64,
rmsprop) with ``fc.fit`` for an untimed warm-up epoch of ``--steps`` steps, then for one more
epoch under ``jax.profiler``. It reads the trace back (``jax.profiler.ProfileData``) and
joins each XLA operation's events with the compiled epoch program (dumped by XLA for this
run): its output shape and the JAX operation it came from (``jvp`` the forward pass,
``transpose(jvp)`` the backward one). Prints ms per step for each operation, most first.

An operation's time is the span of its events on the threads that ran it. XLA:CPU runs
independent operations on its threads side by side, and some convolutions pass their work to
a thread pool, so the column does not add up to the step time: read it as "where the big
costs are", next to the epoch's ms/step printed above it.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

HLO_LINE = re.compile(r"\s*(?:ROOT )?%(\S+) = (\S+) .*?op_name=\"([^\"]*)\"")


def compiled_ops(dump_dir: str) -> dict[str, tuple[str, str]]:
    """``{instruction name: (output shape, JAX op name)}`` of the largest compiled epoch
    program that XLA dumped into ``dump_dir``."""
    programs = glob.glob(os.path.join(dump_dir, "*train_epoch*after_optimizations.txt"))
    if not programs:
        return {}
    ops = {}
    with open(max(programs, key=os.path.getsize)) as f:
        for line in f:
            match = HLO_LINE.match(line)
            if match:
                name, shape, op_name = match.groups()
                ops[name] = (shape, op_name.split("/eval_jaxpr/")[-1].split("/body/")[-1])
    return ops


def op_times(trace_dir: str, ops: dict[str, tuple[str, str]]) -> collections.Counter:
    """Nanoseconds per compiled operation, summed over the trace's events named after one."""
    import jax

    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    profile = jax.profiler.ProfileData.from_file(max(paths, key=os.path.getmtime))
    totals: collections.Counter = collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in ops:
                    totals[event.name] += event.duration_ns
    return totals


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet", help="a zoo model (benchmarks/zoo.py)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--top", type=int, default=25, help="how many operations to print")
    parser.add_argument("--out", help="also write the table to PATH.md")
    args = parser.parse_args(argv)

    work = tempfile.mkdtemp(prefix="profile_step_")
    # XLA reads its flags when jax starts: set before the first jax import.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_dump_to={work}/hlo --xla_dump_hlo_as_text").strip()
    import jax
    import zoo

    import flaxconv as fc

    if args.model not in zoo.MODELS:
        sys.exit(f"--model {args.model!r}: expected one of {', '.join(zoo.MODELS)}")
    x, y = zoo.make_data(args.model, args.steps * zoo.BATCH)
    state = fc.create_train_state(jax.random.key(0), zoo.flax_model(args.model),
                                  fc.optim.make("rmsprop", learning_rate=zoo.LR), x[:1])
    state, _ = fc.fit(state, (x, y), epochs=1, batch_size=zoo.BATCH, verbose=0)
    jax.profiler.start_trace(f"{work}/trace")
    state, history = fc.fit(state, (x, y), epochs=1, batch_size=zoo.BATCH, verbose=0)
    jax.profiler.stop_trace()

    ops = compiled_ops(f"{work}/hlo")
    totals = op_times(f"{work}/trace", ops)
    ms_per_step = 1e3 * history["epoch_seconds"][0] / args.steps
    rows = [f"`python benchmarks/profile_step.py {' '.join(argv or sys.argv[1:])}`", "",
            zoo.describe(zoo.machine_info(sys.executable)), "",
            f"{args.model}: {ms_per_step:.2f} ms/step over {args.steps} steps; jax "
            f"{jax.__version__} on {jax.devices()[0].device_kind}; the {len(totals)} timed "
            f"operations sum to {sum(totals.values()) / 1e6 / args.steps:.2f} ms/step", "",
            "| ms/step | operation | output | from |", "|---|---|---|---|"]
    for name, nanoseconds in totals.most_common(args.top):
        shape, op_name = ops[name]
        rows.append(f"| {nanoseconds / 1e6 / args.steps:.3f} | {name} | {shape.split('{')[0]} "
                    f"| {op_name} |")
    zoo.print_table(rows, args.out)


if __name__ == "__main__":
    main()
