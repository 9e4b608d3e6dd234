"""`fieldguard serve`, `demo` and `token`: running the gateway, and the demo's tokens."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from proxy.cli.options import CONFIG, settings_of

PURPOSE_PREFERENCE = ("TREAT", "HOPERAT", "HRESCH", "PATRQT", "ETREAT", "HLEGAL")


@click.command()
@CONFIG
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="gateway processes on the port (one per core); they share the keystore, trail and policy")
def serve(config: Path | None, workers: int) -> None:
    """Run the gateway."""
    if workers > 1:
        from proxy import logs
        from proxy.workers import supervise

        settings = settings_of(config)
        logs.configure(settings.server.log_level)
        sys.exit(supervise(settings, ["--config", str(config)] if config else [], workers))
    from proxy.server import run

    sys.exit(run(settings_of(config)))


@click.command()
@click.option("--sub", required=True, help="the user, as the CRM knows them (alice)")
@click.option("--role", "roles", multiple=True, required=True, help="a role; repeat for several")
@click.option("--purpose", "purposes", multiple=True,
              help="purpose of use (default: the first the policy allows the role)")
@click.option("--client-id", help="for the client role: the client's CRM id")
@click.option("--ttl", default=3600, show_default=True, help="seconds until the token expires")
@CONFIG
def token(sub: str, roles: tuple[str, ...], purposes: tuple[str, ...], client_id: str | None, ttl: int,
          config: Path | None) -> None:
    """Mint a demo token signed with identity.demo_signing_key_file."""
    from proxy.policy import BundleSource, load_bundle
    from proxy.tokens import mint_token

    settings = settings_of(config)
    key_file = settings.identity.demo_signing_key_file
    if not key_file:
        raise click.ClickException("identity.demo_signing_key_file is not set (tokens come from your IdP)")
    chosen = list(purposes)
    if not chosen:
        table = load_bundle(BundleSource.configured(settings.policy), settings.keys.in_dir("proofs")).table
        allowed = {p for r in roles for p in table.purposes.get(r, frozenset())}
        chosen = [next((p for p in PURPOSE_PREFERENCE if p in allowed), sorted(allowed)[0])] if allowed else []
    click.echo(mint_token(
        Path(key_file).read_bytes(), subject=sub, roles=list(roles), issuer=settings.identity.issuer,
        audience=settings.identity.audience, purposes=chosen, client_id=client_id, ttl_seconds=ttl,
    ))


@click.command()
@click.option("--port", default=8000, show_default=True, help="gateway port on 127.0.0.1")
@click.option("--crm-port", default=8100, show_default=True, help="example CRM port on 127.0.0.1")
@click.option("--alerts-port", default=8200, show_default=True,
              help="the demo's break-glass alert receiver on 127.0.0.1 (examples/webhook.py)")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where the demo keeps its CRM database and audit log (default: ./demo-data)")
@click.option("--reset", is_flag=True, help="start from a freshly seeded CRM")
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where the demo keeps its keys (default: keys/ in the repository)")
def demo(port: int, crm_port: int, alerts_port: int, data_dir: Path | None, reset: bool,
         keys_dir: Path | None) -> None:
    """Start the example CRM and the gateway in front of it; print a curl line per demo user."""
    from proxy.demo import run_demo

    sys.exit(run_demo(port=port, crm_port=crm_port, data_dir=data_dir, reset=reset, keys=keys_dir,
                      alerts_port=alerts_port))
