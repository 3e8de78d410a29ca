"""The wire contract: committed stubs are current, and every message, field name,
number and type matches what the stock tritonclient ships."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FileDescriptor

from convoy.pb import generate
from convoy.pb import grpc_service_pb2 as ours_service
from convoy.pb import model_config_pb2 as ours_config


def test_committed_stubs_are_up_to_date(tmp_path: Path) -> None:
    written = generate.generate(tmp_path)
    assert written, "protoc wrote nothing"
    for fresh in written:
        committed = generate.OUT_DIR / fresh.name
        assert committed.exists(), (
            f"{fresh.name} is not committed; run python -m convoy.pb.generate"
        )
        assert committed.read_text() == fresh.read_text(), (
            f"convoy/pb/{fresh.name} is stale; run python -m convoy.pb.generate"
        )


def _enum(e: EnumDescriptor) -> dict[str, int]:
    return {v.name: v.number for v in e.values}


def _message(m: Descriptor) -> dict[str, object]:
    fields = {
        f.name: (
            f.number,
            f.type,
            f.is_repeated,
            f.message_type.full_name if f.message_type else None,
            f.enum_type.full_name if f.enum_type else None,
            f.containing_oneof.name if f.containing_oneof else None,
        )
        for f in m.fields
    }
    return {
        "fields": fields,
        "enums": {e.name: _enum(e) for e in m.enum_types},
        "nested": {n.name: _message(n) for n in m.nested_types},
    }


def _file(fd: FileDescriptor) -> dict[str, object]:
    return {
        "package": fd.package,
        "messages": {name: _message(m) for name, m in fd.message_types_by_name.items()},
        "enums": {name: _enum(e) for name, e in fd.enum_types_by_name.items()},
        "services": {
            name: {
                m.name: (
                    m.input_type.full_name,
                    m.output_type.full_name,
                    m.client_streaming,
                    m.server_streaming,
                )
                for m in s.methods
            }
            for name, s in fd.services_by_name.items()
        },
    }


@pytest.mark.parametrize(
    ("ours", "theirs_module"),
    [
        (ours_config, "tritonclient.grpc.model_config_pb2"),
        (ours_service, "tritonclient.grpc.service_pb2"),
    ],
)
def test_descriptors_match_tritonclient(ours: object, theirs_module: str) -> None:
    import importlib

    theirs = importlib.import_module(theirs_module)
    mine = _file(ours.DESCRIPTOR)  # type: ignore[attr-defined]
    reference = _file(theirs.DESCRIPTOR)
    assert mine["package"] == reference["package"] == "inference"
    for kind in ("enums", "services"):
        assert mine[kind] == reference[kind], kind
    # Every message tritonclient knows exists here with identical fields.
    for name, message in reference["messages"].items():  # type: ignore[attr-defined]
        assert name in mine["messages"], f"message {name} missing"  # type: ignore[operator]
        assert mine["messages"][name] == message, f"message {name} differs"  # type: ignore[index]
