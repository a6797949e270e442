"""The experiments, each a sibling built from the same parts (none imports another).

`fig1` (representational forgetting under SGD and the baselines), `transfer` (Exps 1-4:
pre-train, meta-train, meta-test) and `three_tasks` (Exp 5). Each has `check_config(config)`,
cheap and run before anything is loaded; `load(config)`, which reads the data and checks the
config against it (so bad data stops a run before its workdir is touched); and
`run(config, workdir, data=None) -> results`.
"""

PIPELINES = {
    "fig1": "l2r.pipelines.fig1",
    "exp1": "l2r.pipelines.transfer",
    "exp2": "l2r.pipelines.transfer",
    "exp3": "l2r.pipelines.transfer",
    "exp4": "l2r.pipelines.transfer",
    "exp5": "l2r.pipelines.three_tasks",
}
