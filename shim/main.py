"""containerd-shim-ctrd-v2: the shim v2 command line.

    containerd-shim-ctrd-v2 -namespace NS -id ID -address ADDR [-publish-binary B]
                            [-bundle DIR] [-socket PATH] [-debug] [start|delete]

``start`` launches the serving shim and prints its address; ``delete`` cleans up
after a shim that died; no action serves (on -socket, else on the listening
socket inherited as fd 3). ``containerd-shim-ctrd-v2 zygote -socket PATH -state DIR``
runs a warm process that forks serving shims on request (see ctrd.shim.zygote). Flags follow Go's flag package: one or two dashes,
``-flag value`` or ``-flag=value``.
"""
from __future__ import annotations

import os
import sys

BOOL_FLAGS = {"debug", "v"}
VALUE_FLAGS = {"namespace", "id", "address", "publish-binary", "bundle", "socket"}


class Flags:
    """The parsed command line. A plain class, not a dataclass: importing dataclasses
    (it pulls in inspect and ast) would cost ``start`` a third of its imports, and
    containerd waits for ``start`` on every container."""

    __slots__ = ("namespace", "id", "address", "publish_binary", "bundle", "socket", "debug",
                 "v", "action")

    def __init__(self) -> None:
        self.namespace = ""
        self.id = ""
        self.address = ""
        self.publish_binary = "containerd"
        self.bundle = ""
        self.socket = ""
        self.debug = False
        self.v = False
        self.action = ""


def parse(argv: list[str]) -> Flags:
    flags = Flags()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg in ("-", "--"):
            if arg == "--":
                i += 1
            break
        name, eq, value = arg.lstrip("-").partition("=")
        if name in BOOL_FLAGS:
            setattr(flags, name, value.lower() not in ("false", "0") if eq else True)
        elif name in VALUE_FLAGS:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise SystemExit(f"flag needs an argument: -{name}")
                value = argv[i]
            setattr(flags, name.replace("-", "_"), value)
        else:
            raise SystemExit(f"flag provided but not defined: -{name}")
        i += 1
    if i < len(argv):
        flags.action = argv[i]
    return flags


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["zygote"]:
        from ctrd.shim.zygote import main as zygote

        return zygote(args[1:])
    flags = parse(args)
    name = os.path.basename(sys.argv[0])
    if flags.v:
        from ctrd import __version__

        print(f"{name}:\n  Version:  {__version__}\n")
        return 0
    if not flags.namespace:
        print(f"{name}: shim namespace cannot be empty", file=sys.stderr)
        return 1
    ttrpc_address = os.environ.get("TTRPC_ADDRESS", "")
    try:
        if flags.action == "start":
            from ctrd.shim.start import start

            return start(flags.namespace, flags.id, flags.address, ttrpc_address, flags.debug)
        if flags.action == "delete":
            from ctrd.shim.cleanup import delete

            return delete(flags.namespace, flags.id, flags.bundle or os.getcwd())
        if flags.action:
            print(f"{name}: unknown action {flags.action!r}", file=sys.stderr)
            return 1
        return _serve_inherited(flags, ttrpc_address)
    except Exception as exc:  # containerd shows this text to the user
        print(f"{name}: {exc}", file=sys.stderr)
        return 1


def _serve_inherited(flags: Flags, ttrpc_address: str) -> int:
    import socket

    from ctrd.shim.serve import serve

    if flags.socket:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(flags.socket)
        listener.listen(128)
        address = "unix://" + flags.socket
    else:
        listener = socket.socket(fileno=3)
        address = ""
        try:
            with open("address") as f:
                address = f.read().strip()
        except OSError:
            pass
    return serve(listener, flags.namespace, flags.bundle or os.getcwd(), ttrpc_address,
                 address, flags.debug)


if __name__ == "__main__":
    sys.exit(main())
