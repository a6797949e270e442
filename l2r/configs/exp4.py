"""Experiment 4 of the paper (§5.5, Fig. 4 right): generalising to an unseen dataset.

Meta-train as in Exp 2 (n-way tasks from a pool of CIFAR-100 classes); meta-test on 5-way tasks
drawn from Tiny-ImageNet (resized to 32×32), a domain meta-training never saw, 5 draws.

Presets (`--config=exp4:<preset>`):
  paper          CIFAR-100 classes 0-49 (TFDS) -> Tiny-ImageNet, all 200 classes (the official
                 archive extracted under data root; `python -m l2r.data.prepare`).
  cifar_offline  Offline, CIFAR-100 is missing and Exp 2's offline pools are already Tiny-
                 ImageNet, so here meta-training learns CIFAR-5B (the Exp-1 Task B, one 5-way
                 task) and the meta-test draws 5-way tasks from the 100 offline Tiny-ImageNet
                 classes: the domain still changes between meta-training and meta-test.
  cpu            Fashion-MNIST 5A -> 5B for meta-training, scikit-learn's handwritten digits
                 (resized to 28×28) for the meta-test: 5-way tasks, 3 draws.
  smoke          Generated data for meta-training, digits (16×16) for the meta-test.
"""

from l2r.configs import common, exp1, exp2

PRESETS = exp2.PRESETS


def get_config(arg=None):
    preset = common.parse_preset(arg, PRESETS, default="cpu")
    c = exp1.get_config(preset)
    c.experiment = "exp4"
    pool = common.pool_config
    if preset == "paper":
        c.pools = common.pools_config(
            pool("tfds", name="cifar100", classes=range(50)),
            pool("tiny_imagenet", classes=range(200), root=exp2.TINY_IMAGENET_32["root"],
                 image_size=32),
        )  # fmt: skip
        c.meta.episodes = 2000
        c.meta.threshold_max = 50.0
        c.meta.tbptt_max = 17
    elif preset == "cifar_offline":
        c.pools = common.pools_config(
            pool(classes=common.CIFAR10_5B),
            pool("tiny_imagenet", classes=range(100), **exp2.TINY_IMAGENET_32),
        )
    elif preset == "cpu":
        c.pools = common.pools_config(
            pool(classes=c.data.classes_b),
            pool("digits", classes=range(10), image_size=28),
            meta_test_tasks=3,
        )
    elif preset == "smoke":
        c.pools = common.pools_config(
            pool(classes=c.data.classes_b),
            pool("digits", classes=range(10), image_size=16),
            n_way=3,
            meta_test_tasks=1,
        )
    return c
