"""Does the streaming input keep the training step fed? Input throughput beside the step's
consumption, on the Sign Language MNIST training folder (27,455 PNGs, 28x28 grayscale), and
MNIST's 60,000 training images by name through grain and through tf.data.

    python benchmarks/input_pipeline.py                       # batch 128, 2 timed epochs
    python benchmarks/input_pipeline.py --batch-size 64 --epochs 1 --steps 50   # quicker

Rows, all in images per second at the same batch size:

* input, ``flaxconv.data.image_folder(...)(epoch)``: the streaming path alone (grain's read
  threads decoding PNGs, ``workers`` default, a few batches ahead), batches consumed and
  thrown away;
* input, Keras's ``image_dataset_from_directory`` on the same folder: the peer;
* input, ``ImageFolder.arrays()`` decode of the whole folder (what the device-resident path
  pays once);
* input, ``fc.data.stream("mnist", "train", batch, shuffle=True, backend="grain")`` (the
  split in host memory, in ``epoch_order``) and ``backend="tf"`` (tfds's tf.data pipeline,
  a shuffle buffer): MNIST images/s of each backend alone (``--no-tf`` skips the second);
* consumption, ``train_step`` on one device-resident batch: ``steps/s x batch``, the most the
  model can take (augmentation and dropout on, the sign_language_cnn model);
* end to end, ``fit`` on the stream, and ``fit`` on device-resident arrays.

Input keeps up when its rate is above the consumption row; then streaming ``fit`` runs at
about the consumption rate. On a CPU-only machine the pipeline and the step share the same
cores, so there streaming ``fit`` runs somewhat below both. The first epoch of each input
row (building the pipeline, opening files for the first time) is untimed. Writes
``<out>/input_pipeline.md`` and ``.json`` with the command that made them.
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

import flaxconv as fc
from flaxconv import augment, data

IMAGE = dict(image_size=(28, 28), color_mode="grayscale")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="input_pipeline.py", description=__doc__.split("\n")[0])
    p.add_argument("--folder", default="runs/sign_language_mnist",
                   help="Sign Language MNIST image folder (written from the CSVs if missing)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2, help="timed passes per input row")
    p.add_argument("--steps", type=int, default=100, help="timed train steps")
    p.add_argument("--out", default="benchmarks/results", help="folder for the .md and .json")
    p.add_argument("--no-keras", action="store_true", help="skip the Keras peer row")
    p.add_argument("--no-tf", action="store_true", help="skip the tf.data stream row")
    return p.parse_args(argv)


def rate(images: int, seconds: float) -> float:
    return images / seconds


def time_input(make_epoch, epochs: int) -> float:
    """Images/s over ``epochs`` passes of ``make_epoch(epoch) -> iterable of batches`` after
    one untimed pass."""
    for _ in make_epoch(0):
        pass
    count, start = 0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        for batch in make_epoch(epoch):
            count += len(batch["mask"]) if isinstance(batch, dict) else len(batch[1])
    return rate(count, time.perf_counter() - start)


def new_state(folder: data.ImageFolder):
    model = fc.models.get(
        "sign_language_cnn", num_classes=len(folder.class_names),
        augment=augment.keras_like(rotation=0.05, translation=0.1, zoom=0.1),
    )
    sample = np.zeros((1, *folder.image_shape), np.uint8)
    return fc.create_train_state(jax.random.key(0), model, fc.optim.make("adam"), sample)


def time_steps(folder: data.ImageFolder, steps: int) -> float:
    step = jax.jit(fc.train_step_fn, donate_argnums=0)
    batch = jax.device_put(next(iter(folder(0))))
    state = new_state(folder)
    state, metrics = step(state, batch)  # compile
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return rate(steps * folder.batch_size, time.perf_counter() - start)


def time_fit(train, folder: data.ImageFolder, epochs: int) -> float:
    """Images/s of ``fit`` over epochs 2..epochs+1 (epoch 1 compiles)."""
    times = []

    class Clock(fc.callbacks.Callback):
        def on_epoch_end(self, epoch, logs, state):
            times.append(logs["epoch_seconds"])

    fc.fit(new_state(folder), train, epochs=epochs + 1, batch_size=folder.batch_size,
           steps_per_epoch=folder.steps_per_epoch, verbose="silent", callbacks=[Clock()])
    return rate(epochs * folder.num_examples, sum(times[1:]))


def main(argv=None) -> int:
    args = parse_args(argv)
    root = data.sign_language_folder(args.folder)
    folder = data.image_folder(root / "Train", batch_size=args.batch_size, seed=0, **IMAGE)
    rows = []

    def add(what, images_per_s):
        rows.append((what, images_per_s))
        print(f"{what:<58} {images_per_s:>12,.0f}", flush=True)

    print(f"{folder}; backend {jax.default_backend()}, {os.cpu_count()} CPUs", flush=True)
    add("input: image_folder stream (grain threads)", time_input(folder, args.epochs))
    if not args.no_keras:
        import keras

        peer = keras.utils.image_dataset_from_directory(
            root / "Train", batch_size=args.batch_size, seed=0, verbose=False, **IMAGE
        )
        add("input: keras image_dataset_from_directory (peer)",
            time_input(lambda epoch: peer.as_numpy_iterator(), args.epochs))
    unshuffled = data.image_folder(root / "Train", shuffle=False, **IMAGE)
    start = time.perf_counter()
    images, labels = unshuffled.arrays()
    add("input: ImageFolder.arrays() (one-off decode)",
        rate(len(labels), time.perf_counter() - start))
    for backend in ("grain",) if args.no_tf else ("grain", "tf"):
        add(f"input: data.stream('mnist', 'train', backend={backend!r})",
            time_input(lambda epoch, backend=backend: data.stream(
                "mnist", "train", args.batch_size, shuffle=True, epoch=epoch, backend=backend),
                args.epochs))
    add("consumption: train_step on device (steps/s x batch)", time_steps(folder, args.steps))
    add("end to end: fit on the stream", time_fit(folder, folder, 1))
    add("end to end: fit on device-resident arrays", time_fit((images, labels), folder, 1))

    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/input_pipeline.py",
                                                            *sys.argv[1:]])
    header = (f"{datetime.date.today()} `{command}`: {folder.num_examples} images 28x28x1, "
              f"batch {args.batch_size}, backend {jax.default_backend()} "
              f"({jax.devices()[0].device_kind}), {os.cpu_count()} CPUs, {platform.machine()}")
    table = ["| what | images/s |", "|---|---:|"]
    table += [f"| {what} | {value:,.0f} |" for what, value in rows]
    report = "\n".join([header, "", *table])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "input_pipeline.md"), "w") as f:
        f.write(report + "\n")
    with open(os.path.join(args.out, "input_pipeline.json"), "w") as f:
        json.dump({"command": command, "rows": dict(rows), "batch_size": args.batch_size,
                   "backend": jax.default_backend()}, f, indent=1)
    print(f"\n{report}\nwrote {args.out}/input_pipeline.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
