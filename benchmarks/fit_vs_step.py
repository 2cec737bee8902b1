"""Why an epoch of ``fc.fit`` may be slower than a Python loop over ``fc.train_step``: the
same steps, four ways, in one process.

    python benchmarks/fit_vs_step.py [--models resnet,bn_same] [--steps 300] [--repeats 5]

For each zoo model (``benchmarks/zoo.py``, batch 64, rmsprop), ms per step of:

* ``scan+gather``: the program ``fc.fit`` runs for an epoch on arrays
  (``flaxconv.epochs.train_epoch``): one ``lax.scan`` whose body gathers its batch from the
  device-resident data by index, then runs ``train_step_fn``;
* ``scan+gather, unroll 2``: the same scan with ``unroll=2`` (half the loop iterations: on a
  GPU, half the loop-condition round trips);
* ``scan, batches built``: one ``lax.scan`` over batches gathered before it (no gather and
  no index arithmetic in the loop);
* ``train_step loop``: ``fc.train_step`` called from Python on those batches, as the zoo's
  ``flaxconv-step`` row.

``scan+gather`` against the other three splits the gap between ``fc.fit`` and the loop
into the gather's cost and the loop's. With ``--keep-freed-memory`` the C allocator keeps
each call's scratch memory (:mod:`flaxconv.cpu_memory`): on CPU, the loop's gap is mostly
page faults without it. Every way runs ``--repeats`` times, interleaved,
after a compiling first run; the best counts. Random uint8 data of the model's input shape
(timing only).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np
import zoo

import flaxconv as fc
from flaxconv import epochs as ep
from flaxconv.cpu_memory import keep_freed_memory
from flaxconv.steps import train_step_fn


def ways(steps: int):
    """``{name: run(state, data) -> state}``: each trains ``steps`` steps."""
    def unrolled_fn(state, images, labels, indices, mask):
        def body(state, xs):
            return train_step_fn(state, ep.gather_batch(images, labels, *xs))

        return jax.lax.scan(body, state, (indices, mask), unroll=2)

    unrolled = jax.jit(unrolled_fn, donate_argnums=0)
    built = jax.jit(lambda state, batches: jax.lax.scan(train_step_fn, state, batches),
                    donate_argnums=0)

    def loop(state, data):
        for batch in data["batches"]:
            state, metrics = fc.train_step(state, batch)
        return state, metrics

    return {
        "scan+gather": lambda state, d: ep.train_epoch(state, *d["arrays"]),  # fit's program
        "scan+gather, unroll 2": lambda state, d: unrolled(state, *d["arrays"]),
        "scan, batches built": lambda state, d: built(state, d["built"]),
        "train_step loop": loop,
    }


def measure(model_name: str, steps: int, repeats: int) -> dict[str, float]:
    """Best ms/step of each way for one zoo model."""
    shape = zoo.INPUT_SHAPES[model_name]
    rng = np.random.default_rng(0)
    n = steps * zoo.BATCH
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    labels = rng.integers(0, zoo.NUM_CLASSES, n).astype(np.int32)
    state = fc.create_train_state(jax.random.key(0), zoo.flax_model(model_name),
                                  fc.optim.make("rmsprop", learning_rate=zoo.LR), images[:1])
    plan = ep.epoch_plan(n, zoo.BATCH)
    indices = plan.indices(ep.epoch_order(0, 0, n))
    arrays = jax.device_put((images, labels, indices, plan.mask))
    host = {"image": images[np.asarray(indices)], "label": labels[np.asarray(indices)],
            "mask": np.asarray(plan.mask)}
    batches = [jax.device_put({k: v[i] for k, v in host.items()}) for i in range(steps)]
    data = {"arrays": arrays, "built": jax.device_put(host), "batches": batches}
    runs = ways(steps)
    best = dict.fromkeys(runs, float("inf"))
    for run in runs.values():  # compile
        state, sums = run(state, data)
        jax.block_until_ready((state, sums))
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            state, sums = run(state, data)
            jax.block_until_ready((state, sums))
            best[name] = min(best[name], (time.perf_counter() - start) / steps * 1e3)
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet,bn_same")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="also write the table to PATH.md")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="call flaxconv.cpu_memory.keep_freed_memory() first")
    args = parser.parse_args(argv)
    if args.keep_freed_memory:
        keep_freed_memory()
    models = zoo.split_list(args.models, zoo.MODELS, "--models", parser)
    device = jax.devices()[0]
    rows = [f"`python benchmarks/fit_vs_step.py {' '.join(argv or sys.argv[1:])}`", "",
            f"{zoo.describe(zoo.machine_info(sys.executable))}; device: {device.device_kind}",
            "", f"ms/step, best of {args.repeats} interleaved runs of {args.steps} steps", ""]
    header = None
    for model_name in models:
        best = measure(model_name, args.steps, args.repeats)
        if header is None:
            header = list(best)
            rows += ["| model | " + " | ".join(header) + " |",
                     "|---|" + "---|" * len(header)]
        rows.append(f"| {model_name} | " + " | ".join(f"{best[k]:.3f}" for k in header) + " |")
    zoo.print_table(rows, args.out)


if __name__ == "__main__":
    main()
