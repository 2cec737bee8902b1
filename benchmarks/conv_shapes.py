"""Lone convolutions, formulation by formulation: the measurements behind the CPU table of
``flaxconv.kernels.policy`` (which stride-1 convolutions run as ``xla_nhwc``, which as
``im2col``, which 3x3 ones as ``winograd``).

    python benchmarks/conv_shapes.py [--steps 30] [--out benchmarks/results/conv_shapes]

Each row is one convolution of the zoo's models (``benchmarks/zoo.py``) at batch 64: the
forward pass and both gradients (input and kernel) of ``sum(conv(x, k) ** 2)``, inside a
``lax.scan`` of ``--steps`` SGD-like updates as a training epoch runs them, best of five
passes, in ms per step. Strided convolutions have only im2col. On a GPU or TPU a column
``xla`` times XLA's own convolution with JAX's gradients (cuDNN on a GPU), the seam's
opt-out; on CPU it is skipped (20-60x slower inside a scan, jax-ml/jax#12868).

With ``--tf`` (TensorFlow installed), a last column times the same step with
``tf.nn.conv2d`` in a ``tf.function`` (oneDNN's kernels, what Keras-TF runs in the zoo), one
call per step: the peer that the zoo's ratios are made against, layer by layer.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
import time

import jax
import jax.numpy as jnp
import jaxlib

from flaxconv.kernels.conv import conv2d

# (what, H, W, C_in, C_out, kernel, stride, padding)
SHAPES = [
    ("dlwp conv_2", 5, 5, 64, 128, 3, 1, "VALID"),
    ("fashion_cnn conv_1", 13, 13, 32, 32, 3, 1, "VALID"),
    ("bn_same conv_1", 14, 14, 32, 64, 3, 1, "SAME"),
    ("resnet stage 1", 32, 32, 16, 16, 3, 1, "SAME"),
    ("resnet stage 2", 16, 16, 32, 32, 3, 1, "SAME"),
    ("resnet stage 3", 8, 8, 64, 64, 3, 1, "SAME"),
    ("resnet shortcut 1x1/2", 32, 32, 16, 32, 1, 2, "VALID"),
    ("resnet 3x3/2", 32, 32, 16, 32, 3, 2, "SAME"),
]


def ms_per_step(formulation: str, x, kernel, stride: int, padding: str, steps: int) -> float:
    """Best of five scans of ``steps`` forward + backward passes, ms per step."""
    conv = lambda x, k: conv2d(x, k, (stride, stride), padding, formulation)  # noqa: E731

    def body(carry, _):
        x, k = carry
        dx, dk = jax.grad(lambda x, k: jnp.sum(conv(x, k) ** 2), argnums=(0, 1))(x, k)
        return (x - 1e-6 * dx, k - 1e-6 * dk), None

    run = jax.jit(lambda carry: jax.lax.scan(body, carry, None, length=steps)[0])
    jax.block_until_ready(run((x, kernel)))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(run((x, kernel)))
        best = min(best, (time.perf_counter() - start) / steps * 1e3)
    return best


def tf_ms_per_step(x, kernel, stride: int, padding: str, steps: int) -> float:
    """The same step with TensorFlow's ``tf.nn.conv2d``, best of five passes, ms per step."""
    import numpy as np
    import tensorflow as tf

    x, kernel = tf.Variable(np.asarray(x)), tf.Variable(np.asarray(kernel))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.nn.conv2d(x, kernel, stride, padding) ** 2)
        dx, dk = tape.gradient(loss, [x, kernel])
        x.assign_sub(1e-6 * dx)
        kernel.assign_sub(1e-6 * dk)
        return loss

    step().numpy()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(steps):
            loss = step()
        loss.numpy()
        best = min(best, (time.perf_counter() - start) / steps * 1e3)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", help="also write PATH.md and PATH.json")
    parser.add_argument("--tf", action="store_true",
                        help="add TensorFlow's tf.nn.conv2d (oneDNN) as the peer column")
    args = parser.parse_args()
    header = (f"{datetime.date.today()}; {jax.devices()[0].device_kind}, {platform.machine()}, "
              f"python {platform.python_version()}, jax {jax.__version__}, jaxlib "
              f"{jaxlib.__version__}; batch 64, {args.steps} steps, best of 5")
    lines = [header, "",
             "| convolution | output | im2col ms | xla_nhwc ms | winograd ms | xla ms | faster |"
             + (" tf.nn.conv2d ms |" if args.tf else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if args.tf else "")]
    print("\n".join(lines), flush=True)
    rows = []
    for what, h, w, c_in, c_out, k, stride, padding in SHAPES:
        x = jax.random.normal(jax.random.key(0), (64, h, w, c_in))
        kernel = jax.random.normal(jax.random.key(1), (k, k, c_in, c_out)) * 0.1
        times = {"im2col": ms_per_step("im2col", x, kernel, stride, padding, args.steps)}
        if stride == 1:
            times["xla_nhwc"] = ms_per_step("xla_nhwc", x, kernel, stride, padding, args.steps)
        if stride == 1 and k == 3:
            times["winograd"] = ms_per_step("winograd", x, kernel, stride, padding, args.steps)
        if jax.default_backend() != "cpu":
            times["xla"] = ms_per_step("xla", x, kernel, stride, padding, args.steps)
        out = jax.eval_shape(functools.partial(conv2d, strides=(stride, stride),
                                               padding=padding), x, kernel)
        size = f"{out.shape[1]}x{out.shape[2]}"
        faster = min(times, key=times.get)
        cell = {f: f"{times[f]:.2f}" if f in times else "-"
                for f in ("xla_nhwc", "winograd", "xla")}
        lines.append(f"| {what}: {k}x{k}/{stride} {padding} {c_in}->{c_out} | {size} | "
                     f"{times['im2col']:.2f} | {cell['xla_nhwc']} | {cell['winograd']} | "
                     f"{cell['xla']} | {faster} |")
        if args.tf:
            times["tf"] = tf_ms_per_step(x, kernel, stride, padding, args.steps)
            lines[-1] += f" {times['tf']:.2f} |"
        print(lines[-1], flush=True)
        rows.append({"what": what, "output": size, **times})
    if args.out:
        with open(args.out + ".md", "w") as f:
            command = f"python benchmarks/conv_shapes.py --steps {args.steps}"
            command += " --tf" if args.tf else ""
            f.write(f"Command: {command}\n\n" + "\n".join(lines) + "\n")
        with open(args.out + ".json", "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
