"""MLflow, through ``MlflowClient`` and the tracking URI in effect in the notebook.

The URI is whatever MLflow itself would use here: ``mlflow.set_tracking_uri(...)`` from
a cell, else ``MLFLOW_TRACKING_URI``, else MLflow's default (``sqlite:///mlflow.db``
since MLflow 3.7, which needs SQLAlchemy: the ``mlflow`` package, or ``mlflow-skinny``
plus ``sqlalchemy`` and ``alembic``; the older ``./mlruns`` file store is deprecated).
The client API with explicit run ids is used, not ``mlflow.start_run``, so a run the
notebook has open itself is neither reused nor ended.

The experiment is ``project_name``; a run per attempt, tagged ``notebook_launcher.attempt``.
init_kwargs (HF accelerate's): ``run_name``, ``tags``, ``description``, ``experiment_name``.
Status: FINISHED, FAILED, or KILLED (interrupted or stopped).
"""

from __future__ import annotations

import time

from .base import RunSettings, numbers_and_text, scalar_params

_STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "interrupted": "KILLED", "stopped": "KILLED"}
_METRICS_PER_CALL = 1000   # MLflow's log_batch limits
_PARAMS_PER_CALL = 100


class MLflowRun:
    name = "mlflow"

    def __init__(self, settings: RunSettings) -> None:
        from mlflow import MlflowClient

        kwargs = dict(settings.init_kwargs)
        self.client = MlflowClient()
        experiment_id = self._experiment_id(kwargs.pop("experiment_name", settings.project_name))
        run_name = kwargs.pop("run_name", None)
        tags = {**kwargs.pop("tags", {}), "notebook_launcher.attempt": str(settings.attempt)}
        if "description" in kwargs:
            tags["mlflow.note.content"] = kwargs.pop("description")
        if kwargs:
            raise TypeError(f"unsupported MLflow init_kwargs: {', '.join(kwargs)} "
                            "(run_name, tags, description, experiment_name are)")
        run = self.client.create_run(experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        self.skipped: dict = {}   # what MLflow could not store (an ordered set), for the hub to mention
        if settings.config:
            self.store_config(settings.config)

    def _experiment_id(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # another process created it in between
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def store_config(self, config: dict) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        params = []
        for key, value in scalar_params(config).items():
            if len(str(value)) > MAX_PARAM_VAL_LENGTH:
                self.skipped[f"param {key!r} (longer than MLflow's {MAX_PARAM_VAL_LENGTH} characters)"] = None
                continue
            params.append(Param(key, str(value)))
        for start in range(0, len(params), _PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=params[start:start + _PARAMS_PER_CALL])

    def log_many(self, entries: list) -> None:
        """One log_batch for many steps; if MLflow refuses it (log_batch is all or nothing),
        step by step, so that one bad value costs only its own step. Raises the first error."""
        try:
            self._log_metrics(entries)
        except Exception:
            if len(entries) == 1:
                raise
            errors = []
            for entry in entries:
                try:
                    self._log_metrics([entry])
                except Exception as exc:
                    errors.append(exc)
            if errors:
                raise errors[0]

    def _log_metrics(self, entries: list) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = []
        for values, step, _kwargs in entries:
            numbers, text = numbers_and_text(values)
            metrics.extend(Metric(key, float(value), now, step) for key, value in numbers.items())
            self.skipped.update(dict.fromkeys(f"{key!r} (MLflow metrics are numbers; got text)" for key in text))
        for start in range(0, len(metrics), _METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + _METRICS_PER_CALL])

    def flush(self) -> None:
        pass  # log_batch is synchronous

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=_STATUS[status])


open_run = MLflowRun
