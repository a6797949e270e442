"""l2r's benchmarks, one module per section; `python -m experiments.bench` runs them
(`__main__.py` documents the commands and flags).

  common.py     timing (median of repeats), machine description, parameter count
  sgd.py        SGD step rates: canonical vs stock convs, standalone vs in a scan
  probe.py      all probe fits of fig1:cpu, l2r vs scikit-learn; readout solvers and layouts
  meta.py       meta-training rates and the compiled memory of a window
  torch_ref.py  the ResNet-GN SGD step in l2r vs PyTorch eager
  flops.py      achieved FLOP/s against the matmul peak
  scaling.py    meta-training windows over simulated CPU devices, one process per count
"""
