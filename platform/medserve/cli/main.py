"""`medserve`: validate specs, manage the database and keys, bring the platform up and down.

This module only assembles the CLI; each room of commands lives in its own module here.
"""

from __future__ import annotations

import click

from medserve.cli.audit import audit
from medserve.cli.bench import bench
from medserve.cli.cluster import cluster
from medserve.cli.common import fail
from medserve.cli.database import db
from medserve.cli.keys import keys
from medserve.cli.models import models
from medserve.cli.rollouts import apply_command, promote, rollback, rollout
from medserve.cli.serving import down, up
from medserve.cli.specs import artifact, render, schema, validate
from medserve.cli.targets import reconcile, status
from medserve.errors import MedserveError


def main() -> None:
    try:
        cli(standalone_mode=True)
    except MedserveError as error:
        fail(f"error [{error.code}]: {error.message}")


@click.group()
def cli() -> None:
    """medserve: audited, access-controlled serving of clinical AI models on Ray Serve."""


for _command in (
    validate, schema, render, artifact,  # specs
    db, keys, audit,  # the database, its keys and its audit trail
    up, down, reconcile, status,  # the platform on a cluster
    models, rollout, promote, rollback, apply_command,  # the registry and rollouts
    cluster, bench,
):
    cli.add_command(_command)


if __name__ == "__main__":
    main()
