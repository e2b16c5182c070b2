"""Hyper-parameter sweeps on Optuna. Every trial is a normal training run; selection is on validation
accuracy, never on test.

    python -m dist_resnet.sweep --config configs/cpu.yaml --study lr --trials 8 --out sweeps/lr \\
        --space 'optim.lr=log(0.05,2)' --space 'optim.weight_decay=choice(5e-4,1e-3)' \\
        data.dir=data/cifar10 data.val_fraction=0.1 train.epochs=4
    python -m dist_resnet.sweep --report sweeps/lr                  # the results table
    python -m dist_resnet.sweep ... --storage postgresql://user:pw@db-host/sweeps   # a worker of many nodes

Search space (`--space KEY=SPEC`, repeatable, or `--space space.yaml` holding `KEY: SPEC` lines):
  log(a,b)     float, log-uniform in [a, b]          float(a,b)  float, uniform in [a, b]
  int(a,b)     integer in [a, b]                     choice(x,y,...)  one of the values
  [x,y,...]    a list: what `--sampler grid` takes (choice(...) works there too)

- Each trial runs in SWEEP_DIR/trial-NNNN/ (its own config.yaml, metrics, curves, TensorBoard events) as
  `python -m dist_resnet.train` (or torchrun for --gpus-per-trial K > 1). Its validation accuracy goes to
  Optuna every epoch, from its metrics.json, so the pruner can stop it early (it stops with a checkpoint).
  A trial that crashes or diverges is recorded as failed, with its error, and the sweep goes on.
- With several GPUs visible, trials run side by side, K GPUs each (default 1); on CPU, one at a time.
- Storage: by default a journal file in SWEEP_DIR (one machine, many processes). For many nodes, an RDB
  URL (PostgreSQL): trials of a killed worker go stale (heartbeat) and are retried. A retried or stopped
  trial resumes from its own checkpoint. SQLite and journal files on NFS are not safe across nodes.
- SIGUSR1/SIGTERM (slurm/sweep.sh): running trials checkpoint and stop, are queued to resume, and the
  worker exits 75.
- Results: SWEEP_DIR/results.csv and results.md (best marked), best.yaml (the winning config);
  --final retrains it on the whole train split and reports test accuracy once (SWEEP_DIR/final).

The package, one concern per module: `space` (the search space), `storage` (where the study lives,
its sampler and pruner), `trials` (one trial = one training process, watched), `orchestrate` (slots,
the objective, the trial count, stop requests), `results` (the tables and best.yaml), `cli`.
"""
from .cli import main
from .space import Param, SweepError, parse_param, parse_space
from .storage import load_study, make_storage

__all__ = ["main", "Param", "SweepError", "parse_param", "parse_space", "load_study", "make_storage"]
