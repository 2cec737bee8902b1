"""Which convolution formulation is fastest on this backend? The measurement behind
``flaxconv.models.resolve_conv_impl("auto")``.

    python benchmarks/conv_impl.py [--steps 100] [--batch-size 64]

Times the dlwp_mnist training step with each formulation — XLA's convolution with JAX's
gradients, XLA's convolution with every gradient as a forward NHWC convolution
(``xla_nhwc``), and im2col (shifted slices + one matmul) — each (a) as one jitted
``lax.scan`` over ``--steps`` batches, the device-resident epoch, and (b) as a Python loop
of jitted steps; prints ms/step. ``xla_nhwc`` runs twice: in ``fc.models.tuned_jit`` (the
library's ``COMPILER_OPTIONS``) and in a plain ``jax.jit`` (XLA:CPU's defaults, convolutions
on YNNPACK).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import flaxconv as fc
from flaxconv import epochs as ep


def time_impl(impl: str, tuned: bool, steps: int, batch_size: int, images, labels
              ) -> dict[str, float]:
    model = fc.models.get("dlwp_mnist", conv_impl=impl)
    tx = fc.optim.make("rmsprop", learning_rate=1e-3)
    state = fc.create_train_state(jax.random.key(0), model, tx, images[:1])
    n = steps * batch_size
    x, y = jax.device_put((images[:n], labels[:n]))
    plan = ep.epoch_plan(n, batch_size)

    jit = fc.models.tuned_jit if tuned else jax.jit
    epoch = jit(ep.train_epoch_fn, donate_argnums=0)

    def scan_once(state):
        state, sums = epoch(state, x, y, plan.indices(jax.random.key(1)), plan.mask)
        jax.block_until_ready(sums)
        return state

    start = time.perf_counter()
    state = scan_once(state)
    first = time.perf_counter() - start
    start = time.perf_counter()
    state = scan_once(state)
    scan_ms = 1000 * (time.perf_counter() - start) / steps

    step = jit(fc.train_step_fn, donate_argnums=0)
    batches = [{"image": x[i * batch_size:(i + 1) * batch_size],
                "label": y[i * batch_size:(i + 1) * batch_size]} for i in range(steps)]
    state, m = step(state, batches[0])
    jax.block_until_ready(m)
    start = time.perf_counter()
    for batch in batches:
        state, m = step(state, batch)
    jax.block_until_ready(m)
    loop_ms = 1000 * (time.perf_counter() - start) / steps
    return {"scan_ms": scan_ms, "loop_ms": loop_ms, "compile_s": first - scan_ms * steps / 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    images, labels = fc.data.load("mnist", "train", source="raw")
    print(f"backend {jax.default_backend()} ({jax.devices()[0]}), dlwp_mnist, "
          f"batch {args.batch_size}, {args.steps} steps; auto -> "
          f"{fc.models.resolve_conv_impl('auto', tuned=True)} in tuned_jit, "
          f"{fc.models.resolve_conv_impl('auto', tuned=False)} in jax.jit")
    print("| conv impl | scan ms/step | python-loop ms/step | compile s |")
    print("|---|---|---|---|")
    # Every formulation in the library's tuned jit; xla_nhwc also in a plain jax.jit, where
    # XLA:CPU runs its convolutions on YNNPACK.
    rows = [("xla", True), ("im2col", True), ("xla_nhwc", True), ("xla_nhwc", False)]
    for impl, tuned in rows:
        r = time_impl(impl, tuned, args.steps, args.batch_size, images, np.asarray(labels))
        name = f"{impl} ({'tuned_jit' if tuned else 'jax.jit'})"
        print(f"| {name} | {r['scan_ms']:.3f} | {r['loop_ms']:.3f} | {r['compile_s']:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
