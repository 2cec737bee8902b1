"""MNIST convnet training speed: flaxconv against Keras 3 (TensorFlow and JAX backends) and
PyTorch, on the same model, data, batch size and optimizer, in one run.

    python benchmarks/mnist_speed.py                         # all peers, 5 epochs each
    python benchmarks/mnist_speed.py --peers flaxconv --epochs 2
    python benchmarks/mnist_speed.py --recipe fast --peers flaxconv   # the GPU speed-run recipe
    FLAXCONV_KERNELS=xla python benchmarks/mnist_speed.py --peers flaxconv   # XLA's own ops

The model is *Deep Learning with Python*'s convnet (Conv32-pool-Conv64-pool-Conv128-Dense10,
glorot-uniform), rmsprop 1e-3 (Keras's epsilon placement), batch 64, 60,000 training and
10,000 test images of the real MNIST. Each peer runs in its own process (peak RSS is that
process's), timing every epoch; for flaxconv, "compile" is measured ahead of time and a
warm-up epoch on a copy of the state precedes the timed ones; for the peers, it is the first
epoch minus a steady one. Achieved GFLOP/s counts the model's training FLOPs (forward +
backward, from the layer shapes) against the fp32 matmul peak measured in the same run, the
same FLOPs for every peer. flaxconv skips the rows and columns that the pools drop
(``ConvStack.trim``, 13% of them) and, on CPU, its kernel seam (``flaxconv.kernels``) runs
conv_1 as Winograd's F(2x2, 3x3) (4/9 of its multiply-adds), so the column "(executed
FLOPs)" gives its share of the peak counting only the matmul FLOPs it performs. The table
goes to stdout and, as JSON and Markdown, to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

PEERS = ("flaxconv", "keras-tf", "keras-jax", "torch")
BATCH = 64
LR = 1e-3

# DLWP convnet: (kind, output H*W, fan-in, fan-out) of each layer with weights.
LAYERS = [("conv", 26 * 26, 3 * 3 * 1, 32), ("conv", 11 * 11, 3 * 3 * 32, 64),
          ("conv", 3 * 3, 3 * 3 * 64, 128), ("dense", 1, 1152, 10)]
# The same layers as flaxconv trains them (ConvStack.trim): the last row and column of
# conv_1's 11x11 map never reach the 5x5 pool, nor what only feeds them, so conv_0
# computes 24x24 and conv_1 10x10.
TRIMMED_LAYERS = [("conv", 24 * 24, 3 * 3 * 1, 32), ("conv", 10 * 10, 3 * 3 * 32, 64),
                  ("conv", 3 * 3, 3 * 3 * 64, 128), ("dense", 1, 1152, 10)]
# As flaxconv trains them on CPU (kernels "auto" or "cpu", flaxconv.kernels): conv_1 -> relu ->
# pool is one Winograd F(2x2, 3x3) block, 16 products per 2x2 output tile and channel pair where the
# direct convolution has 4 * 9 = 36, in the forward pass and in both gradients.
WINOGRAD_LAYERS = [TRIMMED_LAYERS[0], ("winograd", *TRIMMED_LAYERS[1][1:]), *TRIMMED_LAYERS[2:]]
WINOGRAD_MACS_FRACTION = 16 / 36


def train_flops_per_example(layers: list[tuple[str, int, int, int]] = LAYERS) -> float:
    """Forward 2*MACs; backward 2*MACs for weight gradients + 2*MACs for input gradients
    (none for the first layer, whose input is data).

    With the default ``LAYERS`` these are the model's FLOPs, the same for every peer and
    the numerator of every "% of matmul peak"; ``TRIMMED_LAYERS`` and ``WINOGRAD_LAYERS``
    give the matmul FLOPs that flaxconv executes (the Winograd transforms' additions, under
    2% of them, are not counted).
    """
    macs = [hw * fan_in * fan_out * (WINOGRAD_MACS_FRACTION if kind == "winograd" else 1)
            for kind, hw, fan_in, fan_out in layers]
    return 2.0 * (3 * sum(macs) - macs[0])


def executed_layers(state) -> list[tuple[str, int, int, int]]:
    """The layers as ``state`` (a dlwp_mnist TrainState) trains them in the library's steps:
    whole without ``ConvStack.trim``, else trimmed, with conv_1 as Winograd where the
    state's kernels policy (``state.kernels``, see ``fc.steps.explain_kernels``) runs it so."""
    if not getattr(state.model, "trim", False):
        return LAYERS
    conv_1 = [c for c in training_choices(state) if c.layer.endswith("conv_1")]
    winograd = bool(conv_1) and conv_1[0].formulation.startswith("winograd")
    return WINOGRAD_LAYERS if winograd else TRIMMED_LAYERS


def compact_formulation(formulation: str) -> str:
    """``"fused (+ bias, relu, max_pool 2x2)"`` -> ``"fused(+relu,pool)"``,
    ``"im2col, unfused (+ bias, relu, max_pool 2x2)"`` -> ``"im2col/unfused(+relu,pool)"``,
    ``"reshape-max (relu folded in)"`` -> ``"reshape-max(+relu)"``; a fallback to XLA's own
    operation, ``"xla (reason)"``, stays as it is."""
    if formulation.startswith("xla ("):
        return formulation
    head, _, extra = formulation.partition(" (")
    folded = []
    for item in extra.rstrip(")").split(","):
        item = item.strip().removeprefix("+ ").removesuffix(" folded in")
        if item.startswith(("max_pool", "avg_pool")):
            item = "pool"
        if item and item != "bias":
            folded.append(item)
    return head.replace(", ", "/") + (f"(+{','.join(folded)})" if folded else "")


def describe_kernels(choices) -> str:
    """``fc.steps.explain_kernels``'s choices in one line: ``"conv_0: fused(+relu,pool) ·
    conv_1: winograd(+relu,pool) · conv_2: im2col"`` (layer paths without the root module;
    a pool applied as a function, by its op), then how many layers fall back to XLA's own
    operations; with ``kernels="xla"`` (the opt-out) just that."""
    if not choices:
        return "no conv or pool layers"
    fallbacks = sum(c.formulation.startswith("xla (") for c in choices)
    if all(c.formulation == "xla (kernels='xla')" for c in choices):
        return f"opt-out: all {len(choices)} conv/pool layers on XLA's own ops"
    # A function's pool (nn.max_pool) has its module's scope: named by its op instead.
    parts = [f"{c.layer.partition('/')[2] or c.op.split(' stride')[0]}: "
             f"{compact_formulation(c.formulation)}" for c in choices]
    return " · ".join(parts) + f" (xla fallbacks: {fallbacks} of {len(choices)})"


def training_choices(state) -> list:
    """``fc.steps.explain_kernels`` of ``state``'s training step (traced, nothing computed)."""
    import jax
    import jax.numpy as jnp

    import flaxconv as fc

    images = jax.ShapeDtypeStruct((1, *state.input_shape), jnp.float32)
    return fc.steps.explain_kernels(state, images, train=True)


def kernels_of(state) -> str:
    """:func:`describe_kernels` of ``state``'s training step."""
    return describe_kernels(training_choices(state))


def matmul_peak_gflops(n: int = 2048, repeats: int = 10, numpy: bool = True
                       ) -> dict[str, float]:
    """Best fp32 GFLOP/s of an n x n matmul in jax (jitted) and, with ``numpy``, in numpy."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    out = {}
    if numpy:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - t)
        out["numpy"] = 2 * n**3 / min(times) / 1e9
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(a)
    f = jax.jit(lambda x: x @ x)
    f(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    out["jax"] = 2 * n**3 / min(times) / 1e9
    return out


def load_mnist():
    """uint8 [N, 28, 28, 1] images and int32 labels, train and test, without TensorFlow."""
    from flaxconv import data

    source = "raw" if os.environ.get(data.DATA_DIR_ENV) else "auto"
    return data.load("mnist", "train", source=source), data.load("mnist", "test", source=source)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --- workers: each trains, then prints one JSON line -------------------------------------


def run_flaxconv(epochs: int, recipe: str, seed: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    import flaxconv as fc

    (x, y), (xt, yt) = load_mnist()
    batch, lr = BATCH, LR
    model = fc.models.get("dlwp_mnist")
    if recipe == "fast":
        batch = 256
        steps = epochs * -(-len(y) // batch)
        lr = optax.cosine_onecycle_schedule(steps, peak_value=4e-3, pct_start=0.25)
        tx = fc.optim.make("adam", learning_rate=lr)
    else:
        tx = fc.optim.make("rmsprop", learning_rate=lr)
    state = fc.create_train_state(jax.random.key(seed), model, tx, x[:1])
    # The epoch's compile time, measured directly (ahead of time, on fit's placement).
    placed, images, labels, plan = fc.epochs.place_for_fit(state, x, y, batch)
    start = time.perf_counter()
    fc.epochs.train_epoch.lower(
        placed, images, labels, plan.indices(jax.random.key(0)), plan.mask
    ).compile()
    compile_seconds = time.perf_counter() - start
    del placed, images, labels
    # A warm-up epoch on a copy (same shapes) traces fit's step and compiles its small
    # helpers (the permutation), so the timed epochs below are training only.
    fc.fit(jax.tree.map(jnp.copy, state), (x, y), epochs=1, batch_size=batch, verbose="silent")
    state, history = fc.fit(state, (x, y), epochs=epochs, batch_size=batch, verbose="silent")
    test = fc.evaluate(state, xt, yt)
    return {
        "epoch_seconds": history["epoch_seconds"],
        "executed_flops_per_example": train_flops_per_example(executed_layers(state)),
        "compile_seconds": compile_seconds,
        "steps_per_epoch": -(-len(y) // batch),
        "batch_size": batch,
        "test_accuracy": test["accuracy"],
        "device": str(jax.devices()[0]),
        "kernels": kernels_of(state),
        "version": f"jax {jax.__version__}",
    }


def _keras_model(keras):
    layers = keras.layers
    inputs = keras.Input((28, 28, 1))
    h = layers.Conv2D(32, 3, activation="relu")(inputs)
    h = layers.MaxPooling2D(2)(h)
    h = layers.Conv2D(64, 3, activation="relu")(h)
    h = layers.MaxPooling2D(2)(h)
    h = layers.Conv2D(128, 3, activation="relu")(h)
    h = layers.Flatten()(h)
    outputs = layers.Dense(10, activation="softmax")(h)
    return keras.Model(inputs, outputs)


def keras_epoch_timer(keras, seconds: list[float]):
    """A Keras callback that appends each epoch's wall-clock seconds to ``seconds``."""

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds.append(time.perf_counter() - self.start)

    return Timer()


def run_keras(epochs: int, recipe: str, seed: int) -> dict:
    import keras

    (x, y), (xt, yt) = load_mnist()
    x, xt = x.astype("float32") / 255.0, xt.astype("float32") / 255.0
    keras.utils.set_random_seed(seed)
    model = _keras_model(keras)
    model.compile(
        optimizer=keras.optimizers.RMSprop(LR),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    times = []
    model.fit(x, y, epochs=epochs, batch_size=BATCH, verbose=0,
              callbacks=[keras_epoch_timer(keras, times)])
    _, accuracy = model.evaluate(xt, yt, batch_size=1000, verbose=0)
    return {
        "epoch_seconds": times,
        "steps_per_epoch": -(-len(y) // BATCH),
        "batch_size": BATCH,
        "test_accuracy": float(accuracy),
        "version": f"keras {keras.__version__} ({keras.backend.backend()})",
    }


def torch_epochs(model, opt, x, y, epochs: int) -> list[float]:
    """Seconds of each of ``epochs`` shuffled passes of ``BATCH``-sized torch steps over
    ``x`` (NCHW float) and ``y`` (int64) with softmax cross-entropy, on ``x``'s device (a
    GPU's epoch ends at a ``cuda.synchronize``: its kernels run asynchronously)."""
    import torch

    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        perm = torch.randperm(len(y), device=x.device)
        for i in range(0, len(y), BATCH):
            idx = perm[i : i + BATCH]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        if x.is_cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds


def run_torch(epochs: int, recipe: str, seed: int) -> dict:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    (x, y), (xt, yt) = load_mnist()
    # NCHW float32 in [0, 1], as torchvision's ToTensor gives.
    to_tensor = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)  # noqa: E731
    x, xt = to_tensor(x), to_tensor(xt)
    y, yt = torch.from_numpy(y.astype(np.int64)), torch.from_numpy(yt.astype(np.int64))
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3), nn.ReLU(), nn.Flatten(), nn.Linear(1152, 10),
    )
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    opt = torch.optim.RMSprop(model.parameters(), lr=LR, alpha=0.9, eps=1e-7)
    times = torch_epochs(model, opt, x, y, epochs)
    model.eval()
    with torch.no_grad():
        correct = sum(
            int((model(xt[i : i + 1000]).argmax(1) == yt[i : i + 1000]).sum())
            for i in range(0, len(yt), 1000)
        )
    return {
        "epoch_seconds": times,
        "steps_per_epoch": -(-len(y) // BATCH),
        "batch_size": BATCH,
        "test_accuracy": correct / len(yt),
        "version": f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
    }


WORKERS = {
    "flaxconv": run_flaxconv,
    "keras-tf": run_keras,
    "keras-jax": run_keras,
    "torch": run_torch,
}


def worker(name: str, epochs: int, recipe: str, seed: int) -> None:
    start = time.perf_counter()
    result = WORKERS[name](epochs, recipe, seed)
    result["wall_seconds"] = time.perf_counter() - start
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


def run_peer(name: str, epochs: int, recipe: str, seed: int) -> dict:
    env = dict(os.environ)
    if name.startswith("keras"):
        env["KERAS_BACKEND"] = "tensorflow" if name == "keras-tf" else "jax"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cmd = [sys.executable, __file__, "--worker", name, "--epochs", str(epochs),
           "--recipe", recipe, "--seed", str(seed)]
    return run_worker_process(cmd, env)


def run_worker_process(cmd: list[str], env: dict[str, str]) -> dict:
    """Runs a worker command in a fresh process: the JSON of its ``RESULT`` line, or
    ``{"error": its last lines}``."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail) or f"exit {proc.returncode}"}


def summarize_peer(name: str, seed: int, r: dict, flops: float, peak: float) -> dict:
    if "error" in r:
        return {"peer": name, "seed": seed, "error": r["error"]}
    times = r["epoch_seconds"]
    steady = statistics.median(times[1:]) if len(times) > 1 else times[0]
    if "compile_seconds" in r:  # compiled ahead of time: every epoch is training
        compile_s, train_s = r["compile_seconds"], sum(times)
    else:  # the first epoch's excess over a steady one
        compile_s = max(times[0] - steady, 0.0)
        train_s = sum(times) - compile_s
    examples = r["steps_per_epoch"] * r["batch_size"]
    gflops = flops * 60000 / steady / 1e9
    # The peers compute every layer whole; flaxconv skips what the pools drop (and on CPU
    # runs conv_1 as Winograd).
    executed_gflops = r.get("executed_flops_per_example", flops) * 60000 / steady / 1e9
    return {
        "peer": name,
        "seed": seed,
        "version": r["version"],
        "batch_size": r["batch_size"],
        "epoch_s": steady,
        "best_epoch_s": min(times),
        "compile_s": compile_s,
        "train_s_after_compile": train_s,
        "ms_per_step": 1000 * steady / r["steps_per_epoch"],
        "gflops": gflops,
        "peak_fraction": gflops / peak,
        "executed_peak_fraction": executed_gflops / peak,
        "peak_rss_mb": r["peak_rss_mb"],
        "test_accuracy": r["test_accuracy"],
        "epochs": len(times),
        "examples_per_epoch": examples,
        **({"kernels": r["kernels"]} if "kernels" in r else {}),
    }


def table(rows: list[dict], baseline: str = "keras-tf") -> str:
    base_times = [r["epoch_s"] for r in rows if r["peer"] == baseline and "epoch_s" in r]
    base = statistics.median(base_times) if base_times else None
    head = ("| peer | seed | version | s/epoch (steady) | compile s | train s after compile "
            "| ms/step | GFLOP/s | % of matmul peak | (executed FLOPs) | peak RSS MB | test acc "
            "| vs keras-tf |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['peer']} | {r['seed']} | failed: {r['error'][:80]} |" + " |" * 10)
            continue
        ratio = f"{r['epoch_s'] / base:.2f}x" if base else "n/a"
        lines.append(
            f"| {r['peer']} | {r['seed']} | {r['version']} | {r['epoch_s']:.2f} | "
            f"{r['compile_s']:.1f} | {r['train_s_after_compile']:.2f} | "
            f"{r['ms_per_step']:.2f} | {r['gflops']:.0f} | "
            f"{100 * r['peak_fraction']:.0f}% | {100 * r['executed_peak_fraction']:.0f}% | "
            f"{r['peak_rss_mb']:.0f} | "
            f"{100 * r['test_accuracy']:.2f}% | {ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"comma list of {', '.join(PEERS)}")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--recipe", choices=("dlwp", "fast"), default="dlwp",
                        help="dlwp: rmsprop 1e-3 batch 64; fast: flaxconv's speed-run recipe")
    parser.add_argument("--seeds", default="0", help="comma list; one run per peer and seed")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="write results here (.json and .md)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.epochs, args.recipe, args.seed)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        parser.error(f"unknown peers {unknown}; expected some of {list(PEERS)}")

    peak = matmul_peak_gflops()
    flops = train_flops_per_example()
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; fp32 matmul peak {max(peak.values()):.0f} GFLOP/s "
          f"(numpy {peak['numpy']:.0f}, jax {peak['jax']:.0f}); "
          f"{flops / 1e6:.2f} MFLOP per training example", flush=True)
    rows = []
    for name in peers:
        for seed in [int(s) for s in args.seeds.split(",")]:
            print(f"running {name}, seed {seed} ({args.epochs} epochs)...", flush=True)
            result = run_peer(name, args.epochs, args.recipe, seed)
            rows.append(summarize_peer(name, seed, result, flops, max(peak.values())))
    out = table(rows)
    print(out)
    if args.out:
        record = {
            "command": " ".join(sys.argv),
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.node()}, {os.cpu_count()} cores",
            "matmul_peak_gflops": peak,
            "train_mflop_per_example": flops / 1e6,
            "rows": rows,
        }
        with open(args.out + ".json", "w") as f:
            json.dump(record, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(out + "\n")


if __name__ == "__main__":
    main()
