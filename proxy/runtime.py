"""The running gateway: its parts built from the settings, started, supervised and stopped together.

Each part takes its own section of the settings. The background tasks (policy watcher, relation facts,
key revocations, the audit writer's beat) belong to one `Supervisor`; requests see the parts they need
through an `exchange.Context`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import time
from pathlib import Path

import structlog

from proxy.audit import AuditRecord, AuditUnavailable, Siem, load_public, open_trail
from proxy.cases import Alerter, AlertTarget, CasesStore, GlassBook
from proxy.config import Settings
from proxy.exchange import Context
from proxy.identity import TokenVerifier
from proxy.keys import BEAT_SECONDS, LIVE_SECONDS, KeyEncryptionKey, KeyRing, open_kek, open_keyring
from proxy.metrics import Metrics
from proxy.policy import (
    BundleSource,
    Finding,
    PolicyBundle,
    PolicyError,
    PolicyWatcher,
    RelationIndex,
    Severity,
    load_bundle,
)
from proxy.policy.published import PublishedPolicy
from proxy.postgres import Database, Listener, is_postgres
from proxy.postgres import replicas as replica_rows
from proxy.scrub import ClientNames
from proxy.supervisor import Supervisor, Task
from proxy.upstream import Upstream

log = structlog.get_logger("fieldguard.gateway")

REFRESH_AT_MOST_EVERY = 5.0  # seconds: a record naming an unknown client re-reads the facts, this often at most
LISTEN_CHECK_SECONDS = 2.0  # the change listener proves its connection alive, or reconnects, this often


def shared_database(settings: Settings) -> str | None:
    """The PostgreSQL database the deployment's replicas share (announcements, status rows), if any."""
    for url in (settings.keys.store, settings.policy.store, settings.audit.store):
        if url and is_postgres(url):
            return url
    return None


class Runtime:
    """Everything the gateway is made of. Construct with settings; `start` and `stop` around serving."""

    def __init__(self, settings: Settings, siem: Siem | None = None, bundle: PolicyBundle | None = None) -> None:
        self.settings = settings
        self.proofs = settings.keys.in_dir("proofs")
        policy = settings.policy
        officer = load_public(Path(policy.signing_public_key)) if policy.require_signature else None
        self.published: PublishedPolicy | None = None
        source = BundleSource.configured(policy)
        if policy.store:
            if not is_postgres(policy.store):
                raise PolicyError([Finding("policy.store", None, Severity.ERROR,
                                           "must be a postgresql:// URL, or empty to enforce policy.dir")])
            self.published = PublishedPolicy(policy.store, settings.keys.in_dir("published"))
            source = self.published.first()
        bundle = bundle or load_bundle(source, self.proofs, officer)
        self.metrics = Metrics()
        self.policy = PolicyWatcher(bundle, self.proofs, officer, on_swap=self._swapped, on_failure=self._refused)
        self.shadow: PolicyWatcher | None = None
        if policy.shadow_dir:
            candidate = BundleSource(Path(policy.shadow_dir))
            self.shadow = PolicyWatcher(load_bundle(candidate, self.proofs), self.proofs)
        self.verifier = TokenVerifier(settings.identity)
        self.upstream = Upstream(settings.upstream)
        self.index = RelationIndex()
        encrypted = any(c.key_scope for c in bundle.fieldmap.classes.values())
        self.kek: KeyEncryptionKey | None = open_kek(settings.keys) if encrypted else None
        self.ring: KeyRing | None = None
        self.coming = 0  # requests being served whose audit record is not yet handed to the trail
        self.trail = open_trail(settings, siem, coming=lambda: self.coming)
        self.supervisor = Supervisor()
        self.glass = GlassBook()  # open break-glass grants, re-read from the cases store
        self.cases: CasesStore | None = None
        self.alerter: Alerter | None = None
        self._relations: Task | None = None
        self._policy: Task | None = None
        self.context: Context | None = None
        self.database: Database | None = None  # the shared PostgreSQL, for this replica's status row
        self.listener: Listener | None = None
        self.started_at = time.time()

    @property
    def bundle(self) -> PolicyBundle:
        return self.policy.bundle

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        s = self.settings
        await self.trail.open()
        self.ring = await open_keyring(s.keys, self.kek)
        self.ring.max_age = s.keys.revocation_max_age_seconds
        shared = shared_database(s)
        if shared is not None:
            self.database = await Database.open(shared, max_size=2)
            self.listener = Listener(shared)
            self.listener.on("keys", lambda _: self.wake("revocations"))
            self.listener.on("policy", lambda _: self.wake("policy"))
        if self.published is not None:
            await self.published.open()
        await self.upstream.start()
        c = s.cases
        self.cases = await CasesStore.open(Path(c.store))
        target = AlertTarget(c.alert_url, dict(c.alert_headers), c.alert_timeout_seconds, c.alert_attempts) \
            if c.alert_url else None
        self.alerter = Alerter(self.cases, target)
        await self.glass.refresh(self.cases)
        self.context = Context(
            upstream=self.upstream, index=self.index, ring=self.ring,
            forward_headers=tuple(h.lower() for h in s.upstream.forward_headers),
            max_body_bytes=s.server.max_body_bytes, body_timeout_seconds=s.server.body_timeout_seconds,
            relations_max_age=s.relations.max_age_seconds,
            refresh_soon=self._refresh_soon, names=ClientNames(self.upstream),
            trusted_proxies=frozenset(s.server.trusted_proxies), glass=self.glass,
            restriction_exempt=frozenset(c.restriction_exempt_roles))
        sup = self.supervisor
        poll = s.policy.poll_seconds
        self._policy = sup.add("policy", self._poll_policy, poll, stale_after=max(10 * poll, 60.0))
        self._relations = sup.add("relations", self.refresh_relations, s.relations.refresh_seconds,
                                  stale_after=s.relations.max_age_seconds, max_pause=s.relations.refresh_seconds)
        ring = self.ring
        every = s.keys.revocation_poll_seconds
        sup.add("revocations", ring.poll_revocations, every, stale_after=max(20 * every, 10.0))
        sup.add("keystore", ring.beat, BEAT_SECONDS, stale_after=LIVE_SECONDS)
        cases = self.cases
        sup.add("breakglass", lambda: self.glass.refresh(cases), c.refresh_seconds,
                stale_after=max(10 * c.refresh_seconds, 30.0))
        sup.add("alerts", self.alerter.deliver, 1.0, stale_after=60.0)
        beat = min(s.audit.checkpoint_seconds, 5.0)
        sup.add("audit", self.trail.tick, beat, stale_after=max(6 * beat, 4 * s.audit.timeout_seconds))
        if self.listener is not None:
            sup.add("listener", self.listener.step, LISTEN_CHECK_SECONDS, stale_after=30.0)
            sup.add("replica", self._report, BEAT_SECONDS, stale_after=LIVE_SECONDS)
        await sup.start()
        alerter = self.alerter
        if s.server.pid_file:
            await asyncio.to_thread(Path(s.server.pid_file).write_text, f"{os.getpid()}\n")
        self.metrics.gauge("fieldguard_audit_records", lambda: float(self.trail.health()["records"]))
        self.metrics.gauge("fieldguard_relations_clients", lambda: float(len(self.index.counsellor_of)))
        self.metrics.gauge("fieldguard_breakglass_open", lambda: float(self.glass.open_count(time.time())))
        self.metrics.gauge("fieldguard_breakglass_reviews_overdue", lambda: float(self.glass.overdue))
        self.metrics.gauge("fieldguard_rights_requests_overdue", lambda: float(self.glass.requests_overdue))
        self.metrics.gauge("fieldguard_breakglass_alerts_given_up", lambda: float(alerter.given_up))
        self.metrics.gauge("fieldguard_background_tasks_stale",
                           lambda: float(sum(not t.fresh for t in sup.tasks.values())))
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.request_reload)
        # not "ready": whether it is (the CRM reachable, the relations read, ...) is logged once it listens
        log.info("gateway started", policy=self.bundle.short_hash, upstream=self.upstream.base,
                 routes=len(self.bundle.routes.routes), clients=len(self.index.counsellor_of))

    async def stop(self) -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await self.supervisor.stop()
        if self.listener is not None:
            await self.listener.close()
        if self.published is not None:
            await self.published.close()
        if self.database is not None:
            with contextlib.suppress(Exception):
                await replica_rows.leave(self.database, self.instance)
            await self.database.close()
        await self.upstream.close()
        if self.alerter is not None:
            await self.alerter.close()
        if self.cases is not None:
            await self.cases.close()
        if self.settings.server.pid_file:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(Path(self.settings.server.pid_file).unlink)
        if self.ring is not None:
            with contextlib.suppress(Exception):  # gone from the registry at once, or aged out of it
                await self.ring.leave()
            await self.ring.store.close()
        await self.trail.close()

    @property
    def instance(self) -> str:
        return self.ring.instance if self.ring is not None else ""

    def replica_status(self) -> dict[str, object]:
        """What this replica runs and has caught up to, for the others and `fieldguard status`."""
        ring = self.ring
        audit = self.trail.health()
        return {"policy": self.bundle.short_hash, "policy_digest": self.bundle.digest,
                "policy_version": self.published.version if self.published is not None and
                self.published.digest == self.bundle.digest else None,
                "policy_error": self.policy.status.last_error,
                "key_epoch": ring.revocation_seq if ring is not None else None,
                "listener": self.listener.status() if self.listener is not None else None,
                "audit": {"records": audit.get("records"), "pending": audit.get("pending"),
                          "unsealed": audit.get("unsealed"), "last_commit": audit.get("last_commit"),
                          "ok": audit.get("ok"), "replica": audit.get("replica")},
                "stale_tasks": sorted(n for n, t in self.supervisor.tasks.items() if not t.fresh and n != "replica"),
                "upstream": self.upstream.base}

    async def _report(self) -> None:
        assert self.database is not None and self.ring is not None
        await replica_rows.report(self.database, self.instance, self.ring.host, self.ring.pid, self.started_at,
                                  self.replica_status())

    def wake(self, task: str) -> None:
        """Run a background task's step soon (an alert to deliver now, not at the next beat)."""
        found = self.supervisor.tasks.get(task)
        if found is not None:
            found.wake()

    # ------------------------------------------------------------------ policy
    def request_reload(self) -> None:
        """SIGHUP and `fieldguard policy reload`: load the files again now, watched or not."""
        self.policy.request_reload()
        if self.shadow is not None:
            self.shadow.request_reload()
        if self._policy is not None:
            self._policy.wake()

    async def _poll_policy(self) -> None:
        if self.published is not None:  # a newer published version: loaded, checked and proved as files are
            newer = await self.published.sync()
            if newer is not None:
                self.policy.follow(newer)
        watch = self.settings.policy.watch
        await self.policy.poll(watch)
        if self.shadow is not None:
            await self.shadow.poll(watch)

    async def _swapped(self, old: PolicyBundle, new: PolicyBundle) -> None:
        self.metrics.inc("fieldguard_policy_reloads_total", result="applied")
        await self._policy_event("allowed", f"policy {old.short_hash} replaced by {new.short_hash}", new.digest)

    async def _refused(self, error: PolicyError) -> None:
        self.metrics.inc("fieldguard_policy_reloads_total", result="refused")
        first = "; ".join(str(f) for f in error.findings[:3])
        await self._policy_event("error", f"policy reload refused, previous policy kept: {first}"[:500],
                                 self.bundle.digest)

    async def _policy_event(self, outcome: str, reason: str, digest: str) -> None:
        """Rollouts are audited like accesses: auditors see when the rules changed, and failed attempts."""
        record = AuditRecord(request_id=secrets.token_hex(12), method="POLICY", route="policy reload",
                             outcome=outcome, reason=reason, policy=digest, status=200 if outcome == "allowed" else 409)
        try:
            await self.trail.append(record)
        except AuditUnavailable:
            log.error("policy change could not be audited", outcome=outcome)

    # ------------------------------------------------------------------ relations
    async def refresh_relations(self) -> None:
        """Re-read the need-to-know facts from the CRM; a failure keeps the last facts until they are too old."""
        fm = self.bundle.fieldmap
        await self.index.sync(fm.relations, fm.list_format.items, self.upstream.get_json)

    def _refresh_soon(self) -> None:
        if self._relations is not None:
            self._relations.wake(at_most_every=REFRESH_AT_MOST_EVERY)
