"""The Deep Learning with Python MNIST convnet: rmsprop, batch 64, 5 epochs, >= 99% test accuracy.

    python experiments/mnist_convnet.py [--optimizer adam] [--epochs 3] [--workdir runs/x]

Running the same command again resumes from the workdir's latest checkpoint.
"""

import sys

from flaxconv.experiment import cli, default_config


def get_config():
    return default_config()  # the library's default is this recipe


if __name__ == "__main__":
    sys.exit(cli(get_config(), __doc__))
