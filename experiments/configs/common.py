"""Shared config pieces: data sources, models, pre-training, readout and preset parsing.

Every experiment config is a Python file with `get_config(arg)`; `arg` is the preset name given
after a colon on the command line (`--config=experiments/configs/fig1.py:cpu`). Each function
below returns one group of fields with a short comment per field; presets only override values.
"""

import os
import pathlib

import ml_collections

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
# Offline copies of CIFAR-10 and Tiny-ImageNet live in the team's shared folder next to the
# checkout; users point L2R_SHARED_DATA elsewhere or set `data.root` to an extracted copy.
SHARED_DATA = pathlib.Path(os.environ.get("L2R_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
CACHE_DIR = pathlib.Path(os.environ.get("L2R_CACHE", pathlib.Path.home() / ".cache" / "l2r"))

CIFAR10_5A = ("airplane", "automobile", "bird", "cat", "deer")
CIFAR10_5B = ("dog", "frog", "horse", "ship", "truck")


def parse_preset(arg, presets, default):
    """Returns the preset named by `arg` (default when empty) or raises a helpful error."""
    preset = arg or default
    if preset not in presets:
        raise ValueError(
            f"Unknown preset {preset!r}; choose one of {', '.join(presets)} "
            f"(e.g. --config=experiments/configs/<name>.py:{presets[0]})."
        )
    return preset


def data_config(source="fashion_mnist", name=""):
    c = ml_collections.ConfigDict()
    c.source = source  # tfds | image_folder | tiny_imagenet | fashion_mnist | digits | synthetic
    c.name = name  # TFDS dataset name (source=tfds), e.g. cifar10.
    c.root = ""  # Folder for image_folder / tiny_imagenet / fashion_mnist ("" = the default).
    c.archive = ""  # Offline .tar.gz to extract into data.root when it is missing.
    c.data_dir = ""  # TFDS data dir ("" = TFDS default).
    c.download = True  # Let TFDS download when it can reach the network.
    c.image_size = 0  # Resize images to this side (0 = keep).
    c.classes_a = ()  # Task A classes, by name or index.
    c.classes_b = ()  # Task B classes, by name or index; must not overlap classes_a.
    c.augment = False  # CIFAR-style pad-4 crop + horizontal flip for training batches.
    c.synthetic = ml_collections.ConfigDict(  # Generated data (source=synthetic).
        dict(num_classes=10, image_size=16, channels=1, train_per_class=200, test_per_class=50)
    )
    return c


def model_config(name="convnet"):
    c = ml_collections.ConfigDict()
    c.name = name  # resnet | convnet
    c.depth = 32  # ResNet depth, 6n+2 (14, 20, 32).
    c.widths = (32, 64, 64)  # Channels per stage (resnet) or per conv (convnet).
    c.groups = 8  # GroupNorm groups (must divide every width).
    c.hidden = 0  # convnet only: dense layer before the head (0 = none).
    return c


def pretrain_config():
    c = ml_collections.ConfigDict()
    c.steps = 2000  # SGD steps on Task A.
    c.batch_size = 128  # §3: batch 128.
    c.learning_rate = 0.1  # §3: lr 0.1.
    c.momentum = 0.9  # §3: momentum 0.9.
    c.schedule = "cosine"  # constant | cosine | step (x0.1 at 50% and 75%).
    c.warmup_steps = 0  # Linear warm-up steps.
    c.weight_decay = 5e-4  # L2 on the backbone (not in the paper's text; standard for CIFAR).
    c.num_checkpoints = 1  # Pre-trained networks (seeds); Task-B seed s uses checkpoint s % n.
    c.seeds_per_call = 8  # Checkpoints trained together in one vmapped call.
    c.dir = ""  # Where checkpoints live ("" = <workdir>/pretrain); reused across runs.
    return c


def readout_config():
    c = ml_collections.ConfigDict()
    c.solver = "adam"  # adam (§1: 500 full-batch Adam steps, lr 0.1) | lbfgs
    c.steps = 500
    c.learning_rate = 0.1
    c.l2 = 0.0
    c.train_size = 0  # Training examples per task for the readout fit (0 = all).
    c.test_size = 0  # Test examples per task (0 = all).
    c.cka_size = 2000  # Test examples used for CKA against the pre-Task-B network.
    return c
