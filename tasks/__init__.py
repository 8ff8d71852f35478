"""Prefect tasks over the engine's steps. Importing the package registers the control
plane's Prefect Secret resolver (see tasks.prefect_secrets) and its flow-run state
checker (tasks.prefect_state) into the engine."""

from tasks import prefect_secrets as _prefect_secrets  # noqa: F401 - registers on import
from tasks import prefect_state as _prefect_state  # noqa: F401 - registers on import
