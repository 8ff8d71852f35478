"""Prefect tasks over the engine's steps. Importing the package registers the control
plane's Prefect Secret resolver into the engine (see tasks.prefect_secrets)."""

from tasks import prefect_secrets as _prefect_secrets  # noqa: F401 - registers on import
