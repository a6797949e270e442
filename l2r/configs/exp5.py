"""Experiment 5 of the paper (§5.6, Fig. 5): three tasks in sequence.

Pre-train on Task 1; meta-train on episodes that learn Task 2, then Task 3, both n-way tasks drawn
from a pool of meta-training classes (Algorithm 1 with K = 3: while learning Task 3 the teacher
rehearses Tasks 1 and 2); meta-test on pairs of n-way tasks drawn from a disjoint pool: every
method learns Task 2 for `task_b.steps_2` steps, then Task 3 for `task_b.steps_3` steps, probed
with readouts on all three tasks (`l2r.pipelines.three_tasks`). Every method runs here
(`--config.task_b.methods=...`): LwF distils every earlier head, EWC accumulates every earlier
task's Fisher, HAT keeps one mask per task, OML and Rep start from their own networks.

Presets (`--config=exp5:<preset>`):
  paper          ResNet-14-GN; Task 1 = CIFAR-10 (10-way, TFDS); Tasks 2 and 3 = disjoint 10-way
                 tasks from CIFAR-100 classes 0-49 (meta-training) and 50-99 (meta-test), TFDS;
                 c = 200, T-BPTT 2 -> 17, threshold 20 -> 50, 2k episodes, 300 + 300 steps.
  cifar_offline  CIFAR-100 is not available offline: Task 1 is the offline JPEG copy of CIFAR-10
                 (all 10 classes) and the pools are the offline Tiny-ImageNet classes resized to
                 32×32 (meta-training: its classes 0-49, meta-test: 50-99), so Tasks 2 and 3 also
                 change domain. ResNet-14-GN; a short meta-training, 3 seeds, 3 task pairs.
  cpu            Fashion-MNIST: Task 1 = 4 classes; Tasks 2 and 3 = 2-way tasks from a
                 meta-training pool and a disjoint meta-test pool of 3 classes each (all that
                 Fashion-MNIST's 10 classes allow), so an episode's Tasks 2 and 3 share one class
                 (`pools.disjoint_tasks=False`); 300 + 300 steps.
  smoke          Generated data (11 classes: Task 1 = 3, pools of 4 with disjoint 2-way tasks),
                 tiny net; seconds. For tests.
The cpu and cifar_offline presets meta-train with Exp 1's CPU-budget recipe
(`exp1.offline_recipe`: exp gate, normalized loss, per-window T-BPTT, thresholds 45 -> 60, so up
to 65 on Task 3) and stop at `meta.max_windows`; neither budget has been timed for three tasks.
"""

from l2r.configs import common, exp1, exp2, fig1

PRESETS = ("cpu", "paper", "cifar_offline", "smoke")
CIFAR10 = common.CIFAR10_5A + common.CIFAR10_5B


def get_config(arg=None):
    preset = common.parse_preset(arg, PRESETS, default="cpu")
    c = fig1.get_config(preset)  # data source, model, pre-training and readout of the preset
    c.experiment = "exp5"
    c.data.classes_b = ()  # Unused: Tasks 2 and 3 come from `pools`.
    b = c.task_b
    del b.steps
    b.steps_2 = 300  # §5.6: 300 steps on Task 2,
    b.steps_3 = 300  # then 300 on Task 3.
    b.methods = ("sgd", "sgd_x0.1", "teacher", "learned")

    c.meta = common.meta_config()
    c.meta.episodes = 2000  # §5.6: 2k episodes,
    c.meta.loss_scale = 200.0  # c = 200,
    c.meta.tbptt = 2  # T-BPTT from 2 steps,
    c.meta.tbptt_max = 17  # the rest as Exp 2: up to 17 steps
    c.meta.threshold_max = 50.0  # and a threshold from 20 up to 50.
    c.meta.inner_steps = 300  # Most steps on each of Task 2 and Task 3 in one episode.
    c.meta.switch_threshold_step = 5.0  # §5.6: the threshold is raised by 5 while on Task 3.
    if preset in ("cpu", "cifar_offline"):
        exp1.offline_recipe(c.meta)  # Exp 1's CPU-budget departures (exp gate, thresholds 45-60).

    pool = common.pool_config
    if preset == "paper":
        c.data.classes_a = CIFAR10
        c.model.depth = 14  # §5.6: ResNet-14.
        c.pools = common.pools_config(
            pool("tfds", name="cifar100", classes=range(50)),
            pool("tfds", name="cifar100", classes=range(50, 100)),
            n_way=10,
        )
    elif preset == "cifar_offline":
        c.data.classes_a = CIFAR10
        c.pools = common.pools_config(
            pool("tiny_imagenet", classes=range(50), **exp2.TINY_IMAGENET_32),
            pool("tiny_imagenet", classes=range(50, 100), **exp2.TINY_IMAGENET_32),
            n_way=10,
            meta_test_tasks=3,
        )
        c.meta.episodes = 40
        c.meta.num_episodes_parallel = 2
        c.meta.curriculum_every = 15
        c.meta.max_windows = 40  # exp1's CPU budget.
        c.meta.validate_every = 10  # θ kept by meta-validation (l2r.meta.validation).
    elif preset == "cpu":
        c.data.classes_a = ("T-shirt/top", "Trouser", "Pullover", "Dress")
        c.pools = common.pools_config(
            pool(classes=("Coat", "Sandal", "Shirt")),
            pool(classes=("Sneaker", "Bag", "Ankle boot")),
            n_way=2,
            meta_test_tasks=3,
        )
        c.meta.episodes = 60
        c.meta.curriculum_every = 20
        c.meta.max_windows = 180  # exp1's budget (6-20 minutes on 2 cores for two tasks).
        c.meta.validate_every = 30  # θ kept by meta-validation (l2r.meta.validation).
    elif preset == "smoke":
        c.data.synthetic.num_classes = 11
        c.data.classes_a = (0, 1, 2)
        c.pools = common.pools_config(
            pool(classes=(3, 4, 5, 6)), pool(classes=(7, 8, 9, 10)), n_way=2, meta_test_tasks=1
        )
        b.steps_2 = b.steps_3 = 10
        b.probe_every = 5
        c.meta.episodes = 4
        c.meta.max_windows = 4
        c.meta.inner_steps = 4
        c.meta.num_episodes_parallel = 4  # splits over 1, 2 or 4 devices (launch/local.sh)
        c.meta.tbptt = c.meta.tbptt_max = 2
        c.meta.hidden_kernel = c.meta.hidden_vector = 8
    c.pools.disjoint_tasks = True  # An episode's Task 2 and Task 3 share no class (§5.6).
    if preset == "cpu":
        c.pools.disjoint_tasks = False  # 3-class pools cannot hold two disjoint 2-way tasks.
    return c
