"""Writes Sign Language MNIST as an image folder: <out>/Train/<letter>/<row>.png and
<out>/Test/<letter>/<row>.png (24 letters A-Y without J; <row> the 1-based CSV row), the
layout the seed notebook reads with image_dataset_from_directory.

    python experiments/make_sign_language_folder.py [--out runs/sign_language_mnist]

Reads $FLAXCONV_DATA_DIR/sign_language_mnist/sign_mnist_{train,test}.csv.gz (or --data-dir).
A split already written is kept, so running it again is cheap. Every CSV needed is read and
checked before anything is written, and a split is written under a temporary name renamed at
the end, so a bad CSV or an interrupted run leaves no partial or empty folder.
"""

import argparse
import sys

from flaxconv import data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/sign_language_mnist", help="the folder to write")
    parser.add_argument("--data-dir", default=None,
                        help=f"folder holding sign_language_mnist/ (default ${data.DATA_DIR_ENV})")
    args = parser.parse_args(argv)
    try:
        # --out is the folder the user asks us to write in: complete it if it exists.
        root = data.sign_language_folder(args.out, args.data_dir, complete_existing=True)
        for split in ("Train", "Test"):
            folder = data.image_folder(root / split, image_size=(28, 28), color_mode="grayscale")
            print(f"{root / split}: {folder.num_examples} images, "
                  f"{len(folder.class_names)} classes")
    except (data.DatasetUnavailableError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
