"""Sign Language MNIST (24 letters) from an image folder: augmentation, dropout, EarlyStopping
on val_loss and best-only checkpoints; >= 97% accuracy on the 7,172 test images.

    python experiments/sign_language_cnn.py [--epochs 30] [--input stream] [--workdir runs/x]

Reads <folder>/Train/<letter>/*.png and <folder>/Test/<letter>/*.png, writing them first from
the CSVs in $FLAXCONV_DATA_DIR/sign_language_mnist/ when <folder> does not exist or is empty
(as experiments/make_sign_language_folder.py does); a folder holding anything else without
both Train/ and Test/ is refused and left as it is. Test takes Train's classes (a Test class
that Train lacks is an error). A seeded 10% of Train is the validation set that
EarlyStopping and ModelCheckpoint watch; Test is used once, for the final number.
--input arrays trains device-resident (the folder is 21 MB as uint8); --input stream reads
the files through the tf.data pipeline every epoch. Running the same command again resumes.
"""

import os
import sys

from flaxconv import augment, data, models
from flaxconv.callbacks import EarlyStopping, ModelCheckpoint
from flaxconv.experiment import Datasets, cli, default_config, train_and_evaluate

INPUTS = ("arrays", "stream")


def get_config():
    return default_config(
        dataset="sign_language_mnist", model="sign_language_cnn", workdir="runs/sign_language_cnn",
        optimizer="adam", epochs=30, validation_split=0.1,
        folder="runs/sign_language_mnist", input="arrays", dropout_rate=0.5,
        # Milder than the seed notebook's rotation of 0.2 turn (±72°), which costs accuracy.
        rotation=0.05, translation=0.1, zoom=0.1,
        patience=5,
    )


def run(config):
    if config.input not in INPUTS:
        raise ValueError(f"--input {config.input!r}; expected one of {list(INPUTS)}")
    root = data.sign_language_folder(config.folder)
    read = dict(image_size=(28, 28), color_mode="grayscale", batch_size=config.batch_size)
    train, validation = data.image_folder(
        root / "Train", seed=config.seed, validation_split=config.validation_split,
        subset="both", **read,
    )
    # Train's class names fix the labels' meaning, even if Test lacks a class.
    test = data.image_folder(root / "Test", shuffle=False, class_names=train.class_names, **read)
    datasets = Datasets(
        train=train if config.input == "stream" else train.arrays(),
        test=test.arrays(),
        num_classes=len(train.class_names),
        validation=validation.arrays(),
        class_names=train.class_names,
    )
    model = models.get(
        config.model,
        num_classes=len(train.class_names),
        dropout_rate=config.dropout_rate,
        dtype=config.dtype,
        augment=augment.keras_like(
            rotation=config.rotation, translation=config.translation, zoom=config.zoom
        ),
    )
    callbacks = (
        EarlyStopping(monitor="val_loss", patience=config.patience, mode="min",
                      restore_best_weights=True, verbose=1),
        ModelCheckpoint(os.path.join(config.workdir, "best"), monitor="val_loss",
                        save_best_only=True, mode="min"),
    )
    return train_and_evaluate(config, datasets=datasets, model=model, callbacks=callbacks)


if __name__ == "__main__":
    sys.exit(cli(get_config(), __doc__, run=run))
