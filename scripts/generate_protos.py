"""Regenerate the Python stubs in generated/ from protos/.

Run with the development environment's Python: `python scripts/generate_protos.py`.
`--check` compares freshly generated stubs with the committed ones and exits 1 when they differ.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GENERATED = ROOT / "generated"
PACKAGE = Path("balance") / "v1"


def generate(output: Path) -> None:
    """Writes the message, gRPC and type stubs of every proto file under `output`."""
    proto_files = sorted(str(path.relative_to(PROTOS)) for path in (PROTOS / PACKAGE).glob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    # The mypy-protobuf plugins are console scripts installed next to this interpreter.
    scripts = Path(sys.executable).parent
    arguments = [
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-mypy={scripts / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={scripts / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={output}",
        f"--grpc_python_out={output}",
        f"--mypy_out={output}",
        f"--mypy_grpc_out={output}",
        *proto_files,
    ]
    if protoc.main(arguments) != 0:
        raise SystemExit("protoc failed")
    for package in (output / "balance", output / PACKAGE):
        (package / "__init__.py").write_text("")
    (output / "balance" / "py.typed").write_text("")


def stub_files(root: Path) -> list[Path]:
    return sorted(
        path.relative_to(root)
        for path in (root / "balance").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    )


def check() -> int:
    with tempfile.TemporaryDirectory() as scratch:
        fresh = Path(scratch)
        generate(fresh)
        expected, actual = stub_files(fresh), stub_files(GENERATED)
        stale = [
            str(name)
            for name in expected
            if name not in actual or not filecmp.cmp(fresh / name, GENERATED / name, shallow=False)
        ]
        extra = [str(name) for name in actual if name not in expected]
    if stale or extra:
        print("generated/ is out of date with protos/; run scripts/generate_protos.py", file=sys.stderr)
        for name in stale + extra:
            print(f"  {name}", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    if parser.parse_args().check:
        return check()
    shutil.rmtree(GENERATED / "balance", ignore_errors=True)
    generate(GENERATED)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
