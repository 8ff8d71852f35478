"""Prefect deployments of every vmrep flow and the local server they are served from.

- `python -m deployments.serve`   (`make server`): all deployments, schedules, the alert automation
- `python -m deployments.server start|stop|status`: the local Prefect server alone
- `python -m deployments.demo`    (`make demo`): the whole product in about a minute
- `deployments.params`: the pydantic parameter models behind the UI's forms

See docs/operations.md.
"""
