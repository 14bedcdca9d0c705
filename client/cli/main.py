"""The `ctrctl` command group, global options and error handling.

Every failure ends in one line on stderr and a non-zero exit: usage errors exit 2
(click's convention), daemon and input errors exit 1, an interrupt 130.
A container's own exit status is passed through by `run` and `exec`.
"""
from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from ctrd import errors

from ..cio import DEFAULT_FIFO_DIR
from ..client import AsyncClient
from ..connection import DEFAULT_ADDRESS, DEFAULT_NAMESPACE
from .output import error

T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    address: str
    namespace: str
    log_dir: str
    fifo_dir: str
    timeout: float | None

    def run(self, work: Callable[[AsyncClient], Awaitable[T]]) -> T:
        """Run ``work`` with a connected client on a fresh event loop."""
        async def go() -> T:
            async with AsyncClient(self.address, self.namespace, timeout=self.timeout) as client:
                return await work(client)
        return asyncio.run(go())


pass_settings = click.make_pass_decorator(Settings)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--address", "-a", envvar="CTRD_ADDRESS", default=DEFAULT_ADDRESS,
              show_default=True, help="Daemon socket (env CTRD_ADDRESS).")
@click.option("--namespace", "-n", envvar="CTRD_NAMESPACE", default=DEFAULT_NAMESPACE,
              show_default=True, help="Namespace (env CTRD_NAMESPACE).")
@click.option("--log-dir", envvar="CTRCTL_LOG_DIR", default="",
              help="Where detached containers log [default: next to the daemon socket].")
@click.option("--fifo-dir", envvar="CTRCTL_FIFO_DIR", default=DEFAULT_FIFO_DIR,
              show_default=True, help="Where stdio fifos are made.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=None,
              help="Seconds to wait for each daemon call.")
@click.version_option(package_name="ctrd", prog_name="ctrctl")
@click.pass_context
def cli(ctx: click.Context, address: str, namespace: str, log_dir: str, fifo_dir: str,
        timeout: float | None) -> None:
    """Manage containers and images of a ctrd (or containerd) daemon."""
    if not address:
        raise click.BadParameter("must not be empty", param_hint="--address")
    if not namespace:
        raise click.BadParameter("must not be empty", param_hint="--namespace")
    ctx.obj = Settings(address, namespace, log_dir, fifo_dir, timeout)


def _register() -> None:
    # Imported here: the command modules import `cli` from this module.
    from . import containers, images, system  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    _register()
    try:
        result: Any = cli.main(args=argv, prog_name="ctrctl", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        # Ctrl-C (click turns it into Abort): the normal way to end `events` or `logs -f`.
        sys.exit(130)
    except errors.CtrdError as exc:
        error(str(exc) or type(exc).__name__)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # The reader of our output went away (`ctrctl ps | head`): not an error.
        sys.stderr.close()
        sys.exit(0)
    except OSError as exc:
        error(str(exc))
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
