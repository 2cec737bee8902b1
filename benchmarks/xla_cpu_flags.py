"""Do XLA:CPU's options (XNNPACK, oneDNN, fast math, ...) speed up flaxconv's epoch?

    python benchmarks/xla_cpu_flags.py [--steps 300] [--policies auto,xla]

For each ``XLA_FLAGS`` setting (in a fresh process, since XLA reads them at start-up) and
each kernels policy (``state.kernels``, :mod:`flaxconv.kernels`: ``auto`` the seam's
formulations, ``xla`` XLA's own convolutions, ``im2col``), times a jitted ``lax.scan`` of
``--steps`` dlwp_mnist training steps at batch 64 on real MNIST, after a compiling first
call; prints ms/step. A flag this jaxlib does not know ends its process: "failed".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SETTINGS = {
    "default": "",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "onednn": "--xla_cpu_use_onednn=true",
    "fast-math": "--xla_cpu_enable_fast_math=true",
    "concurrency-scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "legacy-runtime": "--xla_cpu_use_thunk_runtime=false",
}


def worker(kernels: str, steps: int) -> dict:
    import jax

    import flaxconv as fc
    from flaxconv import epochs as ep

    images, labels = fc.data.load("mnist", "train", source="raw")
    model = fc.models.get("dlwp_mnist")
    state = fc.create_train_state(
        jax.random.key(0), model, fc.optim.make("rmsprop", learning_rate=1e-3), images[:1],
        kernels=kernels,
    )
    n = steps * 64
    x, y = jax.device_put((images[:n], labels[:n]))
    plan = ep.epoch_plan(n, 64)
    times = []
    for i in range(3):
        start = time.perf_counter()
        state, sums = ep.train_epoch(state, x, y, plan.indices(jax.random.key(i)), plan.mask)
        jax.block_until_ready(sums)
        times.append(time.perf_counter() - start)
    return {"ms_per_step": 1000 * min(times[1:]) / steps, "first_call_s": times[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--policies", default="auto", help="comma list of kernels policies")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.steps)), flush=True)
        return
    print(f"dlwp_mnist, batch 64, {args.steps} steps per timed scan; best of 2 after compiling")
    print("| XLA_FLAGS | kernels | ms/step | first call s |")
    print("|---|---|---|---|")
    for name in args.settings.split(","):
        for kernels in args.policies.split(","):
            env = {**os.environ, "XLA_FLAGS": SETTINGS[name]}
            done = subprocess.run(
                [sys.executable, __file__, "--worker", kernels, "--steps", str(args.steps)],
                env=env, capture_output=True, text=True,
            )
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if not lines:
                error = (done.stderr.strip().splitlines() or ["no output"])[-1][:80]
                print(f"| `{SETTINGS[name] or '(none)'}` | {kernels} | failed: {error} | |")
                continue
            r = json.loads(lines[0][len("RESULT "):])
            print(f"| `{SETTINGS[name] or '(none)'}` | {kernels} | {r['ms_per_step']:.2f} | "
                  f"{r['first_call_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
