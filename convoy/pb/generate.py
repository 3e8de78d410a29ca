"""Regenerate the Python stubs in convoy/pb from protos/*.proto.

    python -m convoy.pb.generate

The stubs are committed; tests/test_protos.py fails when they are stale.
Two edits follow protoc: imports become package-relative, and messages are
registered in Convoy's own descriptor pool (see _pool.py).
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

PROTO_FILES = (
    "model_config.proto",
    "grpc_service.proto",
    "convoy_admin.proto",
    "convoy_monitoring.proto",
)
ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "protos"
OUT_DIR = Path(__file__).resolve().parent


def _postprocess(text: str) -> str:
    text = re.sub(r"^import (\w+_pb2) as ", r"from . import \1 as ", text, flags=re.M)
    text = text.replace(
        "from google.protobuf import descriptor_pool as _descriptor_pool\n",
        "from ._pool import POOL as _POOL\n",
    )
    return text.replace("_descriptor_pool.Default()", "_POOL")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc into out_dir and return the files written."""
    from grpc_tools import protoc  # build-time tool, not a server dependency

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(PROTO_DIR / name) for name in PROTO_FILES),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed")
        written = []
        for src in sorted(Path(tmp).iterdir()):
            if src.name == "model_config_pb2_grpc.py":
                continue  # model_config.proto declares no service
            dst = out_dir / src.name
            dst.write_text(_postprocess(src.read_text()))
            written.append(dst)
        return written


if __name__ == "__main__":
    for path in generate(OUT_DIR):
        print(path.relative_to(ROOT), file=sys.stderr)
