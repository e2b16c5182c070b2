"""Run by test_sweep.py under another Optuna (PYTHONPATH=that version's folder): every sweep module imports,
and each storage (journal, RDB with heartbeat), sampler and pruner does what a sweep asks of it, the
journal's stale-trial reaper included. Prints "optuna X ok"."""
import tempfile
from pathlib import Path
from types import SimpleNamespace

import optuna

from dist_resnet.sweep import cli, orchestrate, results, storage, trials  # noqa: F401 - every module imports
from dist_resnet.sweep.space import parse_space

folder = Path(tempfile.mkdtemp())
keys = {"optim.lr", "optim.nesterov", "train.epochs"}
ranges = parse_space(["optim.lr=log(0.1,1)", "train.epochs=int(1,3)", "optim.nesterov=[true,false]"], keys)
grid = parse_space(["optim.lr=[0.1,0.2]", "optim.nesterov=[true,false]"], keys)
for url in (None, f"sqlite:///{folder}/s.db"):
    store = storage.make_storage(url, folder, 60)
    for sampler in storage.SAMPLERS:
        for pruner in storage.PRUNERS:
            params = grid if sampler == "grid" else ranges
            study = storage.open_study(f"{sampler}-{pruner}-{bool(url)}", store,
                                       storage.make_sampler(sampler, params, 0), storage.make_pruner(pruner))
            t = study.ask()
            values = {q.key: q.suggest(t) for q in params}
            t.report(0.5, 1)
            t.should_prune()
            study.tell(t, 0.5)
            study.enqueue_trial(values, user_attrs={"resume_of": 0})
            results.rows(study, [q.key for q in params])
    sweep = SimpleNamespace(out=str(folder), trials=4, gpus_per_trial=1, heartbeat=60, overrides=[], config=None)
    study.ask()  # a RUNNING trial that no worker watches: the reaper must read it
    orchestrate.Sweep(sweep, ranges, store).reap(study)
print("optuna", optuna.__version__, "ok")
