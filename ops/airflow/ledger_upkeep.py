"""Nightly upkeep of the ledger's days in PostgreSQL, for an Airflow
deployment (Airflow 3; the seeds' stack runs Airflow).

Each task calls the ledger writer's own command line, so the rules live in
one place (ledger-writer/src/archive.rs and retention.rs), not here:

    partitions  create today's and the next days' ledger partitions
    archive     write every closed day (before today, UTC) to the archive as
                Parquet, one file and manifest per day and ledger partition;
                a day already archived gains only what it lacked
    verify      read every closed day's files back against their manifests
                and PostgreSQL; fails the run on any problem
    retention   drop the days past ledger_writer.raw_retention_days that the
                archive verifies (their curated history and carried balances
                written in the same transaction), and curated history past
                ledger_writer.history_retention_days
    history     write the curated daily history of the days PostgreSQL still
                holds

A failed task stops the ones after it: nothing is dropped after a failed
archive or verify (and retention checks again itself). Every command is
idempotent, so a retry or a manual re-run is safe.

Settings, from the worker's environment:
    INVGW_LEDGER_WRITER   the ledger-writer binary (default: ledger-writer)
    INVGW_CONFIG          its config file (default: /etc/invgw/config.toml)
    and the config's own overrides (INVGW_POSTGRES_URL, INVGW_REDIS_URL, AWS_*
    for an S3 archive).
"""

from datetime import datetime, timedelta

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG

WRITER = '"${INVGW_LEDGER_WRITER:-ledger-writer}" --config "${INVGW_CONFIG:-/etc/invgw/config.toml}"'

with DAG(
    dag_id="invgw_ledger_upkeep",
    description="Archive, verify and drop the ledger's closed days; curated history",
    schedule="30 1 * * *",  # 01:30 UTC: the previous day is closed
    start_date=datetime(2026, 12, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=10)},
    tags=["invgw", "ledger"],
) as dag:
    commands = {
        "partitions": "partitions",
        "archive": "archive",
        "verify": "verify",
        "retention": "retention --apply",
        "history": "history",
    }
    tasks = [
        BashOperator(task_id=task_id, bash_command=f"{WRITER} {arguments}")
        for task_id, arguments in commands.items()
    ]
    for upstream, downstream in zip(tasks, tasks[1:]):
        upstream >> downstream
