"""A saved model: a trained model's arrays and what rebuilds its architecture, loaded with
no template and no training code.

>>> fc.save_model(state, "runs/x/saved_model", class_names=("cat", "dog"))
>>> state = fc.load_model("runs/x/saved_model")          # in any process, no template
>>> logits = fc.predict(state, images)

A saved model is a directory::

    saved_model/
      model.json              # the architecture, input, class names, step, array index
      variables-<sha256[:16]>/  # params and batch_stats as an Orbax checkpoint of arrays

``model.json`` is plain JSON; the arrays are plain numpy arrays in an Orbax (OCDBT)
checkpoint. Nothing executable is stored or loaded (no pickle): the architecture is a
recipe (a preset's name and options, a linen module's class and fields, or an NNX module's
class and ``init_kwargs``) that :func:`load_model` follows with the code installed where
it loads; :mod:`flaxconv.architecture` records and rebuilds it, and its names
(:func:`architecture`, :func:`rebuild`, :func:`encode`, :func:`decode`, the errors) are
re-exported here.

Both :func:`save_model` and :func:`load_model` check the arrays against the architecture
(every path and shape), so a saved model that another version of the code no longer fits
is refused naming the layer and both shapes, and a SHA-256 of the arrays, kept in
``model.json``, is checked on every load: a corrupt file is named, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from flaxconv import metrics
from flaxconv.architecture import (  # noqa: F401 - encode, decode: re-exported
    CorruptSavedModelError,
    SavedModelError,
    _check_same,
    _model_name,
    _one_line,
    architecture,
    decode,
    encode,
    rebuild,
)
from flaxconv.kernels import policy_name
from flaxconv.state import TrainState
from flaxconv.workdir import write_json

#: ``model.json``'s ``format`` and the ``version`` this code writes and reads.
FORMAT = "flaxconv.saved_model"
VERSION = 1
MODEL_JSON = "model.json"
_VARIABLES = "variables-"
#: The image dtypes a saved model records (``input_dtype``).
INPUT_DTYPES = ("uint8", "float32")

__all__ = [
    "FORMAT",
    "INPUT_DTYPES",
    "MODEL_JSON",
    "NO_OPTIMIZER",
    "VERSION",
    "CorruptSavedModelError",
    "SavedModelError",
    "architecture",
    "load_model",
    "model_info",
    "save_model",
]


def _no_optimizer_update(updates, state, params=None):
    raise ValueError(
        "this state has no optimizer: it came from fc.load_model without tx; load it with "
        "fc.load_model(path, tx=...) (e.g. tx=fc.optim.make('adam')) to train it further"
    )


#: The ``tx`` of a state loaded without one: ``init`` gives ``optax.EmptyState()``, and
#: ``update`` (any training step) raises a ValueError saying how to give it an optimizer,
#: so a loaded model is never trained silently by a do-nothing optimizer.
NO_OPTIMIZER = optax.GradientTransformation(lambda params: optax.EmptyState(),
                                            _no_optimizer_update)


# --- Arrays -------------------------------------------------------------------------------


def _entries(variables: dict[str, Any]) -> list[tuple[tuple[Any, ...], Any]]:
    """``[(path, leaf)]`` of a variables tree, in tree order; a path is a tuple of the
    dict keys (str, or int for NNX list items) from the collection down."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        if not all(isinstance(k, str | int) for k in keys):
            raise SavedModelError(f"variable path {keys} has keys that are neither str nor int")
        out.append((keys, leaf))
    return out


def _name(path: tuple[Any, ...]) -> str:
    return "/".join(map(str, path))


def _differences(a: dict[tuple, tuple], b: dict[tuple, tuple], a_name: str, b_name: str
                 ) -> list[str]:
    """One phrase per variable path whose shape differs between ``a`` and ``b`` (path ->
    shape), or that only one of them has, naming both shapes; sorted by path."""
    problems = []
    for path in sorted(a.keys() | b.keys(), key=_name):
        x, y = a.get(path), b.get(path)
        if x == y:
            continue
        if x is None:
            problems.append(f"{_name(path)} {y} is in {b_name} but not in {a_name}")
        elif y is None:
            problems.append(f"{_name(path)} {x} is in {a_name} but not in {b_name}")
        else:
            problems.append(f"{_name(path)} has shape {x} in {a_name} but {y} in {b_name}")
    return problems


def _digest(index: list[dict[str, Any]], arrays: list[np.ndarray]) -> str:
    """SHA-256 over each array's path, dtype, shape and bytes, in ``index`` order."""
    h = hashlib.sha256()
    for entry, array in zip(index, arrays, strict=True):
        value = np.ascontiguousarray(array)
        h.update(f"{json.dumps(entry['path'])}:{value.dtype.name}{value.shape}".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def _host(leaf: Any, name: str) -> np.ndarray:
    if isinstance(leaf, jax.Array) and not (leaf.is_fully_addressable
                                            or leaf.is_fully_replicated):
        raise SavedModelError(
            f"variable {name} is sharded over several hosts; save a replicated state "
            "(as data-parallel training keeps it)"
        )
    return np.asarray(jax.device_get(leaf))


# --- save / load --------------------------------------------------------------------------


def save_model(
    state: TrainState,
    path: str | os.PathLike,
    *,
    class_names: Any = None,
    input_dtype: str = "uint8",
    init_kwargs: dict[str, Any] | None = None,
) -> str:
    """Writes ``state``'s model as a saved model directory at ``path`` (see the module doc):
    its params and batch_stats (no optimizer state), the recipe that rebuilds its
    architecture, the input it takes, and ``class_names``.

    Every process of a multi-host run calls it (Orbax writes the arrays collectively);
    process 0 writes ``model.json``. ``path`` is replaced atomically: a run killed while
    saving leaves the earlier saved model (or none), never half of one.

    Args:
      state: a train state (``fc.create_train_state``, ``fc.fit``, ``fc.load_model``); one
        model, not a population (``fc.select_member`` picks one).
      path: a directory: new, or an earlier saved model (replaced).
      class_names: one name per class, recorded for ``python -m flaxconv.predict``.
      input_dtype: the dtype of the images the model was trained on, recorded:
        ``"uint8"`` (0..255, scaled to [0, 1] by the steps) or ``"float32"`` ([0, 1]).
      init_kwargs: NNX modules only: the keyword arguments (besides ``rngs``) their
        class was constructed with; checked to rebuild the same module.

    Returns:
      ``path`` as a str.

    Raises:
      SavedModelError: an architecture that cannot be recorded or rebuilt (a class inside a
        function, a field with no JSON form, NNX ``init_kwargs`` that build another
        module), variables that do not fit the model (a population), or ``class_names``
        of the wrong length; ``path`` a file or a directory that is not a saved model.
      ValueError: ``input_dtype`` not one of :data:`INPUT_DTYPES`.
    """
    path = os.fspath(path)
    if input_dtype not in INPUT_DTYPES:
        raise ValueError(f"input_dtype={input_dtype!r}; expected one of {INPUT_DTYPES}")
    if os.path.exists(path) and not (
        os.path.isdir(path)
        and (not os.listdir(path) or os.path.exists(os.path.join(path, MODEL_JSON)))
    ):
        raise SavedModelError(
            f"{path} exists and is not a saved model (no {MODEL_JSON}); expected a new "
            "directory or an earlier saved model to replace"
        )
    input_shape = tuple(int(d) for d in state.input_shape)
    arch = architecture(state.model, init_kwargs)
    model, abstract = rebuild(arch, input_shape)
    variables = {"params": state.params, "batch_stats": state.batch_stats or {}}
    entries = _entries(variables)
    shapes = {p: tuple(np.shape(x)) for p, x in entries}
    built = {p: tuple(x.shape) for p, x in _entries(abstract)}
    problems = _differences(shapes, built, "the state", "the rebuilt model")
    population = bool(problems) and shapes.keys() == built.keys() and all(
        shapes[p][1:] == built[p] for p in shapes)
    _check_same(state.model, model, arch, problems, population)
    arrays = [_host(leaf, _name(p)) for p, leaf in entries]
    index = [{"path": list(p), "shape": list(a.shape), "dtype": a.dtype.name}
             for (p, _), a in zip(entries, arrays, strict=True)]
    num_classes = metrics.model_classes(state)
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if len(class_names) != num_classes:
            raise SavedModelError(
                f"{len(class_names)} class_names for a model with {num_classes} classes; "
                "expected one name per class"
            )
    digest = _digest(index, arrays)
    folder = f"{_VARIABLES}{digest[:16]}"
    from flaxconv import __version__  # not at the top: the package imports this module

    meta = {
        "format": FORMAT,
        "version": VERSION,
        "flaxconv_version": __version__,
        "architecture": arch,
        "input": {"shape": list(input_shape), "dtype": input_dtype},
        "num_classes": num_classes,
        "class_names": class_names,
        "step": int(jax.device_get(state.step)),
        "rng": [int(v) for v in np.asarray(jax.device_get(state.rng)).reshape(-1)],
        "variables": {"folder": folder, "sha256": digest, "arrays": index},
    }
    os.makedirs(path, exist_ok=True)
    # Orbax writes the arrays to a temporary folder and renames it when complete; then
    # model.json (which names that folder) is replaced atomically, then older folders go.
    ocp.PyTreeCheckpointer().save(
        os.path.join(os.path.abspath(path), folder),
        {str(i): a for i, a in enumerate(arrays)}, force=True,
    )
    write_json(os.path.join(path, MODEL_JSON), meta)
    if jax.process_index() == 0:
        for name in os.listdir(path):
            if name.startswith(_VARIABLES) and name != folder:
                shutil.rmtree(os.path.join(path, name), ignore_errors=True)
    return path


def model_info(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``model.json`` of the saved model at ``path``: ``architecture``,
    ``input`` (``{"shape": [H, W, C], "dtype": ...}``), ``num_classes``, ``class_names``
    (a list, or None), ``step``, ``flaxconv_version``, ``variables`` (the array index).

    Raises:
      FileNotFoundError: no saved model there.
      CorruptSavedModelError: ``model.json`` does not parse or lacks a key, naming it.
      SavedModelError: another format version.
    """
    path = os.fspath(path)
    file = os.path.join(path, MODEL_JSON)
    if not os.path.isfile(file):
        what = "does not exist" if not os.path.exists(path) else f"has no {MODEL_JSON}"
        raise FileNotFoundError(f"no saved model at {path}: it {what}; expected a directory "
                                "written by fc.save_model")
    try:
        with open(file, encoding="utf-8") as f:
            meta = json.load(f)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        version = meta.get("version")
        if version != VERSION:
            raise SavedModelError(f"{file} has format version {version}; this flaxconv "
                                  f"reads version {VERSION}")
        for key in ("architecture", "input", "num_classes", "step", "rng", "variables"):
            if key not in meta:
                raise ValueError(f"no {key!r}")
        meta.setdefault("class_names", None)
        shape = tuple(int(d) for d in meta["input"]["shape"])
        if len(shape) != 3:
            raise ValueError(f"input shape {shape}; expected [H, W, C]")
        meta["input"]["shape"] = shape
        for key in ("folder", "sha256", "arrays"):
            meta["variables"][key]  # noqa: B018 - a KeyError reports the missing key
    except SavedModelError:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise CorruptSavedModelError(
            f"saved model file {file} is corrupt ({type(error).__name__}: {reason})"
        ) from None
    return meta


def load_model(
    path: str | os.PathLike,
    *,
    tx: optax.GradientTransformation | None = None,
    kernels: str | None = None,
) -> TrainState:
    """The saved model at ``path`` as a :class:`~flaxconv.state.TrainState`, with no
    template: the architecture is rebuilt from its recipe with the code installed here,
    the arrays are read and checked, and nothing executable is loaded.

    The state works with ``fc.predict``, ``fc.eval_step``, ``fc.metrics.evaluate``,
    ``fc.summary`` and ``fc.viz``; its ``step`` and ``rng`` are the saved state's.

    Args:
      path: a directory written by :func:`save_model`.
      tx: an Optax optimizer to train it further (fine-tuning): its fresh state becomes
        ``opt_state``. Without it the state has :data:`NO_OPTIMIZER`, whose training step
        raises a ValueError saying so.
      kernels: the state's :attr:`~flaxconv.state.TrainState.kernels`; None reads
        ``FLAXCONV_KERNELS`` (default ``"auto"``), as ``fc.create_train_state`` does.

    Raises:
      FileNotFoundError: no saved model at ``path``.
      CorruptSavedModelError: ``model.json`` or the arrays do not parse, do not restore or
        fail their checksum: one line naming the file or folder.
      SavedModelError: the model's class does not import (naming it); the arrays do not fit
        the model this code builds (naming the first layer that differs and both shapes).
    """
    path = os.fspath(path)
    meta = model_info(path)
    kernels = policy_name(kernels)
    input_shape = meta["input"]["shape"]
    index = meta["variables"]["arrays"]
    model, abstract = rebuild(meta["architecture"], input_shape)
    paths = [tuple(entry["path"]) for entry in index]
    problems = _differences({p: tuple(e["shape"]) for p, e in zip(paths, index, strict=True)},
                            {p: tuple(x.shape) for p, x in _entries(abstract)},
                            "the saved model", "the model this code builds")
    if problems:
        raise SavedModelError(f"saved model {path} does not fit {_model_name(model)} as "
                              f"this code builds it: {_one_line(problems)}")
    loaded = dict(zip(paths, _read_arrays(path, meta), strict=True))
    # The rebuilt abstract tree gives the structure (dict nesting, NNX's int keys, empty
    # collections); every leaf is there by the comparison above.
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    leaves = [jnp.asarray(loaded[tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p)])
              for p, _ in flat]
    variables = jax.tree_util.tree_unflatten(treedef, leaves)
    tx = NO_OPTIMIZER if tx is None else tx
    return TrainState(
        step=jnp.asarray(meta["step"], jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        rng=jnp.asarray(meta["rng"], jnp.uint32),
        model=model,
        tx=tx,
        input_shape=input_shape,
        kernels=kernels,
    )


def _read_arrays(path: str, meta: dict[str, Any]) -> list[np.ndarray]:
    """The saved arrays, in index order, checked against the checksum.

    Raises:
      CorruptSavedModelError: naming the arrays folder, when it does not restore or does
        not match the checksum.
    """
    variables = meta["variables"]
    folder = os.path.join(os.path.abspath(path), os.path.basename(variables["folder"]))
    index = variables["arrays"]
    targets = {str(i): np.empty(e["shape"], jnp.dtype(e["dtype"])) for i, e in enumerate(index)}
    try:
        if not os.path.isdir(folder):
            raise FileNotFoundError("no such folder")
        restored = ocp.PyTreeCheckpointer().restore(
            folder, item=targets,
            restore_args=ocp.checkpoint_utils.construct_restore_args(targets),
        )
        arrays = [np.asarray(restored[str(i)]) for i in range(len(index))]
    except Exception as error:  # noqa: BLE001 - any failure to restore means "corrupt"
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise CorruptSavedModelError(
            f"saved model arrays {folder} cannot be read ({type(error).__name__}: {reason})"
        ) from None
    if _digest(index, arrays) != variables["sha256"]:
        raise CorruptSavedModelError(
            f"saved model arrays {folder} do not match the checksum in "
            f"{os.path.join(path, MODEL_JSON)}"
        )
    return arrays
