"""Shared config pieces: data sources, models, pre-training, readout and preset parsing.

Every experiment config is a Python file with `get_config(arg)`; `arg` is the preset name given
after a colon on the command line (`--config=fig1:cpu`). Each function
below returns one group of fields with a short comment per field; presets only override values.
"""

import os
import pathlib

import ml_collections

# The offline presets read CIFAR-10 and Tiny-ImageNet from folders in the cache dir, which
# `python -m l2r.data.prepare` builds from the official archives. $L2R_DATA, when set, names a
# folder of ready-made copies (cifar10-jpeg.tar.gz, tiny-imagenet-200-first100.tar.gz) to extract
# there instead; `--config.data.root` / `--config.data.archive` override both.
DATA_ARCHIVES = os.environ.get("L2R_DATA", "")
CACHE_DIR = pathlib.Path(os.environ.get("L2R_CACHE", pathlib.Path.home() / ".cache" / "l2r"))


def offline_archive(name):
    """$L2R_DATA/name, or "" when L2R_DATA is unset (then data.root must already exist)."""
    return os.path.join(DATA_ARCHIVES, name) if DATA_ARCHIVES else ""


CIFAR10_5A = ("airplane", "automobile", "bird", "cat", "deer")
CIFAR10_5B = ("dog", "frog", "horse", "ship", "truck")


def parse_preset(arg, presets, default):
    """Returns the preset named by `arg` (default when empty) or raises a helpful error."""
    preset = arg or default
    if preset not in presets:
        raise ValueError(
            f"Unknown preset {preset!r}; choose one of {', '.join(presets)} "
            f"(e.g. --config=<experiment>:{presets[0]})."
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
    c.layer_cka_size = 500  # Test examples for per-layer CKA of pooled unit outputs (0 = off).
    return c


def baselines_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds to the `task_b` group `c` the hyper-parameters of every registered method that has
    its own (`task_b.lwf`, `ewc`, `hat`, `oml`, `rep`: §4; and those of methods a user has
    registered before building the config), with the defaults each method registered
    (`l2r.methods.registry.add_config_groups`)."""
    from l2r.methods import registry  # Here: a config file imports no JAX until it is built.

    return registry.add_config_groups(c)


def pool_config(source="", classes=(), **data):
    """A pool of classes of one dataset (Exps 2-5): the `data_config` fields plus `classes`;
    source "" means the Task-A dataset (config.data)."""
    c = data_config(source)
    c.update(data)
    c.classes = tuple(classes)  # Pool classes, by name or index.
    return c


def pools_config(meta_train, meta_test, n_way=5, meta_test_tasks=5):
    """Exps 2-4: episodes learn n-way tasks from `meta_train`, the meta-test n-way tasks come
    from the disjoint pool `meta_test` (§5.3-5.5)."""
    c = ml_collections.ConfigDict()
    c.meta_train = meta_train  # pool_config of the meta-training classes
    c.meta_test = meta_test  # pool_config of the meta-test classes
    c.n_way = n_way  # §5.3: 5-way tasks (Exp 5: 10-way).
    c.meta_test_tasks = meta_test_tasks  # §5.3: 5 draws of the meta-test task, averaged.
    c.meta_train_tasks = 0  # Distinct meta-training tasks (0 = one per episode).
    return c


def meta_config():
    """Meta-training (Algorithm 1, §3-§5) and the meta-learner (§5.1)."""
    c = ml_collections.ConfigDict()
    c.episodes = 900  # §5 Exp 1: 900 episodes (Exp 2-5: 2000).
    c.max_windows = 0  # Stop after this many truncation windows (0 = when `episodes` are done).
    c.max_minutes = 0.0  # Or after this much window time, compiles included (0 = no limit).
    c.num_episodes_parallel = 4  # Episodes in flight; the meta-gradient is their mean.
    c.shard_episodes = True  # Split episodes over all devices (a no-op on one device).
    c.episode_chunk = 0  # Episodes vmapped together (0: 1 on CPU, all on accelerators).
    c.inner_steps = 500  # T(i): an episode restarts after this many inner steps at the latest.
    c.inner_steps_min = 0  # > 0: each episode's length uniform on [this, inner_steps] (by id).
    c.learning_rate = 1e-3  # §3: Adam, η = 1e-3.
    c.clip_grad_norm = 1.0  # Global-norm clip of the meta-gradient (not in the paper).
    c.loss_scale = 300.0  # §3: c = 300 (Exp 5: 200).
    c.rep_loss = "huber"  # huber (§4) | standardized | normalized (see l2r.meta.window.rep_loss)
    c.threshold = 20.0  # §5: curriculum loss threshold, first value,
    c.threshold_step = 5.0  # raised by this every `curriculum_every` episodes,
    c.threshold_max = 30.0  # up to this (Exp 2: 50).
    c.tbptt = 5  # §5: T-BPTT steps, first value,
    c.tbptt_step = 2  # raised by this every `curriculum_every` episodes,
    c.tbptt_max = 9  # up to this (Exp 2: 17).
    c.curriculum_every = 300  # Episodes per curriculum stage.
    c.update_every_step = True  # Algorithm 1: a meta-step every inner step (False: per window).
    c.first_order = False  # Drop the second-order terms through the student's gradient.
    c.hidden_kernel = 64  # §5.1: LSTM hidden size for conv/dense kernels,
    c.hidden_vector = 32  # and for GroupNorm scales/offsets and biases.
    c.gate = "tanh"  # tanh (§5.1, δ may turn negative) | exp (δ = exp(scale·tanh(z)) > 0)
    c.log_range = 2.0  # exp gate: initial scale, δ ∈ (e^-log_range, e^log_range) (learnable).
    # A learned pull towards the pre-Task-B weights: w − α δ ⊙ g − ρ ⊙ (w − w0), ρ ∈ [0, pull_max],
    # ρ ≡ 0 at initialisation (l2r.metalearner.Config.pull). Not in the paper.
    c.pull = False
    c.pull_max = 0.05
    # Inputs with more history: a momentum (β 0.9) of g per weight and log(1 + t) / 8 per unit
    # (l2r.metalearner.Config.history). Not in the paper.
    c.history = False
    c.input_clip = 5.0  # Meta-learner inputs are RMS-normalised, then clipped to this.
    c.train_checkpoints = 0  # Exp 3: episodes use checkpoints [0, k); meta-test the rest (0 = all).
    c.checkpoint_minutes = 10.0  # Orbax checkpoint of the meta-state this often (and at the end).
    # Meta-validation (`l2r.meta.validation`): every `validate_every` windows (0 = off) θ runs as
    # the learned rule on held-out training data, and the meta-test uses the best-scoring θ.
    c.validate_every = 0
    c.validate_fraction = 0.1  # Share of each meta-training class's examples held out.
    c.validate_seeds = 2  # Task-B seeds per validation task.
    c.validate_steps = 0  # Task-B steps of a validation run (0 = task_b.steps).
    c.validate_tasks = 2  # Validation tasks drawn from the meta-training pool (with pools).
    return c
