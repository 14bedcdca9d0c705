"""``ctrd`` command line: run the daemon, or print its default configuration."""
from __future__ import annotations

import argparse
import asyncio
import sys

import structlog

from ctrd.errors import CtrdError

from . import logconfig
from .config import DEFAULT_TOML, Config
from .runtime import publish
from .server import Daemon


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctrd", description="A containerd-compatible daemon.")
    p.add_argument("--config", "-c", help="TOML configuration file")
    p.add_argument("--root", help="persistent state folder (default /var/lib/ctrd)")
    p.add_argument("--state", help="runtime state folder (default /run/ctrd)")
    p.add_argument("--address", "-a", help="gRPC socket (default /run/ctrd/ctrd.sock)")
    p.add_argument("--log-level", "-l", help="debug, info, warn or error")
    p.add_argument("--log-format", choices=["console", "json"])
    sub = p.add_subparsers(dest="command")
    cfg = sub.add_parser("config", help="configuration helpers")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    cfg_sub.add_parser("default", help="print the default configuration")
    publish.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "config":
        sys.stdout.write(DEFAULT_TOML)
        return 0
    if args.command == "publish":
        address = args.address or Config.load(args.config).address
        return publish.publish(address, args.namespace, args.topic, sys.stdin.buffer)
    try:
        config = Config.load(args.config)
        for name in ("root", "state", "address", "log_level", "log_format"):
            value = getattr(args, name)
            if value:
                setattr(config, name, value)
        logconfig.configure(config.log_level, config.log_format)
    except CtrdError as exc:
        print(f"ctrd: {exc}", file=sys.stderr)
        return 2

    try:
        _run(Daemon(config))
    except CtrdError as exc:
        structlog.get_logger().error("ctrd failed", error=str(exc))
        return 1
    return 0


def _run(daemon: Daemon, straggler_timeout: float = 5.0) -> None:
    """Serve until stopped, then make sure the process really ends.

    asyncio.run would wait forever for a task that ignores cancellation (a stuck
    stream handler, say), leaving a daemon that answers SIGTERM by hanging. Here such
    tasks get a bounded grace period and are logged by name so the bug can be found.
    """
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(daemon.serve())
        loop.run_until_complete(_cancel_leftovers(straggler_timeout))
    finally:
        loop.close()


async def _cancel_leftovers(timeout: float) -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    if pending:
        structlog.get_logger().warning(
            "tasks ignored cancellation at shutdown", tasks=[t.get_name() for t in pending],
            coroutines=[repr(t.get_coro()) for t in pending])


if __name__ == "__main__":
    sys.exit(main())
