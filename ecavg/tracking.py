"""Live tracking of a run in TensorBoard or MLflow (config key ``tracking.backend``), offline.

A tracker follows the run's ``metrics.jsonl`` records as ``RunDirectory.emit`` writes them (one scalar per
numeric field, named ``<participant>/<phase>/<field>``, the epoch as its step), logs the config as
hyperparameters when the run starts and the results (``results/...``) when it ends. Both backends write local
files only: TensorBoard event files, and an MLflow SQLite store (``mlflow.db``) -- MLflow 3.x refuses the plain
``file:`` store by default (it is in maintenance mode), while SQLite works with every MLflow >= 2.10 and is what
``mlflow ui`` opens. MLflow's usage telemetry is switched off unless the user set it (no network).

A resumed run rebuilds its tracking from metrics.jsonl (the records of finished phases, replayed) and continues
live, so what a tracker holds equals metrics.jsonl even when a phase was interrupted half-way.

This module is imported by the config (``ecavg.core.options`` lists its registry) and imports only leaf modules;
the backends' packages are imported when a run starts, and ``require_backend`` turns a missing one into a
ConfigError before anything runs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping

from ecavg.config.checks import string
from ecavg.errors import ConfigError
from ecavg.registry import Key, Option, Registry

log = logging.getLogger("ecavg")

INSTALL_HINT = "pip install 'ecavg[tracking]'"
_DIR = Key("", string, "where the tracker writes; empty: <output>/tracking; a dir given is shared by runs")
_EXPERIMENT = Key("", string, "MLflow experiment name; empty: the config's name, else 'ecavg'")
# results.json entries that are not results.
_NOT_RESULTS = {"config", "schema", "output_dir", "host"}


def is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def flatten(tree: Mapping[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """Nested tables as one level of ``a.b.c`` keys; a list of tables with a ``name`` is keyed by the names."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, sep, path + sep))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) and "name" in v for v in value):
            for item in value:
                rest = {k: v for k, v in item.items() if k != "name"}
                out.update(flatten(rest, sep, f"{path}{sep}{item['name']}{sep}"))
        else:
            out[path] = value
    return out


def record_scalars(record: Mapping[str, Any]) -> tuple[int, dict[str, float]]:
    """(step, {tag: value}) of one metrics.jsonl record: its epoch (0 when it has none) and numeric fields."""
    step = record.get("epoch", 0)
    step = step if is_scalar(step) else 0
    where = f"{record.get('participant', 'run')}/{record.get('phase', 'run')}"
    values = {f"{where}/{field}": float(v) for field, v in record.items()
              if field not in ("epoch", "participant", "phase") and is_scalar(v)}
    return int(step), values


def result_scalars(results: Mapping[str, Any]) -> dict[str, float]:
    """The numeric figures of a results dict (per-edge before/after, server, timings, bytes) as ``results/...``."""
    flat = flatten({k: v for k, v in results.items() if k not in _NOT_RESULTS}, sep="/", prefix="results/")
    return {k: float(v) for k, v in flat.items() if is_scalar(v)}


def hyperparameters(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config as dotted keys; values that are neither numbers, strings nor booleans as text."""
    return {k: v if isinstance(v, (int, float, str, bool)) else repr(v) for k, v in flatten(cfg).items()}


def tracking_dir(cfg: Mapping[str, Any], run_dir: Path) -> Path:
    return Path(cfg["tracking"]["dir"]) if cfg["tracking"]["dir"] else run_dir / "tracking"


class Tracker(Option):
    """One run's tracking. ``start``/``finish``/``fail`` bracket the run, ``log`` takes each metrics record.

    A backend that fails while the run trains is warned about once and stops; the run and its own outputs go on.
    """

    requires: ClassVar[tuple[str, ...]] = ()  # importable modules the backend needs

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__(cfg)
        self._live = False

    def start(self, cfg: Mapping[str, Any], run_dir: Path, *, resumed: bool = False) -> None:
        try:
            self.open(cfg, run_dir, resumed=resumed)
        except Exception as error:
            raise ConfigError(f"tracking.backend = \"{self.name}\" could not start in "
                              f"{tracking_dir(cfg, run_dir)}: {type(error).__name__}: {error}") from None
        self._live = True

    def log(self, record: Mapping[str, Any]) -> None:
        step, values = record_scalars(record)
        if values:
            self._guarded(self.write_scalars, values, step)

    def finish(self, results: Mapping[str, Any]) -> None:
        self._guarded(self.write_results, result_scalars(results))
        self._guarded(self.close, "FINISHED")
        self._live = False

    def fail(self, status: str) -> None:
        """The run stopped early: ``FAILED`` (an error) or ``KILLED`` (interrupted)."""
        self._guarded(self.close, status)
        self._live = False

    def _guarded(self, write: Any, *args: Any) -> None:
        if not self._live:
            return
        try:
            write(*args)
        except Exception as error:
            self._live = False
            log.warning("tracking (%s) stopped: %s: %s; the run continues, metrics.jsonl has every record",
                        self.name, type(error).__name__, error)

    # What a backend implements.
    def open(self, cfg: Mapping[str, Any], run_dir: Path, *, resumed: bool) -> None: ...

    def write_scalars(self, values: Mapping[str, float], step: int) -> None: ...

    def write_results(self, values: Mapping[str, float]) -> None: ...

    def close(self, status: str) -> None: ...


TRACKERS: Registry[Tracker] = Registry("tracking.backend", "none", what="tracking backend")


@TRACKERS.register
class NoTracking(Tracker):
    name = "none"
    summary = "no live tracking (metrics.jsonl and results.json only)"


@TRACKERS.register
class TensorBoardTracker(Tracker):
    name = "tensorboard"
    summary = "TensorBoard event files in <dir> (needs ecavg[tracking])"
    keys = {"tracking.dir": _DIR}
    requires = ("tensorboard",)

    @staticmethod
    def log_dir(cfg: Mapping[str, Any], run_dir: Path) -> Path:
        return tracking_dir(cfg, run_dir) / run_dir.name if cfg["tracking"]["dir"] else tracking_dir(cfg, run_dir)

    def open(self, cfg: Mapping[str, Any], run_dir: Path, *, resumed: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        log_dir = self.log_dir(cfg, run_dir)
        if resumed:  # the finished phases are replayed from metrics.jsonl; the old events would double them
            for old in log_dir.glob("events.out.tfevents.*"):
                old.unlink()
        self._writer = SummaryWriter(log_dir=str(log_dir))
        # The session's hyperparameters only: TensorBoard's hparams view takes the metrics from the scalars.
        _, start_info, self._end_info = hparams(hyperparameters(cfg), {})
        self._writer.file_writer.add_summary(start_info)
        self._writer.flush()

    def write_scalars(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()  # live: each epoch is on disk when it ends

    def write_results(self, values: Mapping[str, float]) -> None:
        self.write_scalars(values, 0)
        self._writer.file_writer.add_summary(self._end_info)

    def close(self, status: str) -> None:
        self._writer.close()


@TRACKERS.register
class MlflowTracker(Tracker):
    name = "mlflow"
    summary = "MLflow run in a local SQLite store, <dir>/mlflow.db (needs ecavg[tracking])"
    keys = {"tracking.dir": _DIR, "tracking.experiment": _EXPERIMENT}
    # The SQLite store needs SQLAlchemy and Alembic: the full `mlflow` package has them, mlflow-skinny does not.
    requires = ("mlflow", "sqlalchemy", "alembic")
    OUTPUT_TAG = "ecavg.output_dir"

    @staticmethod
    def store_uri(cfg: Mapping[str, Any], run_dir: Path) -> str:
        return f"sqlite:///{(tracking_dir(cfg, run_dir) / 'mlflow.db').resolve()}"

    @staticmethod
    def experiment_name(cfg: Mapping[str, Any]) -> str:
        return cfg["tracking"]["experiment"] or cfg["name"] or "ecavg"

    def open(self, cfg: Mapping[str, Any], run_dir: Path, *, resumed: bool) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # offline: no usage reports
        from mlflow.tracking import MlflowClient

        store = tracking_dir(cfg, run_dir)
        store.mkdir(parents=True, exist_ok=True)
        self._client = client = MlflowClient(tracking_uri=self.store_uri(cfg, run_dir))
        name = self.experiment_name(cfg)
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(
            name, artifact_location=(store / "mlartifacts").resolve().as_uri())
        output = str(run_dir.resolve())
        if resumed:  # a fresh MLflow run replays metrics.jsonl; the interrupted one would hold the cut phase twice
            for old in self._runs_of(experiment_id, output):
                client.delete_run(old)
        self._run_id = client.create_run(experiment_id, run_name=run_dir.name,
                                         tags={self.OUTPUT_TAG: output}).info.run_id
        self._results_file = run_dir / "results.json"
        from mlflow.entities import Param

        params = [Param(k, str(v)) for k, v in hyperparameters(cfg).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(self._run_id, params=params[i:i + 100])

    def _runs_of(self, experiment_id: str, output: str) -> Iterator[str]:
        token = None
        while True:
            page = self._client.search_runs([experiment_id], max_results=1000, page_token=token)
            yield from (run.info.run_id for run in page if run.data.tags.get(self.OUTPUT_TAG) == output)
            token = page.token
            if not token:
                return

    def write_scalars(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self._run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def write_results(self, values: Mapping[str, float]) -> None:
        self.write_scalars(values, 0)
        if self._results_file.is_file():
            self._client.log_artifact(self._run_id, str(self._results_file))

    def close(self, status: str) -> None:
        self._client.set_terminated(self._run_id, status)


def require_backend(cfg: Mapping[str, Any]) -> None:
    """ConfigError unless the configured backend's packages are installed (called before a run starts)."""
    tracker = TRACKERS.get(cfg["tracking"]["backend"])
    missing = [m for m in tracker.requires if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"tracking.backend = \"{tracker.name}\" needs {', '.join(missing)}, which "
                          f"{'is' if len(missing) == 1 else 'are'} not installed; install with: {INSTALL_HINT}")


def make_tracker(cfg: Mapping[str, Any]) -> Tracker:
    return TRACKERS.get(cfg["tracking"]["backend"])(cfg)
