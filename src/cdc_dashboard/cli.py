"""The `cdc-dashboard` command line.

Every command reports operator mistakes (bad configuration, unreachable database, bad arguments) as one line
on stderr and a non-zero exit; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .config import ConfigError, Settings, load_settings, signing_secret
from .errors import UserError

__all__ = ["main"]


def cmd_db_apply(args: argparse.Namespace, settings: Settings) -> int:
    from .migrations import apply

    done = apply(settings.require_database_url())
    for line in done:
        print(line)
    print("database is up to date" if not done else f"database is up to date ({len(done)} steps)")
    return 0


def cmd_db_status(args: argparse.Namespace, settings: Settings) -> int:
    from .migrations import status

    applied, pending = status(settings.require_database_url())
    for migration in applied:
        print(f"applied  {migration.version}  {migration.applied_at:%Y-%m-%d %H:%M:%S%z}  {migration.checksum[:12]}")
    for name in pending:
        print(f"pending  {name}")
    return 1 if pending else 0


def cmd_listen(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from .listener import EnhancedRealtimeManager, run_until_signalled
    from .logs import configure_logging

    configure_logging(settings.log_level)
    asyncio.run(run_until_signalled(EnhancedRealtimeManager(settings)))
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from .gateway.app import serve
    from .logs import configure_logging

    if not settings.secret:
        raise UserError("CDC_SECRET is not set: serve signs and checks dashboard tokens with it (32+ characters)")
    settings.require_database_url()  # fail before anything starts
    configure_logging(settings.log_level)
    return serve(settings, with_listener=args.with_listener)


def cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    from .tokens import MAX_TTL_SECONDS, create_token

    secret = signing_secret(settings, admin=args.admin)
    if not secret:
        raise UserError("CDC_SECRET is not set: tokens are signed with it (the gateway must use the same one)")
    if not args.business_ids and not args.admin:
        raise UserError("name at least one BUSINESS_ID (or --admin for all businesses)")
    if not 0 < args.ttl <= MAX_TTL_SECONDS:
        # The cap bounds how long a rotated-out key must stay in CDC_SECRET_PREVIOUS (tokens.py).
        raise UserError(f"--ttl must be from 1 to {MAX_TTL_SECONDS} seconds (366 days); got {args.ttl}")
    try:
        print(create_token(secret, args.business_ids, args.ttl, admin=args.admin))
    except ValueError as exc:
        raise UserError(f"cannot make a token: {exc} (business ids are UUIDs)") from None
    return 0


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from .demo.run import run_demo

    return run_demo(settings, seed=args.seed, rate=args.rate)


def cmd_simulate(args: argparse.Namespace, settings: Settings) -> int:
    from .demo.traffic import SimulateOptions, run_simulation

    options = SimulateOptions(
        rate=args.rate,
        duration=args.duration,
        businesses=args.businesses,
        direct=args.direct,
        url=args.url,
        seed=args.seed,
    )
    settings.require_database_url()  # a missing database is said first, before the options are checked
    return run_simulation(settings, options)


def cmd_aggregates_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    from .figures.rebuild import run_rebuild

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    # Progress on stderr while it runs; stdout keeps the report (repairs, summary) that scripts read.
    for line in run_rebuild(settings.require_database_url(), args.business, progress):
        print(line)
    return 0


def cmd_dead_letters_list(args: argparse.Namespace, settings: Settings) -> int:
    from .ops.dead_letters import run_list

    return run_list(settings.require_database_url(), as_json=args.json)


def cmd_dead_letters_retry(args: argparse.Namespace, settings: Settings) -> int:
    from .ops.dead_letters import parse_ids, run_retry

    if args.all and args.ids:
        raise UserError("name dead letter IDs or --all, not both")
    if not args.all and not args.ids:
        raise UserError("name the dead letter IDs to retry (cdc-dashboard dead-letters list shows them), or --all")
    ids = None if args.all else parse_ids(args.ids)
    return run_retry(settings.require_database_url(), ids)


def cmd_dead_letters_discard(args: argparse.Namespace, settings: Settings) -> int:
    from .ops.dead_letters import parse_ids, run_discard

    if not args.ids:
        raise UserError("name the dead letter IDs to discard (cdc-dashboard dead-letters list shows them)")
    ids = parse_ids(args.ids)
    return run_discard(settings.require_database_url(), ids)


def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    from .ops.doctor import run_doctor

    return run_doctor(settings, gateway_url=args.url, as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdc-dashboard", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"cdc-dashboard {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db = commands.add_parser("db", help="database schema and capture triggers")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")
    db_commands.add_parser("apply", help="apply sql/schema and sql/triggers (idempotent)").set_defaults(
        handler=cmd_db_apply
    )
    db_commands.add_parser("status", help="list applied and pending migrations").set_defaults(handler=cmd_db_status)

    commands.add_parser(
        "listen", help="the listener daemon: captured changes -> events and fresh aggregates (systemd Type=notify)"
    ).set_defaults(handler=cmd_listen)

    serve = commands.add_parser("serve", help="the SSE gateway and HTTP API")
    serve.add_argument("--with-listener", action="store_true", help="run the listener in the same process")
    serve.set_defaults(handler=cmd_serve)

    token = commands.add_parser("token", help="print a signed dashboard token for these businesses")
    token.add_argument("business_ids", nargs="*", metavar="BUSINESS_ID", help="business UUIDs the token may see")
    token.add_argument(
        "--ttl",
        type=int,
        default=86400,
        metavar="SECONDS",
        help="lifetime, at most 31622400 = 366 days (default 86400)",
    )
    token.add_argument("--admin", action="store_true", help="all businesses, plus /v1/status")
    token.set_defaults(handler=cmd_token)

    simulate = commands.add_parser(
        "simulate", help="realistic payment traffic: signed Paystack and M-Pesa webhooks (or --direct inserts)"
    )
    simulate.add_argument("--rate", type=float, default=2.0, metavar="N", help="payments per second (default 2)")
    simulate.add_argument(
        "--duration", type=float, default=0.0, metavar="S", help="stop after S seconds (default: until Ctrl-C)"
    )
    simulate.add_argument("--businesses", type=int, default=3, metavar="N", help="businesses paid (default 3)")
    simulate.add_argument(
        "--direct", action="store_true", help="record through cdc_dashboard.ingest in the database, no gateway"
    )
    simulate.add_argument(
        "--url", metavar="GATEWAY", help="gateway base URL (default http://CDC_HTTP_HOST:CDC_HTTP_PORT)"
    )
    simulate.add_argument("--seed", type=int, default=None, help="random seed (default: a new run each time)")
    simulate.set_defaults(handler=cmd_simulate)

    aggregates = commands.add_parser("aggregates", help="the precomputed figures")
    aggregates_commands = aggregates.add_subparsers(dest="aggregates_command", required=True, metavar="AGG_COMMAND")
    rebuild = aggregates_commands.add_parser(
        "rebuild", help="recompute figures from the base tables, report repairs, emit invalidations"
    )
    rebuild.add_argument("--business", action="append", metavar="ID", help="only this business (repeatable)")
    rebuild.set_defaults(handler=cmd_aggregates_rebuild)

    dead_letters = commands.add_parser(
        "dead-letters", help="changes the listener set aside (with their errors): list, retry, discard"
    )
    dead_letters_commands = dead_letters.add_subparsers(
        dest="dead_letters_command", required=True, metavar="DEAD_LETTERS_COMMAND"
    )
    dead_list = dead_letters_commands.add_parser("list", help="the dead letters, oldest first, with their reasons")
    dead_list.add_argument("--json", action="store_true", help="print them as a JSON array")
    dead_list.set_defaults(handler=cmd_dead_letters_list)
    dead_retry = dead_letters_commands.add_parser(
        "retry", help="put these changes back in the pipeline (after fixing the cause), in one transaction"
    )
    # Ids are parsed by the handler: a bad one is then a one-line error, like every other mistake.
    dead_retry.add_argument("ids", nargs="*", metavar="ID", help="dead letter ids (from dead-letters list)")
    dead_retry.add_argument("--all", action="store_true", help="every dead letter waiting")
    dead_retry.set_defaults(handler=cmd_dead_letters_retry)
    dead_discard = dead_letters_commands.add_parser(
        "discard", help="delete these dead letters, in one transaction, printing each one whole"
    )
    dead_discard.add_argument("ids", nargs="*", metavar="ID", help="dead letter ids (from dead-letters list)")
    dead_discard.set_defaults(handler=cmd_dead_letters_discard)

    doctor = commands.add_parser(
        "doctor", help="check that realtime works end to end: each failure says what to do (exit 0: all pass)"
    )
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.add_argument(
        "--url", metavar="GATEWAY", help="gateway base URL (default http://CDC_HTTP_HOST:CDC_HTTP_PORT)"
    )
    doctor.set_defaults(handler=cmd_doctor)

    run = commands.add_parser("run", help="zero-setup demo: embedded PostgreSQL, demo data, live dashboard")
    run.add_argument("--seed", type=int, default=254, help="demo data seed (default 254)")
    run.add_argument(
        "--rate", type=float, default=0.5, help="simulated payment activities per second (default 0.5; 0: none)"
    )
    run.set_defaults(handler=cmd_run)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        handler: Callable[[argparse.Namespace, Settings], int] = args.handler
        return handler(args, settings)
    except (ConfigError, UserError) as exc:
        print(f"cdc-dashboard: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
