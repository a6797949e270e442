"""Experiment 2 of the paper (§5.3, Fig. 3 right): generalising to unseen classes.

Pre-train on Task A (CIFAR-5A); meta-train on episodes that each learn a 5-way task drawn from a
pool of meta-training classes (CIFAR-100 classes 0-49); meta-test on 5-way tasks drawn from a
disjoint pool (classes 50-99), 5 draws, against the baselines, probed as in Fig. 1.

Presets (`--config=exp2:<preset>`):
  paper          ResNet-32-GN; CIFAR-10 and CIFAR-100 through TFDS; every hyper-parameter of §5.3
                 (2k episodes, curriculum up to threshold 50 and 17 T-BPTT steps).
  cifar_offline  CIFAR-100 is not available offline: the pools are the offline Tiny-ImageNet
                 classes, resized to 32×32 (meta-training: its classes 0-49, meta-test: 50-99),
                 so Task B also changes domain. ResNet-14-GN; a short meta-training.
  cpu            Fashion-MNIST: Task A 4 classes, meta-training pool 3 classes, meta-test pool
                 3 classes, 2-way tasks (the only class split Fashion-MNIST's 10 classes allow).
  smoke          Generated data, tiny net; seconds. For tests.
"""

from l2r.configs import common, exp1

PRESETS = ("cpu", "paper", "cifar_offline", "smoke")
TINY_IMAGENET_32 = dict(
    root=str(common.CACHE_DIR / "tiny-imagenet-200"),
    archive=common.offline_archive("tiny-imagenet-200-first100.tar.gz"),
    image_size=32,
)


def get_config(arg=None):
    preset = common.parse_preset(arg, PRESETS, default="cpu")
    c = exp1.get_config(preset)
    c.experiment = "exp2"
    pool = common.pool_config
    if preset == "paper":
        c.pools = common.pools_config(
            pool("tfds", name="cifar100", classes=range(50)),
            pool("tfds", name="cifar100", classes=range(50, 100)),
        )
        c.meta.episodes = 2000  # §5.3: 2k episodes, curriculum up to 50 and 17.
        c.meta.threshold_max = 50.0
        c.meta.tbptt_max = 17
    elif preset == "cifar_offline":
        c.pools = common.pools_config(
            pool("tiny_imagenet", classes=range(50), **TINY_IMAGENET_32),
            pool("tiny_imagenet", classes=range(50, 100), **TINY_IMAGENET_32),
        )
    elif preset == "cpu":
        c.data.classes_a = ("T-shirt/top", "Trouser", "Pullover", "Dress")
        c.data.classes_b = ("Sneaker", "Bag", "Ankle boot")
        c.pools = common.pools_config(
            pool(classes=("Coat", "Sandal", "Shirt")),
            pool(classes=("Sneaker", "Bag", "Ankle boot")),
            n_way=2,
            meta_test_tasks=3,
        )
    elif preset == "smoke":
        c.data.synthetic.num_classes = 8
        c.data.classes_a, c.data.classes_b = (0, 1, 2), (6, 7)
        c.pools = common.pools_config(pool(classes=(3, 4, 5)), pool(classes=(6, 7)), n_way=2,
                                      meta_test_tasks=1)  # fmt: skip
    return c
