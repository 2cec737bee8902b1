"""Model zoo training speed: flaxconv against Keras 3 (TensorFlow) and PyTorch on seven convnets
(two presets, three hand-written linen modules, two of those architectures written with
``flax.nnx``), same architecture, data, batch and optimizer.

    python benchmarks/zoo.py                                  # every model, the default peers
    python benchmarks/zoo.py --steps 5 --xla-steps 2          # a smoke run
    python benchmarks/zoo.py --models resnet --peers flaxconv-fit,keras-tf --steps 50
    python benchmarks/zoo.py --flaxconv-python .venv313/bin/python --out benchmarks/results/zoo_cpu
    python benchmarks/zoo.py --peers flaxconv-fit,flaxconv-step,flaxconv-xla,keras-jax,torch \
        --steps 300 --xla-steps 300 --repeats 5          # on a GPU machine without TensorFlow

Every model trains with batch 64 and rmsprop 1e-3 (Keras's defaults: rho 0.9, epsilon 1e-7)
on 10 classes: the 28x28x1 models on the first ``64 * --steps`` images of the real MNIST
(``FLAXCONV_DATA_DIR``), the ResNet on random 32x32x3 uint8 images. The peers:

* ``flaxconv-fit``: ``fc.fit`` on arrays in memory, the library's epoch path;
* ``flaxconv-step``: ``fc.train_step`` in a Python loop over pre-built uint8 batches on device;
* ``flaxconv-xla``: ``fc.fit`` with ``kernels="xla"``, the seam's opt-out (XLA's own ops);
* ``keras-tf``: Keras 3 ``model.fit`` on TensorFlow, float32 images in [0, 1];
* ``keras-jax``: the same on Keras's JAX backend (not a default peer: for machines without
  TensorFlow, such as the lent GPU one, where it is the Keras row the ratios divide by);
* ``torch``: PyTorch, a plain training loop: on CPU with torch's default threads, or on the
  GPU where torch sees one (data on the device, ``cudnn.benchmark`` on, timed to a
  ``cuda.synchronize``).

Each (model, peer) runs in its own fresh process, one after another: an untimed warm-up epoch
of ``--steps`` steps (compilation, tracing), then ``--repeats`` timed epochs of ``--steps``
steps; ms/step is the best timed epoch divided by its steps. The opt-out rows
(``flaxconv-xla``), 10-40x slower on CPU, time ``--xla-steps`` steps per epoch instead. "x
Keras" divides ms/step by Keras-TF's on the same model, or by Keras-JAX's where no Keras-TF
row ran. The flaxconv rows name the
formulation of each conv and pool layer (``fc.steps.explain_kernels``) and count the
fallbacks to XLA's own operations. Each flaxconv worker then times a jitted 2048x2048
float32 matmul, and the machine line gives their range: on a shared CPU the machine's speed
moves the ratios (by up to 1.6x between sessions here). The flaxconv workers can run on
another interpreter
(``--flaxconv-python``, e.g. a venv with a newer jax); a peer whose packages are missing is
skipped with one line. The defaults (100 steps, 10 for flaxconv-xla, best of 3) take about
14 minutes (seven models) on the 2-core development machine when it is otherwise idle.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
from mnist_speed import (
    keras_epoch_timer,
    kernels_of,
    matmul_peak_gflops,
    run_worker_process,
    torch_epochs,
)

MODELS = ("dlwp_mnist", "dlwp_linen", "dlwp_nnx", "fashion_cnn", "bn_same", "bn_same_nnx",
          "resnet")
# The NNX modules are the linen ones' architectures: the same Keras and PyTorch peers.
ARCHITECTURE = {"dlwp_nnx": "dlwp_linen", "bn_same_nnx": "bn_same"}
PEERS = ("flaxconv-fit", "flaxconv-step", "flaxconv-xla", "keras-tf", "keras-jax", "torch")
DEFAULT_PEERS = ("flaxconv-fit", "flaxconv-step", "flaxconv-xla", "keras-tf", "torch")
KERAS_PEERS = {"keras-tf": "tensorflow", "keras-jax": "jax"}  # peer -> KERAS_BACKEND
FLAXCONV_PEERS = ("flaxconv-fit", "flaxconv-step", "flaxconv-xla")
BATCH = 64
LR = 1e-3
NUM_CLASSES = 10
# Input shape (H, W, C) per model: MNIST for the 28x28 ones, random images for the ResNet.
INPUT_SHAPES = {"dlwp_mnist": (28, 28, 1), "dlwp_linen": (28, 28, 1), "dlwp_nnx": (28, 28, 1),
                "fashion_cnn": (28, 28, 1), "bn_same": (28, 28, 1), "bn_same_nnx": (28, 28, 1),
                "resnet": (32, 32, 3)}
RESNET_WIDTHS = (16, 32, 64)  # one basic block per stage; stages 2 and 3 halve the map


# --- the hand-written Flax modules -------------------------------------------------------


def flax_modules():
    """The hand-written linen modules (imported lazily: the Keras and torch workers never
    import jax)."""
    import flax.linen as nn
    import jax.numpy as jnp

    glorot = nn.initializers.glorot_uniform()  # Keras's default, as the presets use

    class DLWPLinen(nn.Module):
        """*Deep Learning with Python*'s MNIST convnet, the way a user writes it."""

        @nn.compact
        def __call__(self, x, *, train: bool):
            for features in (32, 64):
                x = nn.relu(nn.Conv(features, (3, 3), padding="VALID", kernel_init=glorot)(x))
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = nn.relu(nn.Conv(128, (3, 3), padding="VALID", kernel_init=glorot)(x))
            return nn.Dense(NUM_CLASSES, kernel_init=glorot)(x.reshape(x.shape[0], -1))

    class BNSame(nn.Module):
        """Conv(SAME) -> BatchNorm -> relu -> max-pool, twice, then Dense."""

        @nn.compact
        def __call__(self, x, *, train: bool):
            for features in (32, 64):
                x = nn.Conv(features, (3, 3), padding="SAME", kernel_init=glorot)(x)
                x = nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3)(x)
                x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
            return nn.Dense(NUM_CLASSES, kernel_init=glorot)(x.reshape(x.shape[0], -1))

    def batch_norm(train):
        return nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3)

    class BasicBlock(nn.Module):
        """Two 3x3 convs with BatchNorm; a 1x1 conv + BN shortcut where the shape changes."""

        features: int
        stride: int = 1

        @nn.compact
        def __call__(self, x, *, train: bool):
            conv = lambda f, k, s: nn.Conv(f, (k, k), (s, s), padding="SAME", use_bias=False,
                                           kernel_init=glorot)
            y = nn.relu(batch_norm(train)(conv(self.features, 3, self.stride)(x)))
            y = batch_norm(train)(conv(self.features, 3, 1)(y))
            if self.stride != 1 or x.shape[-1] != self.features:
                x = batch_norm(train)(conv(self.features, 1, self.stride)(x))
            return nn.relu(x + y)

    class SmallResNet(nn.Module):
        """Stem conv, one basic block per stage (widths 16, 32, 64), global average pool."""

        @nn.compact
        def __call__(self, x, *, train: bool):
            x = nn.Conv(RESNET_WIDTHS[0], (3, 3), padding="SAME", use_bias=False,
                        kernel_init=glorot)(x)
            x = nn.relu(batch_norm(train)(x))
            for i, features in enumerate(RESNET_WIDTHS):
                x = BasicBlock(features, stride=1 if i == 0 else 2)(x, train=train)
            return nn.Dense(NUM_CLASSES, kernel_init=glorot)(jnp.mean(x, axis=(1, 2)))

    return {"dlwp_linen": DLWPLinen, "bn_same": BNSame, "resnet": SmallResNet}


def nnx_modules():
    """Two of those architectures written as ``flax.nnx`` modules, as an NNX user writes
    them (``nnx.Conv``, ``nnx.max_pool``, ``nnx.BatchNorm``, ``nnx.Linear``)."""
    from flax import nnx

    glorot = nnx.initializers.glorot_uniform()

    class DLWPNNX(nnx.Module):
        def __init__(self, *, rngs: nnx.Rngs):
            conv = lambda i, o: nnx.Conv(i, o, (3, 3), padding="VALID", kernel_init=glorot,
                                         rngs=rngs)
            self.convs = nnx.List([conv(1, 32), conv(32, 64), conv(64, 128)])
            self.head = nnx.Linear(3 * 3 * 128, NUM_CLASSES, kernel_init=glorot, rngs=rngs)

        def __call__(self, x):
            for conv in self.convs[:2]:
                x = nnx.max_pool(nnx.relu(conv(x)), (2, 2), strides=(2, 2))
            x = nnx.relu(self.convs[2](x))
            return self.head(x.reshape(x.shape[0], -1))

    class BNSameNNX(nnx.Module):
        def __init__(self, *, rngs: nnx.Rngs):
            self.convs = nnx.List([
                nnx.Conv(i, o, (3, 3), padding="SAME", kernel_init=glorot, rngs=rngs)
                for i, o in ((1, 32), (32, 64))])
            self.norms = nnx.List([nnx.BatchNorm(c, momentum=0.99, epsilon=1e-3, rngs=rngs)
                                   for c in (32, 64)])
            self.head = nnx.Linear(7 * 7 * 64, NUM_CLASSES, kernel_init=glorot, rngs=rngs)

        def __call__(self, x):
            for conv, norm in zip(self.convs, self.norms, strict=True):
                x = nnx.max_pool(nnx.relu(norm(conv(x))), (2, 2), strides=(2, 2))
            return self.head(x.reshape(x.shape[0], -1))

    return {"dlwp_nnx": DLWPNNX, "bn_same_nnx": BNSameNNX}


def flax_model(name: str):
    """The module of ``name``: a preset from ``fc.models.get``, a hand-written linen module,
    or an NNX module instance."""
    if name in ("dlwp_mnist", "fashion_cnn"):
        import flaxconv as fc

        return fc.models.get(name, num_classes=NUM_CLASSES)
    if name in ARCHITECTURE:
        from flax import nnx

        return nnx_modules()[name](rngs=nnx.Rngs(0))
    return flax_modules()[name]()


# --- the same architectures in Keras and PyTorch -----------------------------------------


def keras_model(name: str, keras):
    name = ARCHITECTURE.get(name, name)
    L = keras.layers
    inputs = keras.Input(INPUT_SHAPES[name])
    h = inputs
    if name in ("dlwp_mnist", "dlwp_linen"):
        for features in (32, 64):
            h = L.MaxPooling2D(2)(L.Conv2D(features, 3, activation="relu")(h))
        h = L.Flatten()(L.Conv2D(128, 3, activation="relu")(h))
    elif name == "fashion_cnn":
        for _ in range(2):
            h = L.MaxPooling2D(2)(L.Conv2D(32, 3, activation="relu")(h))
        h = L.Dense(128, activation="relu")(L.Flatten()(h))
    elif name == "bn_same":
        for features in (32, 64):
            h = L.BatchNormalization()(L.Conv2D(features, 3, padding="same")(h))
            h = L.MaxPooling2D(2)(L.ReLU()(h))
        h = L.Flatten()(h)
    else:  # resnet
        def conv(h, f, k, s):
            return L.Conv2D(f, k, strides=s, padding="same", use_bias=False)(h)

        h = L.ReLU()(L.BatchNormalization()(conv(h, RESNET_WIDTHS[0], 3, 1)))
        for i, features in enumerate(RESNET_WIDTHS):
            stride = 1 if i == 0 else 2
            y = L.ReLU()(L.BatchNormalization()(conv(h, features, 3, stride)))
            y = L.BatchNormalization()(conv(y, features, 3, 1))
            if stride != 1 or h.shape[-1] != features:
                h = L.BatchNormalization()(conv(h, features, 1, stride))
            h = L.ReLU()(L.Add()([h, y]))
        h = L.GlobalAveragePooling2D()(h)
    outputs = L.Dense(NUM_CLASSES, activation="softmax")(h)
    return keras.Model(inputs, outputs)


def torch_model(name: str):
    from torch import nn

    name = ARCHITECTURE.get(name, name)
    bn = lambda c: nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)  # Keras's momentum 0.99
    if name in ("dlwp_mnist", "dlwp_linen"):
        return nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3), nn.ReLU(), nn.Flatten(), nn.Linear(1152, NUM_CLASSES))
    if name == "fashion_cnn":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(800, 128), nn.ReLU(), nn.Linear(128, NUM_CLASSES))
    if name == "bn_same":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), bn(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), bn(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(7 * 7 * 64, NUM_CLASSES))

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), bn(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False), bn(cout))
            self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), bn(cout))

        def forward(self, x):
            return (self.shortcut(x) + self.body(x)).relu()

    w = RESNET_WIDTHS
    return nn.Sequential(
        nn.Conv2d(3, w[0], 3, 1, 1, bias=False), bn(w[0]), nn.ReLU(),
        Block(w[0], w[0], 1), Block(w[0], w[1], 2), Block(w[1], w[2], 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w[2], NUM_CLASSES))


# --- data ---------------------------------------------------------------------------------


def make_data(name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 images ``[n, H, W, C]`` and int32 labels: the first ``n`` of MNIST's
    training set for the 28x28 models, random ones for the ResNet."""
    if name == "resnet":
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (n, *INPUT_SHAPES[name]), dtype=np.uint8)
        return images, rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    from flaxconv import data

    source = "raw" if os.environ.get(data.DATA_DIR_ENV) else "auto"
    images, labels = data.load("mnist", "train", source=source)
    if len(labels) < n:
        images, labels = np.resize(images, (n, *images.shape[1:])), np.resize(labels, n)
    return images[:n], labels[:n]


# --- workers: each trains one model with one peer, then prints one JSON line ---------------


def run_flaxconv(model_name: str, peer: str, x, y, steps: int, repeats: int) -> dict:
    import jax

    import flaxconv as fc

    kernels = "xla" if peer == "flaxconv-xla" else "auto"
    tx = fc.optim.make("rmsprop", learning_rate=LR)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = fc.create_train_state(jax.random.key(0), flax_model(model_name), tx, x[:1],
                                      kernels=kernels)
        formulations = kernels_of(state)
        if peer == "flaxconv-step":
            epoch_seconds = train_step_loop(state, x, y, steps, repeats)
        else:
            _, history = fc.fit(state, (x, y), epochs=1 + repeats, batch_size=BATCH, verbose=0)
            epoch_seconds = history["epoch_seconds"]
    rewrite_warnings = sorted({str(w.message) for w in caught
                               if "flaxconv.kernels" in str(w.message)})
    # The machine's speed at the time: on a shared CPU it moves the ratios by up to 1.6x.
    peak = matmul_peak_gflops(repeats=5, numpy=False)["jax"]
    return {"epoch_seconds": epoch_seconds, "kernels": kernels, "formulations": formulations,
            "warnings": rewrite_warnings, "matmul_gflops": peak,
            "device": f"{jax.devices()[0]} ({jax.devices()[0].device_kind})"}


def train_step_loop(state, x, y, steps: int, repeats: int) -> list[float]:
    """Seconds of ``1 + repeats`` passes of ``fc.train_step`` over ``steps`` uint8 batches
    already on the device."""
    import jax

    import flaxconv as fc

    batches = [jax.device_put({"image": x[i:i + BATCH], "label": y[i:i + BATCH]})
               for i in range(0, steps * BATCH, BATCH)]
    seconds = []
    for _ in range(1 + repeats):
        start = time.perf_counter()
        for batch in batches:
            state, metrics = fc.train_step(state, batch)
        jax.block_until_ready((state, metrics))
        seconds.append(time.perf_counter() - start)
    return seconds


def run_keras(model_name: str, peer: str, x, y, steps: int, repeats: int) -> dict:
    import keras

    keras.utils.set_random_seed(0)
    model = keras_model(model_name, keras)
    model.compile(optimizer=keras.optimizers.RMSprop(LR), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    seconds = []
    model.fit(x.astype(np.float32) / 255.0, y, epochs=1 + repeats, batch_size=BATCH, verbose=0,
              callbacks=[keras_epoch_timer(keras, seconds)])
    return {"epoch_seconds": seconds, "backend": keras.backend.backend()}


def run_torch(model_name: str, peer: str, x, y, steps: int, repeats: int) -> dict:
    import torch

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # What a torch user sets for fixed shapes: cuDNN picks its fastest algorithm per layer.
    torch.backends.cudnn.benchmark = True
    model = torch_model(model_name).to(device)
    images = torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)  # NCHW
    images, labels = images.to(device), torch.from_numpy(y.astype(np.int64)).to(device)
    opt = torch.optim.RMSprop(model.parameters(), lr=LR, alpha=0.9, eps=1e-7)
    seconds = torch_epochs(model, opt, images, labels, 1 + repeats)
    return {"epoch_seconds": seconds, "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}


# The packages a peer needs: a worker without them reports "skipped" instead of failing.
REQUIRES = {"keras-tf": ("keras", "tensorflow"), "keras-jax": ("keras", "jax"),
            "torch": ("torch",)}


def worker(model_name: str, peer: str, data_path: str, steps: int, repeats: int) -> None:
    missing = [m for m in REQUIRES.get(peer, ("jax", "flaxconv"))
               if importlib.util.find_spec(m) is None]
    if missing:
        result = {"skipped": f"{', '.join(missing)} not installed for {sys.executable}"}
    else:
        with np.load(data_path) as arrays:
            x, y = arrays["images"][:steps * BATCH], arrays["labels"][:steps * BATCH]
        run = run_flaxconv if peer in FLAXCONV_PEERS else (
            run_keras if peer in KERAS_PEERS else run_torch)
        result = run(model_name, peer, x, y, steps, repeats)
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(python: str, model_name: str, peer: str, data_path: str, steps: int,
               repeats: int) -> dict:
    """Runs one (model, peer) measurement in a fresh process; its RESULT, or its error."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    if peer in KERAS_PEERS:
        env["KERAS_BACKEND"] = KERAS_PEERS[peer]
    cmd = [python, os.path.abspath(__file__), "--worker", model_name, "--peers", peer,
           "--data", data_path, "--steps", str(steps), "--repeats", str(repeats)]
    return run_worker_process(cmd, env)


# --- the table ----------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    model: str
    peer: str
    ms_per_step: float | None = None
    warmup_s: float | None = None
    formulations: str = ""
    note: str = ""  # an error or a skip
    raw: dict = dataclasses.field(default_factory=dict)


def to_row(model_name: str, peer: str, result: dict, steps: int) -> Row:
    if "error" in result or "skipped" in result:
        return Row(model_name, peer, note=result.get("error") or result["skipped"], raw=result)
    seconds = result["epoch_seconds"]
    formulations = result.get("formulations", "")
    return Row(model_name, peer, ms_per_step=1000 * min(seconds[1:]) / steps,
               warmup_s=seconds[0], formulations=formulations, raw=result)


def reference_peer(rows: list[Row]) -> str:
    """The Keras row the ratios divide by: Keras-TF's where any ran, else Keras-JAX's."""
    return "keras-tf" if any(r.peer == "keras-tf" and r.ms_per_step for r in rows) else "keras-jax"


def table(rows: list[Row]) -> str:
    reference = reference_peer(rows)
    keras = {r.model: r.ms_per_step for r in rows if r.peer == reference and r.ms_per_step}
    name = {"keras-tf": "Keras-TF", "keras-jax": "Keras-JAX"}[reference]
    lines = [f"| model | peer | ms/step | x {name} | warm-up epoch s | formulations |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r.ms_per_step is None:
            lines.append(f"| {r.model} | {r.peer} | - | - | - | {r.note[:120]} |")
            continue
        ratio = f"{r.ms_per_step / keras[r.model]:.2f}x" if r.model in keras else "n/a"
        lines.append(f"| {r.model} | {r.peer} | {r.ms_per_step:.2f} | {ratio} | "
                     f"{r.warmup_s:.1f} | {r.formulations} |")
    return "\n".join(lines)


def versions(python: str) -> dict[str, str]:
    """Python and package versions of the interpreter ``python`` (read from its metadata,
    nothing imported)."""
    code = ("import importlib.metadata as m, json, platform\n"
            "v = {'python': platform.python_version()}\n"
            "for p in ('jax', 'jaxlib', 'flax', 'optax', 'keras', 'tensorflow', "
            "'tensorflow-cpu', 'torch', 'jax-cuda12-plugin', 'jax-cuda13-plugin'):\n"
            "    try: v[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(v))")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr[-200:]}


def machine_info(flaxconv_python: str) -> dict:
    info = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.node()}, {platform.processor() or platform.machine()}",
            "cpus": os.cpu_count(), "peers_python": versions(sys.executable)}
    if os.path.realpath(flaxconv_python) != os.path.realpath(sys.executable):
        info["flaxconv_python"] = versions(flaxconv_python)
    return info


def describe(info: dict) -> str:
    def one(v):
        return ", ".join(f"{k} {val}" for k, val in v.items())

    text = (f"{info['date']}; {info['machine']}, {info['cpus']} CPUs; "
            f"{one(info['peers_python'])}")
    if info.get("devices"):
        text += f"; devices: {', '.join(info['devices'])}"
    if "flaxconv_python" in info:
        text += f"; flaxconv rows: {one(info['flaxconv_python'])}"
    if info.get("matmul_gflops"):
        low, high = info["matmul_gflops"]
        text += (f"; jitted 2048x2048 float32 matmul after each flaxconv row: "
                 f"{low}-{high} GFLOP/s")
    return text


def print_table(lines: list[str], out: str | None) -> None:
    """Prints ``lines`` (a command line, a machine line, a Markdown table) and, with ``out``,
    writes them to ``out.md`` too."""
    text = "\n".join(lines)
    print(text)
    if out:
        with open(f"{out}.md", "w") as f:
            f.write(text + "\n")


def split_list(text: str, valid: tuple[str, ...], what: str, parser) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(items) - set(valid))
    if unknown:
        parser.error(f"unknown {what} {unknown}; expected some of {list(valid)}")
    return items


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=", ".join(MODELS))
    parser.add_argument("--peers", default=",".join(DEFAULT_PEERS),
                        help=", ".join(PEERS) + f" (default: {', '.join(DEFAULT_PEERS)})")
    parser.add_argument("--steps", type=int, default=100,
                        help="steps per epoch: one warm-up epoch, then --repeats timed ones")
    parser.add_argument("--xla-steps", type=int, default=10,
                        help="steps per epoch of the flaxconv-xla rows (at most --steps)")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs (the best counts)")
    parser.add_argument("--out", help="also write PATH.md and PATH.json, e.g. "
                                      "benchmarks/results/zoo_cpu")
    parser.add_argument("--flaxconv-python", default=sys.executable,
                        help="interpreter of the flaxconv workers (default: this one)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.steps, args.xla_steps, args.repeats) < 1:
        parser.error("--steps, --xla-steps and --repeats must be >= 1")
    models = split_list(args.models, MODELS, "models", parser)
    peers = split_list(args.peers, PEERS, "peers", parser)
    if args.worker:
        return worker(args.worker, peers[0], args.data, args.steps, args.repeats)

    info = machine_info(args.flaxconv_python)
    print(f"zoo: {len(models)} models x {len(peers)} peers, batch {BATCH}, rmsprop {LR:g}, "
          f"{args.steps} steps per epoch ({min(args.steps, args.xla_steps)} for flaxconv-xla), "
          f"best of {args.repeats} timed epochs after a warm-up one\n{describe(info)}",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in models:
            try:
                images, labels = make_data(model_name, args.steps * BATCH)
            except RuntimeError as error:  # flaxconv.data.DatasetUnavailableError
                sys.exit(f"zoo.py: {error}")
            data_path = os.path.join(tmp, f"{model_name}.npz")
            np.savez(data_path, images=images, labels=labels)
            for peer in peers:
                python = args.flaxconv_python if peer in FLAXCONV_PEERS else sys.executable
                steps = min(args.steps, args.xla_steps) if peer == "flaxconv-xla" else args.steps
                start = time.perf_counter()
                result = run_worker(python, model_name, peer, data_path, steps, args.repeats)
                result["wall_s"] = time.perf_counter() - start
                row = to_row(model_name, peer, result, steps)
                rows.append(row)
                done = (f"{row.ms_per_step:.2f} ms/step" if row.ms_per_step is not None
                        else ("skipped: " if "skipped" in result else "failed: ") + row.note)
                print(f"{model_name} / {peer}: {done} ({result['wall_s']:.0f} s)", flush=True)
                for warning in result.get("warnings", []):
                    print(f"  warning: {warning}", flush=True)
    info["devices"] = sorted({r.raw["device"] for r in rows if r.raw.get("device")})
    peaks = [r.raw["matmul_gflops"] for r in rows if "matmul_gflops" in r.raw]
    if peaks:
        info["matmul_gflops"] = [round(min(peaks)), round(max(peaks))]
    out = table(rows)
    print("\n" + describe(info) + "\n\n" + out)
    if args.out:
        command = "python " + shlex.join(["benchmarks/zoo.py", *(
            sys.argv[1:] if argv is None else argv)])
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".md", "w") as f:
            f.write(f"`{command}`\n\n{describe(info)}\n\n{out}\n")
        with open(args.out + ".json", "w") as f:
            json.dump({"command": command, "info": info, "steps": args.steps,
                       "xla_steps": args.xla_steps, "repeats": args.repeats, "batch_size": BATCH,
                       "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
        print(f"wrote {args.out}.md and .json")


if __name__ == "__main__":
    main()
