"""A sweep's Optuna study (its search space in Optuna's terms is dlbase/search/space.py): its samplers and pruners, the storage (an
SQLite file in the sweep folder by default, any database URL Optuna takes, or a journal file), the trial slots
every worker takes from, and the heartbeat that lets a dead worker's trial be retried by another.

Slots: when the study is created, every trial it will ever have is enqueued as a WAITING trial (a grid's points,
a random search's seeded draws, TPE's seeded start-up draws and then empty slots that TPE fills when a worker
takes them). A worker takes a slot by moving it from WAITING to RUNNING, which the storage does atomically, so
N workers on any number of machines run exactly the slots, none twice. A slot's trial that dies (kill -9, a
lost machine) stops beating; another worker marks it failed and enqueues its retry, which keeps the slot's run
folder and goes on from its last checkpoint.
"""
from __future__ import annotations

import math
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from dlbase.core.errors import ConfigError, DlbaseError
from dlbase.search.space import decode, optuna_module, slots

JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
SLOT = "dlbase.slot"  # user attr: the trial's slot (its folder trial-NNN); a retry inherits it
ROW = "dlbase.row"  # user attr: the trial's row of results.csv, once it has one
BASE = "dlbase.base"  # user attr: the resolved base config (dotted key -> value) the study was made from
HEARTBEAT = "dlbase.heartbeat"  # system attr: the last beat (time.time()), where the storage has no heartbeat


def sampler(spec, rank: int):
    """The sampler a worker uses for an empty slot (TPE); fixed slots need none. Seeded per local worker."""
    optuna = optuna_module()
    if spec.method != "tpe":
        return optuna.samplers.RandomSampler(seed=spec.seed + rank)  # never consulted: every slot is fixed
    # constant_liar: trials still running count as bad guesses, so parallel workers spread out
    return optuna.samplers.TPESampler(seed=spec.seed + 7919 * rank, n_startup_trials=0, multivariate=True,
                                      constant_liar=True)


def pruner(spec, steps: int):
    """steps: the reports a trial makes (epochs, or folds with cross-validation)."""
    optuna = optuna_module()
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.prune_after, n_warmup_steps=0)
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, steps), reduction_factor=3)
    return optuna.pruners.NopPruner()


# ---------------------------------------------------------------------------------------------- the storage
def storage_url(spec_storage: Optional[str], root: Path) -> str:
    """The study's storage as the user gives it (None: an SQLite file in the sweep folder)."""
    return spec_storage if spec_storage else f"sqlite:///{(root / 'study.db').resolve()}"


def open_storage(url: str, heartbeat: int, retries: int, where: str):
    """An Optuna storage for url: a database URL (sqlite:///, postgresql://, mysql://) with Optuna's heartbeat
    and retry of stale trials, or a journal file (a path ending in .log / .journal / .jsonl, for shared file
    systems; dlbase keeps its heartbeat in a trial attribute there)."""
    optuna_module()
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    if "://" not in url and url.endswith(SQLITE_SUFFIXES):  # a path to an SQLite file: what else could it be
        url = f"sqlite:///{Path(url).expanduser().resolve()}"
    if "://" not in url:
        if not url.endswith(JOURNAL_SUFFIXES):
            raise ConfigError(f"{where}: {url!r} is neither a database URL (sqlite:///path.db, "
                              f"postgresql://user@host/db, mysql://...), an SQLite file ({', '.join(SQLITE_SUFFIXES)}) "
                              f"nor a journal file ({', '.join(JOURNAL_SUFFIXES)})")
        from optuna.storages.journal import JournalFileBackend, JournalStorage
        path = Path(url).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as e:
            raise ConfigError(f"{where}: cannot write the journal file {path}: {e.strerror or e}") from None
    scheme = url.split("://", 1)[0]
    if scheme.split("+")[0] == "sqlite" and _in_memory(url):
        raise ConfigError(f"{where}: {url!r} is an in-memory SQLite database, which no other worker or rerun can "
                          f"see; give a file (sqlite:///study.db) or a server (postgresql://user@host/db)")
    if scheme in ("postgresql", "postgres") and not _importable("psycopg2"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]  # psycopg 3 is what dlbase installs
    kwargs: dict = {"connect_args": {"timeout": 60}} if scheme == "sqlite" else {"pool_pre_ping": True}
    try:
        return RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat, grace_period=3 * heartbeat,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=retries))
    except (ImportError, ModuleNotFoundError) as e:
        raise ConfigError(f"{where}: {url}: the database driver is missing ({e}); pip install psycopg[binary] for "
                          f"PostgreSQL, PyMySQL for MySQL") from None
    except Exception as e:  # sqlalchemy's errors: a bad URL, a server not there, a refused login
        raise ConfigError(f"{where}: cannot open the study's storage {hide_password(url)}: "
                          f"{storage_reason(e)}") from None


def _in_memory(url: str) -> bool:
    path, _, query = url.split("://", 1)[1].lstrip("/").partition("?")
    return not path or path.startswith(":memory:") or "mode=memory" in query


def _importable(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def storage_reason(e: BaseException) -> str:
    """Why a storage call failed, in one line: the database's own words (sqlalchemy keeps the driver's error as
    .orig, under Optuna's generic "invalid data in the commit"), with what to do when the file is read-only."""
    inner, chain = e, [e]
    while (nxt := inner.__cause__ or inner.__context__) is not None and nxt not in chain:
        inner = nxt
        chain.append(inner)
    driver = next((c.orig for c in reversed(chain) if getattr(c, "orig", None) is not None), None)
    words = str(driver if driver is not None else inner).strip()
    first = words.splitlines()[0] if words else type(inner).__name__
    if "readonly" in first.replace("-", "").replace(" ", "").lower():
        first += " (the database file or its folder is not writable here: check its permissions and owner)"
    return first


def hide_password(url: str) -> str:
    return re.sub(r"(://[^:/@]+:)[^@]+@", r"\1***@", url)


# ---------------------------------------------------------------------------------------------- the study
class Study:
    """One sweep's study in its storage: created and filled with its slots once, joined by every worker."""

    READY = "dlbase.ready"

    def __init__(self, spec, root: Path, storage_text: Optional[str], record: dict, rank: int = 0,
                 steps: int = 1, log: Callable[[str], None] = print, base: Optional[dict] = None):
        optuna = optuna_module()
        self.spec, self.log = spec, log
        self.url = storage_url(storage_text, root)
        where = "--storage" if storage_text else f"{root / 'study.db'}"
        self.storage = open_storage(self.url, spec.heartbeat, spec.retries, where)
        direction = "maximize" if spec.mode == "max" else "minimize"
        kw = dict(study_name=spec.name, storage=self.storage, sampler=sampler(spec, rank), pruner=pruner(spec, steps))
        try:
            try:
                self.study = optuna.create_study(direction=direction, **kw)
                created = True
            except optuna.exceptions.DuplicatedStudyError:
                self.study = optuna.load_study(**kw)
                created = False
            if created:
                for i, params in enumerate(slots(spec)):
                    self.study.enqueue_trial(params, user_attrs={SLOT: i})
                self.study.set_user_attr("dlbase.search.sweep", record)
                self.study.set_user_attr(BASE, base)
                self.study.set_user_attr(self.READY, True)  # last: a worker that joins now finds every slot
            else:
                self._wait_ready(where)
                stored = self.study.user_attrs.get("dlbase.search.sweep")
                if isinstance(stored, dict):  # studies made before --set was recorded resolved, in BASE
                    stored = {k: stored.get(k) for k in record}
                if BASE not in self.study.user_attrs and base is not None:  # a study older than BASE
                    self.study.set_user_attr(BASE, base)
            self.base = self.study.user_attrs.get(BASE)  # the resolved base config it was made from
        except DlbaseError:
            raise
        except Exception as e:  # the database refused: read-only, full, a lost connection
            raise ConfigError(f"{where}: the study's storage {hide_password(self.url)} failed: "
                              f"{storage_reason(e)}") from None
        if not created and stored != record:
            from dlbase.search.spec import changed_keys
            changes = changed_keys(stored, record) if isinstance(stored, dict) else ["not made by dlbase sweep"]
            raise ConfigError(f"{hide_password(self.url)}: study {spec.name!r} there was made by another sweep "
                              f"({'; '.join(changes[:4])}); give the new one another name (sweep name:)")
        self.storage = self.study._storage  # what Optuna's own ask() writes through (it caches trials)
        self.heartbeat_native = _native_heartbeat(self.storage)

    def _wait_ready(self, where: str) -> None:
        deadline = time.monotonic() + 60
        while not self.study.user_attrs.get(self.READY):
            if time.monotonic() > deadline:
                raise ConfigError(f"{where}: study {self.spec.name!r} exists but its trials were never enqueued (its "
                                  f"creator stopped at once); delete the study (optuna delete-study) and rerun")
            time.sleep(0.5)

    # ------------------------------------------------------------------ taking slots
    def take(self):
        """The next slot as an optuna.Trial (RUNNING, ours), or None when every slot is taken. Fails stale trials
        first, so a dead worker's slot comes back as a retry."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import Trial, TrialState
        self.fail_stale()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            try:
                if self.storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):  # atomic in storage
                    _Heartbeat(self, t._trial_id)._beat()  # at once: a worker that dies now is seen to
                    return Trial(self.study, t._trial_id)
            except UpdateFinishedTrialError:
                continue
        return None

    def running(self) -> int:
        from optuna.trial import TrialState
        return len(self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))

    def fail_stale(self) -> None:
        """Mark trials whose worker stopped beating failed, and enqueue their retries."""
        optuna = optuna_module()
        from optuna.trial import TrialState
        if self.heartbeat_native:
            optuna.storages.fail_stale_trials(self.study)
            return
        grace, now = 3 * self.spec.heartbeat, time.time()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            beat = t.system_attrs.get(HEARTBEAT, t.datetime_start.timestamp() if t.datetime_start else now)
            if now - beat > grace:
                try:
                    if self.storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                        self.retry(self.storage.get_trial(t._trial_id))
                except optuna.exceptions.UpdateFinishedTrialError:
                    pass

    def retry(self, frozen, counts: bool = True) -> None:
        """Enqueue a failed (killed, errored) trial's retry: same params, same slot, within spec.retries. A stop
        the user asked for (a signal) is not a failure: counts=False enqueues its retry without using one up."""
        from optuna.storages import RetryHeartbeatStaleTrialCallback
        if counts:
            RetryHeartbeatStaleTrialCallback(max_retry=self.spec.retries)(self.study, frozen)
            return
        optuna = optuna_module()
        system_attrs = {"failed_trial": frozen.number, "retry_history": [], **frozen.system_attrs}
        self.study.add_trial(optuna.create_trial(
            state=optuna.trial.TrialState.WAITING, params=frozen.params, distributions=frozen.distributions,
            user_attrs=frozen.user_attrs, system_attrs=system_attrs))

    def beating(self, trial) -> "_Heartbeat":
        return _Heartbeat(self, trial._trial_id)

    def give_back(self, trials: list, counts: bool = True) -> None:
        """Trials of ours still running when we stop (a signal, an error): failed, each with its retry, which
        goes on from the trial's checkpoints. counts: False for a stop the user asked for, which uses up none
        of spec.retries (only an error or a worker's death does)."""
        from optuna.trial import TrialState
        for trial in trials:
            frozen = self.storage.get_trial(trial._trial_id)
            if frozen.state == TrialState.RUNNING:
                self.study.tell(trial, state=TrialState.FAIL)
                self.retry(self.storage.get_trial(trial._trial_id), counts)

    # ------------------------------------------------------------------ reading it
    def rows(self) -> tuple[dict, int]:
        """(slot -> its row, slots not done): each slot's newest trial's row; a slot whose trial failed without a
        row and has no retry left is a 'failed' row."""
        from optuna.trial import TrialState
        newest: dict[int, Any] = {}
        for t in self.study.get_trials(deepcopy=False):
            slot = t.user_attrs.get(SLOT)
            if slot is not None and (slot not in newest or t.number > newest[slot].number):
                newest[slot] = t
        rows, open_ = {}, 0
        for slot, t in sorted(newest.items()):
            if ROW in t.user_attrs:
                rows[slot] = t.user_attrs[ROW]
            elif t.state == TrialState.FAIL:
                tries = len(t.system_attrs.get("retry_history", [])) + 1
                values = decode(self.spec.params, t.params) if set(t.params) == set(self.spec.params) else {}
                rows[slot] = {"trial": f"trial-{slot:03d}", **values, "status": "failed", "score": None, "std": None,
                              "epochs": None, "seconds": None,
                              "error": f"its worker stopped {tries} time(s) (sweep.retries={self.spec.retries})"}
            else:
                open_ += 1
        return rows, open_

    def params_of(self, slot: int) -> Optional[dict]:
        """The values (decoded) of a slot's newest trial that has them all."""
        best = None
        for t in self.study.get_trials(deepcopy=False):
            if t.user_attrs.get(SLOT) == slot and set(t.params) == set(self.spec.params):
                if best is None or t.number > best.number:
                    best = t
        return decode(self.spec.params, best.params) if best is not None else None

    def note(self, key: str, value: Any) -> None:
        self.study.set_user_attr(key, value)

    def noted(self, key: str) -> Any:
        return self.study.user_attrs.get(key)


def _native_heartbeat(storage) -> bool:
    """Optuna's own heartbeat (its database storages, given heartbeat_interval); journal files have none."""
    interval = getattr(storage, "get_heartbeat_interval", None)
    return interval is not None and interval() is not None


class _Heartbeat:
    """While a trial trains, a thread beats every spec.heartbeat seconds (Optuna's record_heartbeat, or a
    trial attribute where the storage has none)."""

    def __init__(self, study: Study, trial_id: int):
        self.study, self.trial_id, self.stop = study, trial_id, threading.Event()

    def _beat(self) -> None:
        s = self.study
        if s.heartbeat_native:
            s.storage.record_heartbeat(self.trial_id)
        else:
            s.storage.set_trial_system_attr(self.trial_id, HEARTBEAT, time.time())

    def _loop(self) -> None:
        while not self.stop.wait(self.study.spec.heartbeat):
            try:
                self._beat()
            except Exception:  # a database hiccup: the next beat tries again; grace is three beats
                pass

    def __enter__(self) -> "_Heartbeat":
        self._beat()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="dlbase-heartbeat")
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def claim(path: Path) -> bool:
    """Take path as a lock (O_EXCL), or take it over from a process of this host that is gone. True if ours."""
    host = socket.gethostname()
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner_host, _, pid = path.read_text().partition(":")
                alive = owner_host != host or _alive(int(pid))
            except (OSError, ValueError):
                alive = False
            if alive:
                return False
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{host}:{os.getpid()}")
        return True
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StudyError(DlbaseError):
    """The study's storage failed during the sweep."""


def storage_errors(url: str):
    """Context manager: the storage failing mid-sweep (a database gone away) is one line naming it, not
    Optuna's traceback."""
    import contextlib

    @contextlib.contextmanager
    def guard():
        optuna = optuna_module()
        try:
            yield
        except optuna.exceptions.StorageInternalError as e:
            raise StudyError(f"the study's storage {hide_password(url)} failed mid-sweep ({storage_reason(e)}); finished "
                             f"trials are kept there: once it is reachable, rerun the same command to go on") from None
    return guard()


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
