"""The Python stubs of `gateway/proto/moe_serve/v1/moe_serve.proto`, generated when missing or stale.

protoc (from `grpc_tools`) writes them into `gateway/_generated/` (git-ignored, never edited) the
first time one of them is asked for (`from gateway.grpc_stubs import moe_serve_pb2`), and again
whenever the .proto is newer than them; `python -m gateway.grpc_stubs` regenerates them ahead of
time (`make install` runs it).

The .proto is compiled under the virtual path `gateway/_generated/`, so the generated modules
import each other as `gateway._generated.moe_serve.v1...` without touching `sys.path`, and their
messages pickle under a name every Ray process can import: Serve's gRPC proxy pickles each
request message to hand it to a replica.
"""

from __future__ import annotations

import fcntl
import importlib
import shutil
import sys
import tempfile
from pathlib import Path

GATEWAY_DIR = Path(__file__).resolve().parent
PROTO_ROOT = GATEWAY_DIR / "proto"
PROTO_FILE = PROTO_ROOT / "moe_serve" / "v1" / "moe_serve.proto"
GENERATED_DIR = GATEWAY_DIR / "_generated"
PACKAGE = "gateway._generated.moe_serve.v1"

# Import paths Serve's proxy resolves. Ours goes through this module so that the proxy generates
# the stubs first on a node that has none yet; it also registers server reflection (routed to the
# ingress, behind the API key, when Serve's own is off) and parses request bytes tolerantly
# (gateway/grpc_parsing.py).
MOE_SERVE_SERVICER_ADDER = "gateway.grpc_stubs.add_MoeServeServicer_to_server"
HEALTH_SERVICER_ADDER = "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"


def servicer_functions() -> list[str]:
    """`grpc_servicer_functions` for `serve.start(grpc_options=...)`: our service and grpc.health.v1.

    Generates missing or stale stubs first, so that a protoc failure shows here, in the driver,
    rather than inside Serve's proxy actor.
    """
    if is_stale():
        generate()
    return [MOE_SERVE_SERVICER_ADDER, HEALTH_SERVICER_ADDER]


def generated_files() -> tuple[Path, ...]:
    out = GENERATED_DIR / "moe_serve" / "v1"
    return out / "moe_serve_pb2.py", out / "moe_serve_pb2_grpc.py", out / "moe_serve_pb2.pyi"


def is_stale() -> bool:
    files = generated_files()
    if not all(f.is_file() for f in files):
        return True
    return min(f.stat().st_mtime for f in files) < PROTO_FILE.stat().st_mtime


def generate(force: bool = False) -> Path:
    """Write the stubs into `gateway/_generated/` unless they are up to date; returns that directory.

    Ray may import this module in several processes at once (proxy, replicas, the driver): a file
    lock serializes them, and protoc writes into a scratch directory whose files are then renamed
    into place, so no process ever imports a half-written module.
    """
    GENERATED_DIR.mkdir(exist_ok=True)
    with open(GENERATED_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if force or is_stale():
            _run_protoc()
    return GENERATED_DIR


def _run_protoc() -> None:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory(dir=GENERATED_DIR) as scratch:
        # `-I<virtual>=<dir>`: the file compiles as gateway/_generated/moe_serve/v1/moe_serve.proto.
        virtual_root = GENERATED_DIR.relative_to(GATEWAY_DIR.parent).as_posix()
        virtual_file = f"{virtual_root}/{PROTO_FILE.relative_to(PROTO_ROOT).as_posix()}"
        args = [
            "grpc_tools.protoc",
            f"-I{virtual_root}={PROTO_ROOT}",
            # The well-known types (google/protobuf/*.proto) that grpc_tools ships.
            f"-I{Path(protoc.__file__).parent / '_proto'}",
            f"--python_out={scratch}", f"--pyi_out={scratch}", f"--grpc_python_out={scratch}",
            virtual_file,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_FILE} (its errors are printed above)")
        made = Path(scratch) / GENERATED_DIR.relative_to(GATEWAY_DIR.parent)
        for path in sorted(made.rglob("*")):
            target = GENERATED_DIR / path.relative_to(made)
            if path.is_dir():
                target.mkdir(exist_ok=True)
                (target / "__init__.py").touch()
            else:
                shutil.move(path, target)  # a rename: same file system
        (GENERATED_DIR / "__init__.py").touch()
    importlib.invalidate_caches()


def __getattr__(name: str) -> object:
    """`moe_serve_pb2`, `moe_serve_pb2_grpc` and `add_MoeServeServicer_to_server`, generated on first use.

    Lazy (PEP 562) so that importing this module, or running it with `-m`, has no side effect.
    """
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if is_stale():
        generate()
    pb2 = importlib.import_module(f"{PACKAGE}.moe_serve_pb2")
    pb2_grpc = importlib.import_module(f"{PACKAGE}.moe_serve_pb2_grpc")
    from grpc_reflection.v1alpha.reflection_pb2_grpc import add_ServerReflectionServicer_to_server

    from gateway.grpc_cancel import cancel_safe_streams  # a cancelled stream always aborts its sequence
    from gateway.grpc_parsing import tolerant_adder  # bad request bytes: INVALID_ARGUMENT, not UNKNOWN

    # Server reflection is registered with our service, so that Serve's proxy routes it to the
    # ingress (which checks the API key) like any method of ours (gateway/grpc_methods.py).
    adder = cancel_safe_streams(
        tolerant_adder(pb2_grpc.add_MoeServeServicer_to_server, add_ServerReflectionServicer_to_server))
    globals().update(moe_serve_pb2=pb2, moe_serve_pb2_grpc=pb2_grpc, add_MoeServeServicer_to_server=adder)
    return globals()[name]


_LAZY = ("moe_serve_pb2", "moe_serve_pb2_grpc", "add_MoeServeServicer_to_server")


def main() -> int:
    print(generate(force=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
