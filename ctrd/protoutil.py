"""Small protobuf helpers shared by the daemon, the shim and the clients."""
from __future__ import annotations

from google.protobuf import any_pb2, symbol_database, timestamp_pb2
from google.protobuf.message import Message

from ctrd.errors import InvalidArgument


def pack(msg: Message) -> any_pb2.Any:
    """An Any with containerd's type URL: the bare message name, without the
    ``type.googleapis.com/`` prefix that ``Any.Pack`` adds (Go's typeurl looks types up
    by the bare name, so `ctr events` could not decode the prefixed form)."""
    return any_pb2.Any(type_url=msg.DESCRIPTOR.full_name, value=msg.SerializeToString())


def unpack(value: any_pb2.Any) -> Message:
    """Decode an Any whose type is compiled into this process."""
    name = value.type_url.rsplit("/", 1)[-1]
    try:
        cls = symbol_database.Default().GetSymbol(name)
    except KeyError:
        raise InvalidArgument(f"type with url {value.type_url}: not found") from None
    msg = cls()
    msg.ParseFromString(value.value)
    return msg


def timestamp(ns: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def nanos(ts: timestamp_pb2.Timestamp) -> int:
    return ts.ToNanoseconds()
