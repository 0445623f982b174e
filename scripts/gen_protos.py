"""Regenerate medclear/v1/*_pb2*.py (and .pyi stubs) from proto/. Never edit the output.

Run through `make proto` (or `make setup`, which runs it when a .proto changed).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "medclear" / "v1"


def main() -> int:
    protos = sorted(
        str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "medclear" / "v1").glob("*.proto")
    )
    if OUT_DIR.exists():
        shutil.rmtree(OUT_DIR)
    OUT_DIR.mkdir(parents=True)
    # protoc finds the mypy-protobuf plugins on PATH: they live beside this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        f"--mypy_out={ROOT}",
        f"--mypy_grpc_out={ROOT}",
        *protos,
    ]
    if protoc.main(args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    (OUT_DIR / "__init__.py").write_text(
        '"""Generated from proto/medclear/v1 by scripts/gen_protos.py."""\n'
    )
    (OUT_DIR / "py.typed").write_text("")
    (OUT_DIR / ".generated").write_text("\n".join(protos) + "\n")
    print(f"generated {len(protos)} protos into {OUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
