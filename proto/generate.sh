#!/bin/sh
# Generate the Python gRPC stubs for every .proto in proto/kvpool/v1 into kvpool/v1/.
#
#   proto/generate.sh            # regenerate the committed stubs (make proto)
#   proto/generate.sh OUT_DIR    # generate into OUT_DIR/kvpool/v1 (the staleness test compares)
#
# grpcio-tools is pinned exactly in pyproject.toml: another protoc would produce other bytes.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root}
python=${PYTHON:-$root/.venv/bin/python}
[ -x "$python" ] || python=python3
cd "$root"
mkdir -p "$out/kvpool/v1"
"$python" -m grpc_tools.protoc -Iproto --python_out="$out" --pyi_out="$out" \
    --grpc_python_out="$out" proto/kvpool/v1/*.proto
