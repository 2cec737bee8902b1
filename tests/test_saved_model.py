"""fc.save_model / fc.load_model: a preset, a user's linen module (with a nested module and a
function as fields) and an NNX module load in a fresh process with no template and work
with predict, eval_step, metrics.evaluate and viz; what cannot be rebuilt, does not fit or
is corrupt is refused in one line naming the class, the layer or the file."""

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from serving_models import CLASSES, IMAGES, LABELS, Block, BridgedSmall, Net, states, trained

import flaxconv as fc
from flaxconv.experiment import Datasets, default_config, train_and_evaluate
from flaxconv.saved_model import CorruptSavedModelError, SavedModelError

ROOT = Path(__file__).resolve().parents[1]
NAMES = [f"class {i}" for i in range(CLASSES)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``(folder, states)``: a preset, a user's linen module and an NNX module, each saved
    as ``folder/<kind>`` with :data:`NAMES`."""
    folder = tmp_path_factory.mktemp("saved")
    for kind, state in states().items():
        kwargs = {"init_kwargs": {"features": 6}} if kind == "nnx" else {}
        fc.save_model(state, folder / kind, class_names=NAMES, **kwargs)
    return folder, states()


LOAD = """
import json, sys
import numpy as np
import flaxconv as fc
root = sys.argv[1]
images, labels = np.load(f"{root}/images.npy"), np.load(f"{root}/labels.npy")
out = {}
for kind in ("preset", "linen", "nnx"):
    state = fc.load_model(f"{root}/{kind}")
    np.save(f"{root}/{kind}_logits.npy", np.asarray(fc.predict(state, images)))
    out[kind] = {"summary": fc.summary(state), "step": int(state.step),
                 "class_names": fc.saved_model.model_info(f"{root}/{kind}")["class_names"]}
    if kind == "linen":  # each consumer once: they take any state alike
        out[kind]["correct"] = float(fc.eval_step(state, {"image": images, "label": labels})
                                     ["correct"])
        numbers = fc.metrics.evaluate(state, images, labels, "accuracy,f1")
        out[kind]["evaluate"] = {k: numbers[k] for k in ("accuracy", "f1")}
        fc.viz.feature_maps(state, images[:2], f"{root}/maps.png")
print(json.dumps(out))
"""


def test_saved_models_load_in_a_fresh_process_and_work_with_every_consumer(saved):
    folder, states = saved
    arch = {kind: fc.saved_model.model_info(folder / kind)["architecture"] for kind in states}
    assert arch["preset"]["kind"] == "preset" and arch["preset"]["name"] == "dlwp_mnist"
    assert arch["linen"]["class"] == "serving_models:Net"
    assert arch["linen"]["fields"]["block"]["fields"]["activation"]["__type__"] == "ref"
    assert arch["nnx"] == {"kind": "nnx", "class": "serving_models:Small",
                           "init_kwargs": {"__type__": "dict", "items": {"features": 6}},
                           "frozen_batch_norm": []}
    np.save(folder / "images.npy", IMAGES)
    np.save(folder / "labels.npy", LABELS)
    # A fresh interpreter: no template, no state; load_model imports the classes itself.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    run = subprocess.run([sys.executable, "-c", LOAD, str(folder)], capture_output=True,
                         text=True, env=env, cwd=folder, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    for kind, state in states.items():
        np.testing.assert_allclose(np.load(folder / f"{kind}_logits.npy"),
                                   fc.predict(state, IMAGES), rtol=1e-6, atol=1e-6)
        assert loaded[kind]["summary"] == fc.summary(state)
        assert loaded[kind]["class_names"] == NAMES
        assert loaded[kind]["step"] == 3
    accuracy = np.mean(np.argmax(np.load(folder / "linen_logits.npy"), -1) == LABELS)
    assert loaded["linen"]["evaluate"]["accuracy"] == pytest.approx(accuracy)
    assert 0 <= loaded["linen"]["evaluate"]["f1"] <= 1
    assert loaded["linen"]["correct"] == pytest.approx(accuracy * len(LABELS))
    assert (folder / "maps.png").stat().st_size > 0


def test_no_optimizer_state_is_saved_and_a_loaded_model_trains_only_with_a_tx(tmp_path):
    state = trained(fc.models.get("dense", hidden=(), num_classes=CLASSES))
    fc.save_model(state, tmp_path / "m")
    info = fc.saved_model.model_info(tmp_path / "m")
    assert [e["path"] for e in info["variables"]["arrays"]] == [
        ["params", "head", "bias"], ["params", "head", "kernel"]]
    assert info["input"] == {"shape": (8, 8, 1), "dtype": "uint8"} and info["num_classes"] == 4
    loaded = fc.load_model(tmp_path / "m")
    batch = {"image": IMAGES[:16], "label": LABELS[:16]}
    with pytest.raises(ValueError, match=r"no optimizer.*fc.load_model\(path, tx=\.\.\.\)"):
        fc.train_step(loaded, batch)
    tuned = fc.load_model(tmp_path / "m", tx=optax.sgd(0.1))
    after, _ = fc.train_step(tuned, batch)
    assert int(after.step) == 4
    assert not np.allclose(after.params["head"]["kernel"], state.params["head"]["kernel"])
    # Saving again replaces the saved model; only the new arrays folder is left.
    fc.save_model(after, tmp_path / "m")
    assert fc.saved_model.model_info(tmp_path / "m")["step"] == 4
    assert len([p for p in os.listdir(tmp_path / "m") if p.startswith("variables-")]) == 1
    np.testing.assert_array_equal(fc.load_model(tmp_path / "m").params["head"]["kernel"],
                                  after.params["head"]["kernel"])


def test_a_bridged_nnx_module_round_trips(tmp_path):
    state = trained(nnx.bridge.to_linen(BridgedSmall, 5))
    fc.save_model(state, tmp_path / "m")
    fields = fc.saved_model.model_info(tmp_path / "m")["architecture"]["fields"]
    assert fields["nnx_class"] == {"__type__": "ref", "name": "serving_models:BridgedSmall"}
    np.testing.assert_array_equal(fc.predict(fc.load_model(tmp_path / "m"), IMAGES),
                                  fc.predict(state, IMAGES))


MODULE_V1 = """
import flax.linen as nn

class Model(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        x = nn.relu(nn.Conv({width}, (3, 3), name="conv")(x))
        return nn.Dense(4, name="head")(x.reshape(x.shape[0], -1))
"""


def _user_module(folder, name, width, monkeypatch):
    """Writes and imports ``name.py`` defining ``Model`` with a conv ``width`` wide."""
    (folder / f"{name}.py").write_text(MODULE_V1.format(width=width))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, name, raising=False)
    importlib.invalidate_caches()
    return importlib.import_module(name).Model


def test_a_class_that_does_not_import_is_named(tmp_path, monkeypatch):
    code = tmp_path / "code"
    code.mkdir()
    model = _user_module(code, "gone_model", 3, monkeypatch)
    fc.save_model(trained(model()), tmp_path / "m")
    (code / "gone_model.py").unlink()
    monkeypatch.delitem(sys.modules, "gone_model")
    with pytest.raises(SavedModelError, match=r"^cannot import the model class gone_model:"
                                              r"Model \(ModuleNotFoundError: [^\n]*\); install"):
        fc.load_model(tmp_path / "m")


def test_other_parameter_shapes_name_the_layer_and_both_shapes(tmp_path, monkeypatch):
    code = tmp_path / "code"
    code.mkdir()
    fc.save_model(trained(_user_module(code, "versioned_model", 3, monkeypatch)()),
                  tmp_path / "m")
    _user_module(code, "versioned_model", 5, monkeypatch)  # the code changed since
    with pytest.raises(SavedModelError) as error:
        fc.load_model(tmp_path / "m")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"saved model {tmp_path / 'm'} does not fit Model as this code "
                              "builds it: params/conv/bias has shape (3,) in the saved model "
                              "but (5,) in the model this code builds (and 2 more)")


def test_a_corrupt_saved_model_is_named_in_one_line(saved, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(saved[0] / "preset", path)
    folder = next(p for p in path.iterdir() if p.name.startswith("variables-"))
    # Arrays that read back but are not the saved ones (another save's, same shapes).
    state = saved[1]["preset"]
    moved = jax.tree.map(lambda x: np.asarray(x) + 1, state.params)
    other = Path(fc.save_model(state.replace(params=moved), tmp_path / "other"))
    shutil.rmtree(folder)
    shutil.copytree(next(other.glob("variables-*")), folder)
    with pytest.raises(CorruptSavedModelError, match=rf"^saved model arrays {folder} do not "
                                                     rf"match the checksum in {path}/model.json$"):
        fc.load_model(path)
    # One flipped bit in an array data file (Orbax's OCDBT "d/" files): unreadable, or not
    # the saved values; either way the folder is named.
    shutil.rmtree(folder)
    shutil.copytree(saved[0] / "preset" / folder.name, folder)
    data = max((p for p in folder.rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptSavedModelError, match=rf"^saved model arrays {folder} (do not "
                       r"match the checksum|cannot be read \(.+\))"):
        fc.load_model(path)
    shutil.rmtree(folder)
    with pytest.raises(CorruptSavedModelError, match=rf"^saved model arrays {folder} cannot "
                       r"be read \(FileNotFoundError: no such folder\)$"):
        fc.load_model(path)
    model_json = path / "model.json"
    model_json.write_text(model_json.read_text()[:200])
    with pytest.raises(CorruptSavedModelError,
                       match=rf"^saved model file {model_json} is corrupt \(JSONDecodeError: "):
        fc.load_model(path)
    with pytest.raises(FileNotFoundError, match=r"no saved model at .*nowhere: it does not exist"):
        fc.load_model(tmp_path / "nowhere")


def test_save_refuses_what_load_could_not_rebuild(saved, tmp_path):
    class Local(nn.Module):
        @nn.compact
        def __call__(self, x, *, train):
            return nn.Dense(4)(x.reshape(x.shape[0], -1))

    with pytest.raises(SavedModelError, match=r"model class model is test_a?\w*\.<locals>"
                                              r"\.Local, defined inside a function"):
        fc.save_model(saved[1]["linen"].replace(model=Local()), tmp_path / "a")
    with pytest.raises(SavedModelError, match=r"Block\.activation is test_\w+\.<locals>\."
                                              r"<lambda>, defined inside a function"):
        fc.save_model(saved[1]["linen"].replace(model=Net(Block(6, activation=lambda x: x))),
                      tmp_path / "b")
    nnx_state = saved[1]["nnx"]
    with pytest.raises(SavedModelError, match=r"Small\(\*\*init_kwargs, rngs=\.\.\.\) with "
                       r"init_kwargs=\{\} builds another module than the state's \(.*\(6,\) in "
                       r"the state but \(4,\) in the rebuilt model.*\); pass save_model"):
        fc.save_model(nnx_state, tmp_path / "c")
    with pytest.raises(SavedModelError, match=r"3 class_names for a model with 4 classes"):
        fc.save_model(nnx_state, tmp_path / "d", class_names="abc",
                      init_kwargs={"features": 6})
    linen = saved[1]["linen"]
    population = linen.replace(**{c: jax.tree.map(lambda x: np.stack([x, x]), getattr(linen, c))
                                  for c in ("params", "batch_stats")})
    with pytest.raises(SavedModelError, match=r"the state's variables do not fit its model Net: "
                       r"batch_stats/block/BatchNorm_0/mean has shape \(2, 6\) in the state but "
                       r"\(6,\) in the rebuilt model \(and \d+ more\); a population .*"
                       r"fc.select_member"):
        fc.save_model(population, tmp_path / "p")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "notes.txt").write_text("mine")
    with pytest.raises(SavedModelError, match=r"e exists and is not a saved model"):
        fc.save_model(nnx_state, tmp_path / "e", init_kwargs={"features": 6})
    assert not any((tmp_path / n).exists() for n in "abcdp")


def test_the_experiment_writes_a_saved_model_and_an_export(tmp_path):
    config = ml_collections.ConfigDict({
        **default_config().to_dict(), "epochs": 1, "batch_size": 16, "verbose": "silent",
        "metrics": "accuracy", "feature_maps": 0, "workdir": str(tmp_path / "run"),
    })
    names = ("up", "down", "left", "right")
    datasets = Datasets((IMAGES, LABELS), (IMAGES[:20], LABELS[:20]), CLASSES,
                        class_names=names)
    train_and_evaluate(config, datasets=datasets,
                       model=fc.models.get("dense", hidden=(8,), num_classes=CLASSES))
    loaded = fc.load_model(tmp_path / "run" / "saved_model")
    assert fc.saved_model.model_info(tmp_path / "run" / "saved_model")["class_names"] == list(
        names)
    with open(tmp_path / "run" / "model.exported", "rb") as f:
        served = jax.export.deserialize(f.read())
    assert served.platforms == ("cpu", "cuda", "tpu")
    np.testing.assert_allclose(served.call(IMAGES[:5]), fc.predict(loaded, IMAGES[:5]),
                               rtol=1e-5, atol=1e-5)
