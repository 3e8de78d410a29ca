"""Protobuf messages as Triton writes them in JSON (model configs, statistics).

protobuf's own JSON prints 64-bit integers as strings and leaves out fields at
their defaults; Triton prints every field, keeps the proto field names, and
writes 64-bit integers (dims, max_batch_size, counts, nanoseconds) as numbers.
Python models parse args['model_config'] and HTTP clients read /config and
/stats expecting exactly that.
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def message_to_dict(message: Message) -> dict[str, Any]:
    as_dict = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _int64_as_numbers(message, as_dict)


def message_to_json(message: Message) -> str:
    return json.dumps(message_to_dict(message))


def _int64_as_numbers(message: Message, value: dict[str, Any]) -> dict[str, Any]:
    for field in message.DESCRIPTOR.fields:
        name = field.name
        if name not in value:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            entries = getattr(message, name)
            for key, item in value[name].items():
                if value_field.message_type is not None:
                    _int64_as_numbers(entries[_map_key(field, key)], item)
                elif value_field.type in _INT64:
                    value[name][key] = int(item)
        elif field.message_type is not None:
            child = getattr(message, name)
            if _is_repeated(field):
                for sub, item in zip(child, value[name], strict=True):
                    _int64_as_numbers(sub, item)
            else:
                _int64_as_numbers(child, value[name])
        elif field.type in _INT64:
            raw = value[name]
            value[name] = [int(v) for v in raw] if isinstance(raw, list) else int(raw)
    return value


def _is_repeated(field: FieldDescriptor) -> bool:
    # protobuf >= 5 spells it is_repeated; label is the older spelling.
    repeated = getattr(field, "is_repeated", None)
    if repeated is not None:
        return bool(repeated)
    return bool(field.label == FieldDescriptor.LABEL_REPEATED)


def _map_key(field: FieldDescriptor, key: str) -> Any:
    key_field = field.message_type.fields_by_name["key"]
    return key if key_field.type == FieldDescriptor.TYPE_STRING else int(key)
