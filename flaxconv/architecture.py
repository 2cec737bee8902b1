"""The architecture of a saved model (:mod:`flaxconv.saved_model`): a JSON recipe that
rebuilds a state's ``model`` with the code installed where it loads, one of

* ``{"kind": "preset", "name": ..., "options": {...}}``: ``fc.models.get(name, **options)``;
* ``{"kind": "linen", "class": "package.module:Class", "fields": {...}}``: a user's linen
  module, rebuilt as ``Class(**fields)``. Field values are JSON values, tuples, dicts,
  dtypes, other linen modules (encoded the same way, e.g. a preset's augmentation layers)
  and importable classes or functions (by ``module:qualname``); anything else is refused
  when saving, naming the field;
* ``{"kind": "nnx", "class": ..., "init_kwargs": {...}}``: an NNX module, rebuilt as
  ``Class(**init_kwargs, rngs=nnx.Rngs(0))`` (abstractly: no initializer runs). NNX
  modules do not record their constructor arguments, so
  :func:`~flaxconv.saved_model.save_model` takes them (``init_kwargs``; default none, i.e.
  the constructor's defaults) and checks that they rebuild the state's module: the same
  submodules and static attributes.

Loading imports the modules that define these classes (as ``import`` would) and nothing
else. A class defined in ``__main__`` (a notebook, a script) is saved with a warning: it
loads only where ``__main__`` defines it again.

:func:`architecture` records a model, :func:`rebuild` builds it back with abstract
variables (``jax.eval_shape``: no initializer runs, nothing is jitted), :func:`encode` and
:func:`decode` are the JSON form of field values, and :func:`_check_same` refuses a recipe
that rebuilds another module than the state's. Nothing executable is stored (no pickle).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import FrozenDict

from flaxconv import models
from flaxconv.nnx_model import NNXModel, split_nnx


class SavedModelError(ValueError):
    """A model that cannot be saved or loaded: an architecture with no JSON form, a class
    that does not import, arrays that do not fit the model the code builds."""


class CorruptSavedModelError(SavedModelError):
    """A saved model whose files do not parse, do not restore, or fail their checksum."""


# --- Values as JSON -----------------------------------------------------------------------


def _ref(obj: Any, where: str) -> str:
    """``"module:qualname"`` of an importable class or function.

    Raises:
      SavedModelError: it is defined inside a function (no import finds it), or the name
        does not lead back to it.
    """
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or "<locals>" in qualname or "<lambda>" in qualname:
        raise SavedModelError(
            f"cannot save the model: {where} is {qualname or repr(obj)}, defined inside a "
            f"function or unnamed; expected a class or function defined at module level, "
            f"which load_model can import"
        )
    ref = f"{module}:{qualname}"
    try:
        found = _import(ref, where)
    except SavedModelError:
        found = None
    if found is not obj:
        raise SavedModelError(
            f"cannot save the model: {where} is {obj!r}, but importing {ref} does not give "
            f"it back; expected a class or function defined at module level"
        )
    if module == "__main__":
        warnings.warn(
            f"the model's {where} {qualname} is defined in __main__: load_model can rebuild "
            f"it only in a program that defines {qualname} in __main__ too; define it in an "
            f"importable module to load it anywhere",
            UserWarning, stacklevel=4,
        )
    return ref


def _import(ref: str, what: str) -> Any:
    """The class or function ``ref`` (``"module:qualname"``) names.

    Raises:
      SavedModelError: naming ``ref``, when the module does not import, has no such
        attribute, or it is neither a class nor a function.
    """
    module_name, _, qualname = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except Exception as error:  # noqa: BLE001 - any failure to import is the one error
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise SavedModelError(
            f"cannot import the {what} {ref} ({type(error).__name__}: {reason}); install or "
            f"put on sys.path the code that defines it"
        ) from None
    if not callable(obj):
        raise SavedModelError(f"{ref} ({what}) is a {type(obj).__name__}; expected a class "
                              "or a function")
    return obj


def _is_dtype(value: Any) -> bool:
    if isinstance(value, np.dtype):
        return True
    if isinstance(value, type) and hasattr(value, "dtype"):  # np.float32, jnp.bfloat16
        with contextlib.suppress(TypeError):
            jnp.dtype(value)
            return True
    return False


def encode(value: Any, where: str) -> Any:
    """``value`` as JSON: ``None``/bool/int/float/str as they are, tuples and lists as
    lists, everything else as an object tagged ``"__type__"``: ``"dict"``/``"frozendict"``
    (string keys), ``"dtype"``, ``"linen"`` (a linen module: its class and fields) or
    ``"ref"`` (an importable class or function). :func:`decode` inverts it.

    Raises:
      SavedModelError: a value with no such form, naming ``where`` (e.g.
        ``"ConvStack.augment[0].factor"``) and its type.
    """
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic) and not isinstance(value, np.void):
        return value.item()
    if isinstance(value, tuple | list):
        return [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict | FrozenDict):
        if not all(isinstance(k, str) for k in value):
            raise SavedModelError(f"cannot save the model: {where} has non-string keys "
                                  f"{[k for k in value if not isinstance(k, str)][:3]}")
        kind = "frozendict" if isinstance(value, FrozenDict) else "dict"
        return {"__type__": kind,
                "items": {k: encode(v, f"{where}[{k!r}]") for k, v in value.items()}}
    if _is_dtype(value):
        return {"__type__": "dtype", "name": jnp.dtype(value).name}
    if isinstance(value, nn.Module):
        return {"__type__": "linen", **_linen_record(value, where)}
    if callable(value):  # a class, a function, jax.nn.relu (a custom_jvp), ...
        return {"__type__": "ref", "name": _ref(value, where)}
    raise SavedModelError(
        f"cannot save the model: {where} is a {type(value).__name__} ({value!r:.80}), which "
        f"has no JSON form; expected JSON values, tuples, dicts, dtypes, linen modules or "
        f"importable classes and functions"
    )


def decode(value: Any, where: str = "value") -> Any:
    """The value :func:`encode` wrote (lists come back as tuples, so modules stay hashable).

    Raises:
      SavedModelError: a class or function that does not import (naming it); an unknown
        tag.
    """
    if isinstance(value, list):
        return tuple(decode(v, where) for v in value)
    if not isinstance(value, dict):
        return value
    kind = value.get("__type__")
    if kind in ("dict", "frozendict"):
        items = {k: decode(v, where) for k, v in value["items"].items()}
        return FrozenDict(items) if kind == "frozendict" else items
    if kind == "dtype":
        return jnp.dtype(value["name"])
    if kind == "linen":
        return _build_linen(value)
    if kind == "ref":
        return _import(value["name"], f"object of {where}")
    raise CorruptSavedModelError(f"{where}: unknown encoded value {value!r:.100}")


def _linen_record(module: nn.Module, where: str) -> dict[str, Any]:
    """``{"class": ref, "fields": {...}}`` of a linen module (its init fields but
    ``parent``; ``name`` when set)."""
    cls = type(module)
    fields = {}
    for field in dataclasses.fields(module):
        if not field.init or field.name == "parent":
            continue
        value = getattr(module, field.name)
        if field.name == "name" and value is None:
            continue
        fields[field.name] = encode(value, f"{cls.__name__}.{field.name}")
    return {"class": _ref(cls, f"model class {where}"), "fields": fields}


def _build_linen(record: dict[str, Any]) -> nn.Module:
    cls = _import(record["class"], "model class")
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise SavedModelError(f"{record['class']} is not a flax.linen Module")
    fields = {k: decode(v, f"{cls.__name__}.{k}") for k, v in record["fields"].items()}
    return cls(**fields)


# --- The architecture ---------------------------------------------------------------------


def _preset_record(model: nn.Module) -> dict[str, Any] | None:
    """``{"kind": "preset", ...}`` when ``fc.models.get(name, **options)`` gives ``model``
    back (the preset with the fewest options), else None."""
    if type(model) is not models.ConvStack or model.name is not None:
        return None
    names = [f.name for f in dataclasses.fields(model) if f.init and f.name not in
             ("parent", "name", "num_classes")]
    best = None
    for name in models.names():
        base = models.get(name, num_classes=model.num_classes)
        options = {f: getattr(model, f) for f in names if getattr(model, f) != getattr(base, f)}
        if best is None or len(options) < len(best[1]):
            best = (name, options)
    name, options = best
    options = {"num_classes": model.num_classes, **options}
    if models.get(name, **options) != model:
        return None
    return {"kind": "preset", "name": name,
            "options": {k: encode(v, f"{name}.{k}") for k, v in options.items()}}


def architecture(model: nn.Module | NNXModel, init_kwargs: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """The JSON recipe that rebuilds ``model`` (a state's ``model``): see the module doc.

    ``init_kwargs`` (NNX only): the keyword arguments the module's class was constructed
    with, besides ``rngs``.

    Raises:
      SavedModelError: a class not importable, a field with no JSON form, or NNX
        ``init_kwargs`` that rebuild another module; naming what and why.
    """
    if isinstance(model, NNXModel):
        cls = model.module_type
        return {"kind": "nnx", "class": _ref(cls, "model class"),
                "init_kwargs": encode(dict(init_kwargs or {}), f"{cls.__name__} init_kwargs"),
                "frozen_batch_norm": list(model.frozen_batch_norm)}
    if init_kwargs is not None:
        raise SavedModelError(
            f"init_kwargs are for NNX modules; the model is a linen {type(model).__name__}, "
            "whose fields are recorded as they are"
        )
    if not isinstance(model, nn.Module):
        raise SavedModelError(f"state.model is a {type(model).__name__}; expected a linen "
                              "module or an NNX module's NNXModel")
    return _preset_record(model) or {"kind": "linen", **_linen_record(model, "model")}


def rebuild(arch: dict[str, Any], input_shape: tuple[int, ...]
            ) -> tuple[nn.Module | NNXModel, dict[str, Any]]:
    """``(model, abstract variables)`` from an :func:`architecture` record: the state's
    ``model`` and ``{"params": ..., "batch_stats": ...}`` of ``jax.ShapeDtypeStruct``s for
    inputs of shape ``[1, *input_shape]``. Abstract: no initializer runs.

    Raises:
      SavedModelError: a class that does not import (naming it), or that does not build.
    """
    kind = arch.get("kind")
    if kind not in ("preset", "linen", "nnx"):
        raise CorruptSavedModelError(f"unknown architecture kind {kind!r}; expected "
                                     "'preset', 'linen' or 'nnx'")
    what = arch["name"] if kind == "preset" else arch["class"]
    try:
        if kind == "nnx":
            return _rebuild_nnx(arch)
        if kind == "preset":
            options = {k: decode(v, f"{arch['name']}.{k}") for k, v in arch["options"].items()}
            model = models.get(arch["name"], **options)
        else:
            model = _build_linen(arch)
        x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)

        def init(x):
            key = jax.random.key(0)  # "dropout" too, for bridged NNX modules
            return model.init({"params": key, "dropout": key}, x, train=False)

        variables = jax.eval_shape(init, x)
    except SavedModelError:
        raise
    except Exception as error:  # noqa: BLE001 - the code that builds it has changed
        reason = (str(error).strip().splitlines() or [""])[0][:300]
        raise SavedModelError(
            f"cannot build the model {what} for {tuple(input_shape)} images with this code "
            f"({type(error).__name__}: {reason})"
        ) from error
    return model, {"params": variables["params"],
                   "batch_stats": variables.get("batch_stats", {})}


def _rebuild_nnx(arch: dict[str, Any]) -> tuple[NNXModel, dict[str, Any]]:
    cls = _import(arch["class"], "model class")
    if not (inspect.isclass(cls) and issubclass(cls, nnx.Module)):
        raise SavedModelError(f"{arch['class']} is not a flax.nnx Module")
    given = decode(arch["init_kwargs"], f"{cls.__name__} init_kwargs")
    # The class's own signature is NNX's metaclass (*args, **kwargs); __init__ has the names.
    takes_rngs = "rngs" in inspect.signature(cls.__init__).parameters
    built: dict[str, NNXModel] = {}

    def construct():
        # One stream, "default", which every stream name an NNX layer asks for falls back to.
        kwargs = {**given, "rngs": nnx.Rngs(0)} if takes_rngs else given
        model, params, batch_stats = split_nnx(cls(**kwargs))
        built["model"] = model  # static: taken out of the trace by the side door
        return {"params": params, "batch_stats": batch_stats}

    try:
        variables = jax.eval_shape(construct)
    except Exception as error:  # noqa: BLE001 - e.g. a keyword the class no longer takes
        reason = (str(error).strip().splitlines() or [""])[0][:300]
        raise SavedModelError(f"cannot construct {arch['class']} with init_kwargs={given} "
                              f"({type(error).__name__}: {reason})") from error
    model = built["model"].clone(frozen_batch_norm=tuple(arch.get("frozen_batch_norm", ())))
    return model, variables


def _check_same(model: Any, rebuilt: Any, arch: dict[str, Any], shape_problems: list[str],
                population: bool = False) -> None:
    """Raises a SavedModelError when ``rebuilt`` (from ``arch``) is not ``model``, or the
    state's variables do not fit it (``shape_problems``, from
    :func:`flaxconv.saved_model._differences`; ``population``: each has one leading axis
    more than the model's)."""
    if isinstance(model, NNXModel):
        # NNXModel's repr (classes and static attributes, no addresses) is the same in
        # every process: fit compares it to resume a workdir.
        if (shape_problems and not population) or repr(rebuilt) != repr(model):
            name = model.module_type.__qualname__
            why = shape_problems[0] if shape_problems else "other static attributes"
            raise SavedModelError(
                f"{name}(**init_kwargs, rngs=...) with init_kwargs="
                f"{decode(arch['init_kwargs'])} builds another module than the state's "
                f"({why}); pass save_model(..., init_kwargs={{...}}) with the keyword "
                f"arguments {name} was constructed with"
            )
    elif rebuilt != model:
        raise SavedModelError(
            f"rebuilding {type(model).__name__} from its recorded fields gives "
            f"{rebuilt!r:.200}, not the state's model"
        )
    if shape_problems:
        hint = ("; a population has a leading member axis: save one member, "
                "fc.select_member(state, i)") if population else ""
        raise SavedModelError(f"the state's variables do not fit its model "
                              f"{_model_name(model)}: {_one_line(shape_problems)}{hint}")


def _one_line(problems: list[str]) -> str:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{problems[0]}{more}"


def _model_name(model: Any) -> str:
    return model.module_type.__qualname__ if isinstance(model, NNXModel) else type(model).__name__
