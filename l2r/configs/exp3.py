"""Experiment 3 of the paper (§5.4, Fig. 4 left): generalising to an unseen initialisation.

As Exp 2, but every meta-training episode starts from one of many pre-trained Task-A networks
(§5.4: 100) and the meta-test starts from a network never seen in meta-training. The pre-trained
checkpoints are seeds of one recipe; `meta.train_checkpoints` of them are used for episodes.

Presets (`--config=exp3:<preset>`), each as in `exp2.py` plus:
  paper          101 checkpoints: 100 for meta-training, 1 held out.
  cifar_offline  4 checkpoints (3 + 1 held out): pre-training dominates on a CPU.
  cpu            6 checkpoints (5 + 1 held out).
  smoke          3 checkpoints (2 + 1 held out).
"""

from l2r.configs import common, exp2

PRESETS = exp2.PRESETS
CHECKPOINTS = {"paper": 101, "cifar_offline": 4, "cpu": 6, "smoke": 3}


def get_config(arg=None):
    preset = common.parse_preset(arg, PRESETS, default="cpu")
    c = exp2.get_config(preset)
    c.experiment = "exp3"
    c.pretrain.num_checkpoints = CHECKPOINTS[preset]
    c.meta.train_checkpoints = CHECKPOINTS[preset] - 1  # The last one is unseen until meta-test.
    c.num_seeds = max(c.num_seeds, 1)
    return c
