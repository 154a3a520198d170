"""Studies: methods × orders × seeds × a grid per method, run as ordinary run folders on a
local pool, Ray or SLURM, hyperparameters chosen on validation rows carved from training
data, then one table with 95 % t intervals (``nlora study``, docs/studies.md).

One job per module: ``spec`` (the YAML file), ``plan`` (cells and the study index),
``backends`` (local / ray / slurm), ``select`` (the tune stage's choice), ``stats``
(t intervals, paired tests), ``aggregate`` (metrics of run folders), ``report`` (tables,
figure) and ``driver`` (the stages, resumable).
"""
