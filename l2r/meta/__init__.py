"""Meta-training (Algorithm 1, paper §4) in small parts: `curriculum` (schedules), `episodes`
(the two-task episode problem), `three_tasks` (Exp 5's, built around it), `window` (one pure
T-BPTT window) and `loop` (the state on the devices, checkpoints and the host loop)."""
