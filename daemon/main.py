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
        asyncio.run(Daemon(config).serve())
    except CtrdError as exc:
        structlog.get_logger().error("ctrd failed", error=str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
