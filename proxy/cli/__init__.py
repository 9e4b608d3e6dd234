"""The `fieldguard` command line, one module per command group: `run` (serve, demo, token), `keys` (keys and
the CRM migration), `policy`, `audit`, `review` (break-glass reviews), `disclose` and `consent`, `restrict`,
`sar`, `retention`, `erase`, `db` and `status` (the shared PostgreSQL)."""

from __future__ import annotations

import click

from proxy.cli.audit import audit
from proxy.cli.db import db, status
from proxy.cli.disclose import consent, disclose
from proxy.cli.keys import decrypt_export, encrypt_existing, keys
from proxy.cli.policy import policy
from proxy.cli.retention import erase, retention
from proxy.cli.review import review
from proxy.cli.rights import rectify, restrict, unrestrict
from proxy.cli.run import demo, serve, token
from proxy.cli.sar import sar


@click.group()
@click.version_option(package_name="fieldguard")
def main() -> None:
    """FieldGuard: need-to-know field redaction, encryption and audit in front of a client CRM."""


for command in (serve, demo, token, keys, encrypt_existing, decrypt_export, policy, audit, review, disclose,
                consent, restrict, unrestrict, sar, retention, erase, rectify, db, status):
    main.add_command(command)
