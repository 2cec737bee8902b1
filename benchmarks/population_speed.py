"""Training K models at once (a population) vs K separate single-model runs, on MNIST.

    python benchmarks/population_speed.py                                   # K = 1, 8, 32
    python benchmarks/population_speed.py --train-examples 2000 --ks 1,2 --accuracy-k 2  # smoke

Throughput is in *model-epochs per second* (one model trained on one pass over the data):
the population does K per epoch call; K separate runs do one per single-model epoch, so by
default their rate is measured once on a single model and extrapolated as K x the single
epoch time (``--measure-separate`` really runs K single-model epochs one after another).
Both sides are device-resident ``lax.scan`` epochs (``flaxconv.epochs``), same model, data,
batch size and optimizer; compilation is excluded from the epoch times (AOT-compiled first)
and reported separately. The population's members are vmapped side by side in groups of
``--vmap-size`` (default: per backend, ``flaxconv.population.resolve_vmap_size``: all of
them on GPU, one at a time on CPU) and the groups take turns inside the one compiled epoch.
After its first epoch, the ``--accuracy-k`` population reports each member's test accuracy
(target for the full data: every member >= 98% after one epoch; at batch 64, rmsprop 1e-3
missed it by one seed, adam 1e-3 met it, see benchmarks/RESULTS.md §4).

Writes ``<out>/population_speed.md`` and ``.json`` with the command that made them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time

import jax
import numpy as np
from mnist_speed import kernels_of

import flaxconv as fc
from flaxconv import data
from flaxconv import population as pop
from flaxconv.epochs import epoch_plan, train_epoch_fn

# The same jits as flaxconv.epochs.train_epoch and population.train_population_epoch,
# built here so that they can be compiled ahead of time and the compile timed apart.
single_epoch = jax.jit(train_epoch_fn, donate_argnums=0)
population_epoch = jax.jit(
    pop.train_population_epoch_fn, donate_argnums=0, static_argnames="vmap_size"
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="population_speed.py", description=__doc__.split("\n")[0])
    p.add_argument("--ks", default="1,8,32", help="population sizes, comma list")
    p.add_argument("--train-examples", type=int, default=0, help="first N examples (0: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--optimizer", default="rmsprop")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--model", default="dlwp_mnist")
    p.add_argument("--kernels", default="auto", choices=fc.kernels.POLICIES,
                   help="kernels policy of every state (flaxconv.kernels; xla: XLA's own ops)")
    p.add_argument("--dtype", default="float32",
                   help="computation dtype of every model, e.g. bfloat16 (params stay float32)")
    p.add_argument("--repeats", type=int, default=1, help="timed epochs per setting")
    p.add_argument("--vmap-size", type=int, default=None,
                   help="members vmapped side by side (default: per backend, see "
                        "flaxconv.population.resolve_vmap_size)")
    p.add_argument("--accuracy-k", type=int, default=8,
                   help="report per-member test accuracy for this K after one epoch")
    p.add_argument("--measure-separate", action="store_true",
                   help="time K single-model epochs instead of extrapolating from one")
    p.add_argument("--data-source", default="auto", choices=("auto", "raw", "tfds"))
    p.add_argument("--out", default="benchmarks/results", help="folder for the .md and .json")
    args = p.parse_args(argv)
    try:
        args.ks = [int(k) for k in args.ks.split(",")]
    except ValueError:
        p.error(f"--ks {args.ks!r}: expected positive integers separated by commas")
    if min(args.ks) < 1 or args.repeats < 1 or args.batch_size < 1 or args.train_examples < 0:
        p.error("--ks, --repeats and --batch-size must be >= 1, --train-examples >= 0")
    try:
        fc.models.convstack.compute_dtype(args.dtype)
    except ValueError as e:
        p.error(f"--dtype: {e}")
    return args


def timed_epochs(compiled, state, arrays, repeats):
    """Runs ``repeats`` epochs of an AOT-compiled epoch; returns (state, [seconds])."""
    seconds = []
    for _ in range(repeats):
        tick = time.perf_counter()
        state, sums = compiled(state, *arrays)
        jax.block_until_ready((state, sums))
        seconds.append(time.perf_counter() - tick)
    return state, seconds


def main(argv=None) -> int:
    args = parse_args(argv)
    train_images, train_labels = data.load("mnist", "train", source=args.data_source)
    test_images, test_labels = data.load("mnist", "test", source=args.data_source)
    if args.train_examples:
        train_images = train_images[: args.train_examples]
        train_labels = train_labels[: args.train_examples]
    images, labels = jax.device_put((train_images, train_labels))
    plan = epoch_plan(len(labels), args.batch_size)
    model = fc.models.get(args.model, dtype=args.dtype)
    tx = fc.optim.make(args.optimizer, learning_rate=args.learning_rate)
    full = len(labels) == 60_000
    vmap_sizes = {k: pop.resolve_vmap_size(args.vmap_size, k) for k in args.ks}
    # One model alone: the unit of the "K separate runs" column.
    state = fc.create_train_state(jax.random.key(0), model, tx, train_images[:1],
                                  kernels=args.kernels)
    single_kernels = kernels_of(state)
    print(f"{args.model} in {args.dtype} (kernels={args.kernels!r}; single model: "
          f"{single_kernels}; members vmapped side by side, per K: {vmap_sizes}), "
          f"{args.optimizer} {args.learning_rate:g}, batch {args.batch_size}, {len(labels)} "
          f"examples = {plan.steps} steps/epoch, {jax.device_count()} "
          f"{jax.default_backend()} device(s)", flush=True)

    arrays = (images, labels, plan.indices(jax.random.key(100)), plan.mask)
    tick = time.perf_counter()
    compiled_single = single_epoch.lower(state, *arrays).compile()
    single_compile = time.perf_counter() - tick
    state, single_seconds = timed_epochs(compiled_single, state, arrays, args.repeats)
    single = float(np.mean(single_seconds))
    print(f"single model: {single:.2f} s/epoch (compile {single_compile:.1f} s)", flush=True)

    rows, accuracy = [], None
    for k in args.ks:
        states = pop.create_population(pop.keys_from_seeds(range(k)), model, tx,
                                       train_images[:1]).replace(kernels=args.kernels)
        order = pop.population_indices(plan, jax.random.split(jax.random.key(100), k))
        arrays = (images, labels, order, plan.mask)
        tick = time.perf_counter()
        compiled = population_epoch.lower(states, *arrays, vmap_size=args.vmap_size).compile()
        compile_seconds = time.perf_counter() - tick
        states, seconds = timed_epochs(compiled, states, arrays, 1)
        if k == args.accuracy_k:  # exactly one epoch from initialization
            accuracy = fc.evaluate(states, test_images, test_labels,
                                   batch_size=500)["accuracy"].tolist()
        if args.repeats > 1:
            states, more = timed_epochs(compiled, states, arrays, args.repeats - 1)
            seconds += more
        del states
        epoch = float(np.mean(seconds))
        if args.measure_separate:
            separate = 0.0
            for i in range(k):
                solo = fc.create_train_state(jax.random.key(i), model, tx, train_images[:1],
                                             kernels=args.kernels)
                solo_arrays = (images, labels, order[i], plan.mask)
                solo, (s,) = timed_epochs(compiled_single, solo, solo_arrays, 1)
                separate += s
            how = "measured"
        else:
            separate, how = k * single, "extrapolated"
        rows.append(dict(
            k=k, vmapped_epoch_seconds=epoch, vmapped_model_epochs_per_s=k / epoch,
            separate_seconds=separate, separate_model_epochs_per_s=k / separate,
            separate=how, speedup=separate / epoch, compile_seconds=compile_seconds,
            model_examples_per_s=k * len(labels) / epoch,
        ))
        print(f"K={k}: {epoch:.2f} s/epoch as a population vs {separate:.2f} s separate ({how}); "
              f"compile {compile_seconds:.1f} s", flush=True)

    header = ("| K | population s/epoch | population model-epochs/s | K separate s | "
              "separate model-epochs/s | speedup | model-examples/s | compile s |")
    lines = [header, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['k']} | {r['vmapped_epoch_seconds']:.2f} | "
            f"{r['vmapped_model_epochs_per_s']:.3f} | {r['separate_seconds']:.2f} "
            f"({r['separate']}) | {r['separate_model_epochs_per_s']:.3f} | "
            f"{r['speedup']:.2f}x | {r['model_examples_per_s']:,.0f} | "
            f"{r['compile_seconds']:.1f} |"
        )
    command = "python " + shlex.join(["benchmarks/population_speed.py", *(
        sys.argv[1:] if argv is None else argv)])
    notes = [
        f"Command: `{command}`",
        f"Date: {datetime.date.today()}; jax {jax.__version__}; "
        f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}); "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible",
        f"Single model (kernels={args.kernels!r}: {single_kernels}): {single:.2f} s/epoch, "
        f"compile {single_compile:.1f} s. Members vmapped side by side, per K: {vmap_sizes} "
        "(the rest take turns in the same compiled epoch; vmapped ones run im2col where "
        "kernels is auto or cpu). "
        "'K separate' = K single-model epochs "
        + ("run one after another." if args.measure_separate else
           "extrapolated as K x the measured single-model epoch."),
        f"{len(labels)} training examples, batch {args.batch_size}, {args.optimizer} "
        f"{args.learning_rate:g}, {args.model} computing in {args.dtype}; compile excluded "
        "from epoch times "
        f"(AOT), mean of {args.repeats} epoch(s).",
    ]
    if accuracy is not None:
        ok = min(accuracy) >= 0.98
        notes.append(
            f"Test accuracy of each of the K={args.accuracy_k} members after one epoch: "
            + ", ".join(f"{a:.4f}" for a in accuracy)
            + f" (min {min(accuracy):.4f}; every member >= 98%: {'yes' if ok else 'no'}"
            + ("" if full else f"; only {len(labels)} training examples") + ")"
        )
    report = "\n".join(["# Population training speed", "", *lines, "",
                        *(f"- {n}" for n in notes)])
    print("\n" + report)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "population_speed.md"), "w") as f:
        f.write(report + "\n")
    with open(os.path.join(args.out, "population_speed.json"), "w") as f:
        json.dump(dict(command=command, rows=rows, single_epoch_seconds=single,
                       single_compile_seconds=single_compile, member_test_accuracy=accuracy,
                       accuracy_k=args.accuracy_k, train_examples=len(labels),
                       batch_size=args.batch_size, optimizer=args.optimizer,
                       learning_rate=args.learning_rate, model=args.model,
                       kernels=args.kernels, single_kernels=single_kernels, vmap_sizes=vmap_sizes,
                       devices=[str(d) for d in jax.devices()], jax=jax.__version__), f,
                  indent=1)
    print(f"wrote {args.out}/population_speed.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
