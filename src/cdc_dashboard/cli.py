"""The `cdc-dashboard` command line.

Every command reports operator mistakes (bad configuration, unreachable database, bad arguments) as one line
on stderr and a non-zero exit; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .config import ConfigError, Settings, load_settings
from .errors import UserError

__all__ = ["main"]


def _require_url(settings: Settings) -> str:
    if not settings.database_url:
        raise UserError("CDC_DATABASE_URL is not set (for example postgresql://postgres@127.0.0.1:5432/postgres)")
    return settings.database_url


def cmd_db_apply(args: argparse.Namespace, settings: Settings) -> int:
    from .migrations import apply

    done = apply(_require_url(settings))
    for line in done:
        print(line)
    print("database is up to date" if not done else f"database is up to date ({len(done)} steps)")
    return 0


def cmd_db_status(args: argparse.Namespace, settings: Settings) -> int:
    from .migrations import status

    applied, pending = status(_require_url(settings))
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
    asyncio.run(run_until_signalled(EnhancedRealtimeManager(_require_url(settings), settings)))
    return 0


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from .demo_run import run_demo

    return run_demo(settings, seed=args.seed)


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

    run = commands.add_parser("run", help="zero-setup demo: embedded PostgreSQL, demo data, live dashboard")
    run.add_argument("--seed", type=int, default=254, help="demo data seed (default 254)")
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
