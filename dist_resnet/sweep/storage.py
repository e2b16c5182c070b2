"""Where a study lives (a journal file in SWEEP_DIR for one machine; an RDB such as PostgreSQL, with
heartbeats, for many nodes), how it samples and prunes, and opening an existing sweep again."""
from __future__ import annotations

import importlib.util
import json
import random
import re
import time
from pathlib import Path

from .space import Param, SweepError

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "asha", "none")
META = "sweep.json"  # what a sweep folder records about its study (the storage's password masked)
BASE = "base.yaml"  # every trial's config before the searched keys: what best.yaml and --final start from


def make_storage(url: str | None, sweep_dir: Path, heartbeat: int):
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if not url:
        return JournalStorage(JournalFileBackend(str(sweep_dir / "study.journal")))
    url = _driver(url)
    if url.startswith(("postgresql", "mysql", "sqlite")):
        for attempt in range(4):  # workers that start together race to create the tables: the losers retry
            try:
                return RDBStorage(url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                                  heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
            except ImportError as e:
                raise SweepError(f"the storage {safe_url(url)} needs its database driver: {e}; for PostgreSQL: "
                                 "pip install 'dist_resnet[sweep]'") from None
            except Exception as e:  # noqa: BLE001 - SQLAlchemy/driver errors: say which storage and why
                if attempt == 3:
                    raise SweepError(f"cannot open the sweep storage {safe_url(url)}: {type(e).__name__}: "
                                     f"{str(e).splitlines()[0][:200]}") from None
                time.sleep(1 + attempt + random.random())
    raise SweepError(f"--storage {safe_url(url)}: give an RDB URL (postgresql://...) or leave it out for a "
                     f"journal file in {sweep_dir}")


def _driver(url: str) -> str:
    """postgresql:// with the driver that is installed: SQLAlchemy 2.1 picks psycopg (3) for a bare
    postgresql://, the `sweep` extra installs psycopg2."""
    scheme, sep, rest = url.partition("://")
    if scheme in ("postgresql", "postgres") and not importlib.util.find_spec("psycopg") \
            and importlib.util.find_spec("psycopg2"):
        return f"postgresql+psycopg2{sep}{rest}"
    return url


SECRETS = ("password", "passwd", "pwd", "pass", "secret", "token", "sslpassword")  # query keys that hold one


def safe_url(url: str) -> str:
    """The storage URL to print or write: the password masked in every form an SQLAlchemy URL allows
    (user:password@host, ?password=..., a URL-encoded one)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # not an SQLAlchemy URL: mask what looks like user:password@
        return re.sub(r"://([^:/@]+):[^@]+@", r"://\1:***@", url)
    query = {k: ("***" if k.lower() in SECRETS else v) for k, v in parsed.query.items()}
    return parsed.set(query=query).render_as_string(hide_password=True).replace("%2A%2A%2A", "***")


def masked(url: str | None) -> bool:
    return bool(url) and "***" in url


def make_sampler(name: str, params: list[Param], seed: int | None):
    import optuna

    if name == "grid":
        bad = [p.key for p in params if p.kind != "choice"]
        if bad:
            raise SweepError(f"--sampler grid takes lists or choice(...): {', '.join(bad)} are ranges")
        return optuna.samplers.GridSampler({p.key: list(p.values) for p in params}, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(name: str):
    import optuna

    return {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
            "asha": lambda: optuna.pruners.SuccessiveHalvingPruner(),
            "none": lambda: optuna.pruners.NopPruner()}[name]()


def open_study(name: str, storage, sampler, pruner):
    """The study `name` in `storage`, created by the first worker that gets there."""
    import optuna

    for attempt in range(4):  # workers that start together race to create it: the losers retry
        try:
            return optuna.create_study(study_name=name, storage=storage, direction="maximize", sampler=sampler,
                                       pruner=pruner, load_if_exists=True)
        except Exception:  # noqa: BLE001
            if attempt == 3:
                raise
            time.sleep(1 + attempt + random.random())


def load_study(sweep_dir: Path, url: str | None = None):
    """An existing sweep's study and its sweep.json (`url`: the storage, when its password was masked)."""
    import optuna

    try:
        meta = json.loads((sweep_dir / META).read_text())
    except (OSError, json.JSONDecodeError):
        raise SweepError(f"{sweep_dir} holds no sweep (no readable {META})") from None
    url = url or meta["storage"]
    if masked(url):
        raise SweepError(f"{sweep_dir}'s study lives in {url}: pass --storage URL with its password")
    storage = make_storage(url, sweep_dir, 60)
    return optuna.load_study(study_name=meta["study"], storage=storage), meta
