"""``ctrd publish``: the publish binary of shim v2 (containerd's ``publish`` command).

A shim that does not speak ttrpc to the events endpoint may run
``<publish-binary> --address SOCK publish --namespace NS --topic TOPIC`` with the
event, a serialized ``google.protobuf.Any``, on stdin. It goes to the daemon's
Events/Publish over gRPC.
"""
from __future__ import annotations

import argparse
import sys
from typing import BinaryIO

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

CONNECT_TIMEOUT = 2.0


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("publish", help="publish an event read from stdin (used by shims)")
    p.add_argument("--namespace", required=True, help="namespace to publish to")
    p.add_argument("--topic", required=True, help="topic of the event")
    return p


def publish(address: str, namespace: str, topic: str, stdin: BinaryIO) -> int:
    """Send one event; returns the process exit status, printing why it failed."""
    # Imported here: the daemon itself serves gRPC without grpcio (daemon/rpc).
    import grpc

    from ctrd.api.containerd.services.events.v1 import events_pb2, events_pb2_grpc

    try:
        event = any_pb2.Any.FromString(stdin.read())
    except DecodeError as exc:
        print(f"ctrd publish: event on stdin is not a protobuf Any: {exc}", file=sys.stderr)
        return 1
    with grpc.insecure_channel(f"unix://{address}") as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=CONNECT_TIMEOUT)
            events_pb2_grpc.EventsStub(channel).Publish(
                events_pb2.PublishRequest(topic=topic, event=event),
                metadata=[("containerd-namespace", namespace)], timeout=10)
        except grpc.FutureTimeoutError:
            print(f'ctrd publish: failed to dial "{address}"', file=sys.stderr)
            return 1
        except grpc.RpcError as exc:
            print(f"ctrd publish: {exc.details()}", file=sys.stderr)
            return 1
    return 0
