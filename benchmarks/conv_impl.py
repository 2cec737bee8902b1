"""Which kernels policy is fastest on this backend? The measurement behind
``flaxconv.kernels.policy`` (what ``kernels="auto"`` picks), and the GEMM-only floor of the step.

    python benchmarks/conv_impl.py [--steps 100] [--batch-size 64] [--policies xla,im2col,auto]

Times the dlwp_mnist training step under each kernels policy of the library's seam
(``state.kernels``, :mod:`flaxconv.kernels`): ``xla`` (the opt-out: XLA's own convolutions
and pools, JAX's gradients), ``im2col`` (every convolution as shifted slices + one matmul),
``auto`` (the backend's table: on CPU conv_1 -> relu -> pool as one Winograd F(2x2, 3x3)
block, conv_0's block fused around an NHWC convolution, conv_2 as im2col or ``xla_nhwc``
depending on jaxlib) and, on other backends, ``cpu`` for comparison — each (a) as one
jitted ``lax.scan`` over ``--steps`` batches, the device-resident epoch, and (b) as a Python
loop of jitted steps, the best of three each, all in a plain ``jax.jit``. It prints ms/step,
the achieved GFLOP/s (the model's training FLOPs, as in ``mnist_speed.py``), its share of
the fp32 matmul peak measured in the same run, the share counting only the FLOPs executed
(every policy trains trimmed, ``ConvStack.trim``; Winograd's conv_1 does 4/9 of the
products) and the formulation of each layer (``fc.steps.explain_kernels``).

The last rows, "GEMMs alone", are bounds rather than formulations: the step's matrix
products, one after another in a ``lax.scan``, with nothing else — no patches, transforms,
activations, pooling, loss or optimizer. "direct": the eleven products at their im2col
shapes as trained (trimmed; forward, input gradient and kernel gradient of every layer; no
input gradient for the first), the bound of xla_nhwc and im2col; "winograd": conv_1's three
replaced by its 48 Winograd products. No formulation built on these GEMMs can beat its
bound; a second table times each distinct GEMM alone.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from mnist_speed import (
    TRIMMED_LAYERS,
    WINOGRAD_LAYERS,
    executed_layers,
    kernels_of,
    load_mnist,
    matmul_peak_gflops,
    train_flops_per_example,
)

import flaxconv as fc
from flaxconv import epochs as ep

REPEATS = 3


def policy_state(kernels: str, images) -> fc.TrainState:
    """A fresh dlwp_mnist state (rmsprop 1e-3) whose steps run the ``kernels`` policy."""
    model = fc.models.get("dlwp_mnist")
    tx = fc.optim.make("rmsprop", learning_rate=1e-3)
    return fc.create_train_state(jax.random.key(0), model, tx, images[:1], kernels=kernels)


def time_policy(kernels: str, steps: int, batch_size: int, images, labels) -> dict[str, float]:
    state = policy_state(kernels, images)
    n = steps * batch_size
    x, y = jax.device_put((images[:n], labels[:n]))
    plan = ep.epoch_plan(n, batch_size)

    epoch = jax.jit(ep.train_epoch_fn, donate_argnums=0)

    def scan_once(state):
        state, sums = epoch(state, x, y, plan.indices(jax.random.key(1)), plan.mask)
        jax.block_until_ready(sums)
        return state

    start = time.perf_counter()
    state = scan_once(state)
    first = time.perf_counter() - start
    # The best of three: the machine's load swings, the code does not.
    scan_ms = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        state = scan_once(state)
        scan_ms = min(scan_ms, 1000 * (time.perf_counter() - start) / steps)

    step = jax.jit(fc.train_step_fn, donate_argnums=0)
    batches = [{"image": x[i * batch_size:(i + 1) * batch_size],
                "label": y[i * batch_size:(i + 1) * batch_size]} for i in range(steps)]
    state, m = step(state, batches[0])
    jax.block_until_ready(m)
    loop_ms = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        for batch in batches:
            state, m = step(state, batch)
        jax.block_until_ready(m)
        loop_ms = min(loop_ms, 1000 * (time.perf_counter() - start) / steps)
    return {"scan_ms": scan_ms, "loop_ms": loop_ms, "compile_s": first - scan_ms * steps / 1000}


def gemm_shapes(batch_size: int, layers=TRIMMED_LAYERS) -> list[tuple[str, int, int, int]]:
    """``(name, M, K, N)`` of every matrix product of one training step of dlwp_mnist in
    im2col form: per layer the forward ``[B*HW, fan_in] @ [fan_in, fan_out]``, the input
    gradient ``[B*HW, fan_out] @ [fan_out, fan_in]`` (not for the first layer) and the kernel
    gradient ``[fan_in, B*HW] @ [B*HW, fan_out]``. A "winograd" layer (3x3 kernels) has 16
    of each, one per entry of the 4x4 transformed tile, with ``B*HW/4`` tiles and ``C_in``
    for ``fan_in``. ``layers`` as in ``mnist_speed``: by default the trimmed ones."""
    shapes = []
    for i, (kind, hw, fan_in, fan_out) in enumerate(layers):
        rows, copies = batch_size * hw, 1
        if kind == "winograd":
            rows, fan_in, copies = rows // 4, fan_in // 9, 16
        name = f"{kind}_{i}"
        shapes += [(f"{name} forward", rows, fan_in, fan_out)] * copies
        if i:
            shapes += [(f"{name} input grad", rows, fan_out, fan_in)] * copies
        shapes += [(f"{name} kernel grad", fan_in, rows, fan_out)] * copies
    return shapes


def time_gemms(shapes: list[tuple[str, int, int, int]], steps: int) -> float:
    """ms per step of all ``shapes``' products, one after another in a jitted ``lax.scan``.

    Each product's left operand is carried through the loop and touched in one element that
    depends on the last product, so XLA can neither hoist a product out of the loop nor
    shrink it; the products themselves are carried too, so each is computed whole.
    """
    key = jax.random.key(0)
    lhs = [jax.random.normal(key, (m, k)) for _, m, k, _ in shapes]
    rhs = [jax.random.normal(key, (k, n)) for _, _, k, n in shapes]
    outs = [jnp.zeros((m, n)) for _, m, _, n in shapes]

    def body(carry, _):
        lhs, outs = carry
        outs = [a @ b for a, b in zip(lhs, rhs, strict=True)]
        lhs = [a.at[0, 0].add(1e-30 * out[0, 0]) for a, out in zip(lhs, outs, strict=True)]
        return (lhs, outs), None

    run = jax.jit(lambda carry: jax.lax.scan(body, carry, length=steps)[0])
    carry = jax.block_until_ready(run((lhs, outs)))
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        carry = jax.block_until_ready(run(carry))
        best = min(best, time.perf_counter() - start)
    return 1000 * best / steps


def default_policies() -> str:
    """``xla,im2col,auto`` (and ``cpu`` on another backend, where auto is not cpu)."""
    return "xla,im2col,auto" + ("" if jax.default_backend() == "cpu" else ",cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--policies", default=None,
                        help=f"comma list of {', '.join(fc.kernels.POLICIES)} "
                             "(default xla,im2col,auto, plus cpu off CPU)")
    args = parser.parse_args()
    policies = [p.strip() for p in (args.policies or default_policies()).split(",") if p.strip()]
    unknown = sorted(set(policies) - set(fc.kernels.POLICIES))
    if unknown:
        parser.error(f"unknown policies {unknown}; expected some of {list(fc.kernels.POLICIES)}")
    try:
        (images, labels), _ = load_mnist()
    except fc.data.DatasetUnavailableError as error:
        sys.exit(f"conv_impl.py: {error}")
    peak = matmul_peak_gflops()["jax"]
    step_gflop = train_flops_per_example() * args.batch_size / 1e9
    layers = {"direct": TRIMMED_LAYERS, "winograd": WINOGRAD_LAYERS}
    executed_gflop = {name: train_flops_per_example(shapes) * args.batch_size / 1e9
                      for name, shapes in layers.items()}
    print(f"backend {jax.default_backend()} ({jax.devices()[0]}), jax {jax.__version__}, "
          f"dlwp_mnist, batch {args.batch_size}, {args.steps} steps ({step_gflop:.3f} GFLOP "
          f"each, {executed_gflop['direct']:.3f} executed, {executed_gflop['winograd']:.3f} "
          f"with Winograd); fp32 matmul peak {peak:.0f} GFLOP/s (jax, n=2048)")

    def rate(ms: float, executed: float) -> str:
        gflops = step_gflop / (ms / 1000)
        return (f"{gflops:.0f} | {100 * gflops / peak:.0f}% | "
                f"{100 * executed / (ms / 1000) / peak:.0f}%")

    print("| kernels policy | scan ms/step | GFLOP/s | % of matmul peak | (executed FLOPs) "
          "| python-loop ms/step | compile s | formulations (training step) |")
    print("|---|---|---|---|---|---|---|---|")
    for kernels in policies:
        state = policy_state(kernels, images)
        executed = train_flops_per_example(executed_layers(state)) * args.batch_size / 1e9
        r = time_policy(kernels, args.steps, args.batch_size, images, np.asarray(labels))
        print(f"| {kernels} | {r['scan_ms']:.3f} | {rate(r['scan_ms'], executed)} | "
              f"{r['loop_ms']:.3f} | {r['compile_s']:.1f} | {kernels_of(state)} |", flush=True)
    for name, shapes in layers.items():
        floor_ms = time_gemms(gemm_shapes(args.batch_size, shapes), args.steps)
        print(f"| GEMMs alone, {name} (bound) | {floor_ms:.3f} | "
              f"{rate(floor_ms, executed_gflop[name])} | - | - | - |", flush=True)

    print("\n| GEMM (M x K x N) | ms | GFLOP/s | % of matmul peak |")
    print("|---|---|---|---|")
    distinct = gemm_shapes(args.batch_size) + gemm_shapes(args.batch_size, WINOGRAD_LAYERS)
    for name, m, k, n in dict.fromkeys(distinct):
        ms = time_gemms([(name, m, k, n)], args.steps)
        gflops = 2 * m * k * n / (ms / 1000) / 1e9
        print(f"| {name} ({m} x {k} x {n}) | {ms:.3f} | {gflops:.0f} | "
              f"{100 * gflops / peak:.0f}% |", flush=True)


if __name__ == "__main__":
    main()
