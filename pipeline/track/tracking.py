"""MLflow bookkeeping: one parent run per pipeline execution (or DVC experiment), nested runs per
model and round. Stages run as separate processes, so the parent is found again by a key tag."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from pipeline.core.config import Params, flatten  # noqa: E402
from pipeline.core.store import artifact_root, check_tracking, sqlite_file  # noqa: E402

PARENT_KEY = "iet_agc.pipeline_key"
_TRACKERS: list["Tracker"] = []  # of this process, so that a failing stage can close what it opened


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def fail_open_runs(status: str = "FAILED") -> None:
    """Mark every run this process opened and did not finish, and the pipeline's parent run, as
    `status`: a failed stage must not leave runs RUNNING. A later stage of the same pipeline
    execution reopens the parent (Tracker._parent)."""
    for tracker in _TRACKERS:
        try:
            for run_id in tracker.open_runs:
                tracker.client.set_terminated(run_id, status)
            # a parent the report already finished stays so (register runs after it)
            if tracker.client.get_run(tracker.parent_id).info.status == "RUNNING":
                tracker.client.set_terminated(tracker.parent_id, status)
        except MlflowException:
            pass  # the store may be what failed; the original error is the one to report
        tracker.open_runs.clear()
    _TRACKERS.clear()


def pause_parents() -> None:
    """After a stage succeeded: its pipeline's parent run, if still RUNNING, becomes SCHEDULED (more
    stages to come; the report finishes it). So the parent is RUNNING only while a stage runs, and
    a later stage that dies before it can say so (a crash at import, SIGKILL) leaves no run RUNNING."""
    for tracker in _TRACKERS:
        try:
            if tracker.client.get_run(tracker.parent_id).info.status == "RUNNING":
                tracker.client.update_run(tracker.parent_id, status="SCHEDULED")
        except MlflowException:
            pass  # the stage's work is done and saved; a store that fails now fails the next stage's check
    _TRACKERS.clear()


@contextmanager
def _first_use(uri: str) -> Iterator[None]:
    """One process at a time opens a SQLite store: the first opening creates its tables, and two
    queued experiments doing it at once (`dvc queue start -j 2` on a new store) make the second
    fail with `table runs already exists`. The lock file sits beside the store."""
    path = sqlite_file(uri)
    if path is None:
        yield
        return
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class Tracker:
    def __init__(self, params: Params):
        self.params = params
        self.open_runs: list[str] = []
        uri = check_tracking(params.tracking)
        with _first_use(uri):
            self.client = MlflowClient(tracking_uri=uri)
            exp = self.client.get_experiment_by_name(params.tracking.experiment)  # creates a new store
        if exp is None:
            try:
                self.experiment_id = self.client.create_experiment(params.tracking.experiment,
                                                                   artifact_location=artifact_root(uri))
            except MlflowException:  # created meanwhile by a concurrent experiment
                self.experiment_id = self.client.get_experiment_by_name(params.tracking.experiment).experiment_id
        else:
            self.experiment_id = exp.experiment_id
        self.parent_id = self._parent()
        _TRACKERS.append(self)

    def _parent(self) -> str:
        exp_name = os.environ.get("DVC_EXP_NAME")
        commit = _git_commit()
        # not the tracking group: where results go does not make another pipeline run, so a stage that
        # re-runs for a new tracking.alias (register) joins the run whose models it registers
        digest = hashlib.sha256((json.dumps(self.params.model_dump(exclude={"tracking"}), sort_keys=True)
                                 + commit).encode())
        key = exp_name or f"repro-{digest.hexdigest()[:12]}"
        found = self.client.search_runs([self.experiment_id], f"tags.`{PARENT_KEY}` = '{key}'",
                                        max_results=1, order_by=["attributes.start_time DESC"])
        if found:
            if found[0].info.status in ("FAILED", "KILLED", "SCHEDULED"):  # an earlier stage ended, or failed
                self.client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
        tags = {PARENT_KEY: key, "git_commit": commit}
        if exp_name:
            tags["dvc_exp_name"] = exp_name
        run = self.client.create_run(self.experiment_id, run_name=exp_name or key, tags=tags)
        self.log_params(run.info.run_id, flatten(self.params))
        return run.info.run_id

    def child(self, name: str, parent: str | None = None) -> str:
        """A new nested run `name`. A run of that name under the same parent still RUNNING is an
        attempt that was killed before it could close it (SIGKILL): it is marked KILLED."""
        parent = parent or self.parent_id
        stale = self.client.search_runs([self.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}' and "
                                        f"attributes.run_name = '{name}' and attributes.status = 'RUNNING'")
        for run in stale:
            self.client.set_terminated(run.info.run_id, "KILLED")
        run = self.client.create_run(self.experiment_id, run_name=name, tags={"mlflow.parentRunId": parent})
        self.open_runs.append(run.info.run_id)
        return run.info.run_id

    def reopen(self, name: str, parent: str | None = None) -> str | None:
        """The newest nested run `name` under the parent, RUNNING again (a model's run, which each
        of its round stages reopens); None when there is none."""
        parent = parent or self.parent_id
        found = self.client.search_runs([self.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}' and "
                                        f"attributes.run_name = '{name}'", max_results=1,
                                        order_by=["attributes.start_time DESC"])
        if not found:
            return None
        run_id = found[0].info.run_id
        self.client.update_run(run_id, status="RUNNING")
        self.open_runs.append(run_id)
        return run_id

    def pause(self, run_id: str) -> None:
        """A run with more stages to come (a model's run between its round stages): SCHEDULED, so that
        nothing is RUNNING while no stage runs."""
        self.client.update_run(run_id, status="SCHEDULED")
        if run_id in self.open_runs:
            self.open_runs.remove(run_id)

    def log_checkpoint(self, run_id: str, model_dir: Path, name: str, step: int, metrics: dict) -> str:
        """A saved model (a diffusers save_pretrained folder) as an MLflow 3 logged model of run
        `run_id` at `step`, with `metrics` logged at that step and linked to it; returns its id. The
        folder alone, no pyfunc wrapper (the registered final models have one): seconds cheaper a
        round, and pipeline.core.fetch.load_diffusers finds the folder in its artifacts."""
        from mlflow.entities import LoggedModelOutput

        experiment = self.client.get_run(run_id).info.experiment_id
        logged = self.client.create_logged_model(experiment, name=name, source_run_id=run_id, tags={"step": str(step)})
        try:
            self.client.log_model_artifacts(logged.model_id, str(model_dir))
        except BaseException:
            self.client.finalize_logged_model(logged.model_id, "FAILED")
            raise
        self.client.finalize_logged_model(logged.model_id, "READY")
        self.client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)])
        now = int(time.time() * 1000)
        self._send(run_id, [Metric(k, float(v), now, step, model_id=logged.model_id) for k, v in metrics.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)])
        return logged.model_id

    def log_params(self, run_id: str, values: dict) -> None:
        items = [Param(k, str(v)) for k, v in values.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str, values: dict, step: int = 0) -> None:
        now = int(time.time() * 1000)
        self._send(run_id, [Metric(k, float(v), now, step) for k, v in values.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)])

    def log_curve(self, run_id: str, rows: list[dict]) -> None:
        """Curve points by step (every value but the step and where it was taken), one batched
        call: per-call metric logging on SQLite is slow."""
        now = int(time.time() * 1000)
        self._send(run_id, [Metric(k, float(v), now, int(r["step"])) for r in rows for k, v in r.items()
                            if k not in ("round", "proxy", "step")])

    def _send(self, run_id: str, metrics: list[Metric]) -> None:
        for i in range(0, len(metrics), 1000):  # MLflow's per-call limit
            self.client.log_batch(run_id, metrics=metrics[i:i + 1000])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)
        if run_id in self.open_runs:
            self.open_runs.remove(run_id)

    def log_data(self, run_id: str, files: dict[str, str | Path]) -> None:
        """The prepared arrays a run read, as MLflow datasets (context -> .npz file): the UI's
        Datasets column, and runs on different data told apart by the file's digest."""
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        inputs = []
        for context, path in files.items():
            path = Path(path)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            with np.load(path, allow_pickle=False) as z:
                images, labels = z["images"], z["labels"]
            with warnings.catch_warnings():  # MLflow registers its local-file source twice and says so
                warnings.simplefilter("ignore", UserWarning)
                ds = mlflow.data.from_numpy(images, targets=labels, source=str(path.resolve()),
                                            name=f"{self.params.data.source}/{path.stem}", digest=digest)
            inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]))
        self.client.log_inputs(run_id, datasets=inputs)

    @contextmanager
    def system_metrics(self, run_id: str, interval: float = 10.0) -> Iterator[None]:
        """CPU, memory, disk, network (and GPU where present) of the block, with MLflow's own
        monitor; at least one sample even when the block is shorter than the interval."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, tracking_uri=self.client.tracking_uri)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()
            if monitor._logging_step == 0:  # the block ended before the monitor's first sample
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()


class TrainingHooks:
    """Reports the round loop to MLflow: a nested run per (round, proxy) with its curve, and round
    metrics plus the loss table and moves on the model's run."""

    def __init__(self, tracker: Tracker, run_id: str):
        self.tracker, self.run_id = tracker, run_id

    def proxy_round(self, rnd: int, proxy: int, curve: list[dict]) -> None:
        child = self.tracker.child(f"round {rnd} proxy {proxy}", parent=self.run_id)
        self.tracker.log_curve(child, curve)
        self.tracker.finish(child)

    logs_models = True

    def round_done(self, rnd: int, metrics: dict, folder: Path, averaged: Path | None = None) -> None:
        """Round `rnd`'s metrics (step: the round, from 0), linked to its averaged model (`averaged`,
        a saved pipeline) logged as the run's model at that step, and its profile folder's tables,
        with a histogram of the skip rates, under rounds/round_<r> of the model's run."""
        if averaged is None:
            self.tracker.log_metrics(self.run_id, metrics, step=rnd)
        else:
            self.tracker.log_checkpoint(self.run_id, averaged, f"round {rnd + 1}", rnd, metrics)
        where = f"rounds/round_{rnd + 1}"
        for name in ("loss_table.csv", "moves.csv", "round.json"):
            if (folder / name).is_file():
                self.tracker.log_artifact(self.run_id, folder / name, where)
        table = folder / "loss_table.csv"
        if table.is_file():
            from pipeline.core.figures import save_skip_histogram

            skip = np.genfromtxt(table, delimiter=",", names=True)["skip_rate"]
            with tempfile.TemporaryDirectory() as tmp:  # not into the folder: it is a DVC output
                save_skip_histogram(np.atleast_1d(skip), Path(tmp) / "skip_rate_hist.png")
                self.tracker.log_artifact(self.run_id, Path(tmp) / "skip_rate_hist.png", where)
