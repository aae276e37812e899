#!/usr/bin/env bash
# The wheels tests/gpu/run_on_device.sh installs on the lent GPU machine (docs/gpu.md), built here
# into .whl/ (ignored by git through .git/info/exclude; never commit it):
#   ../shared/device/make-wheels.sh's set (Ray 2.60 + Serve, a grpcio and protobuf matching the
#   stubs), plus openai (the serve test's client) and grpcio-tools (the stubs are generated there),
#   less setuptools (the image has one) and Ray's dashboard front end (static files only: without
#   them the dashboard logs a warning and serves its API), which would not fit otherwise.
# Everything that travels, the repository's own files included, must stay under 64 MiB: the last
# line says how much it is.
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
tools=$("$py" -c 'from importlib.metadata import version; print(version("grpcio-tools"))')
../shared/device/make-wheels.sh .whl openai "grpcio-tools==$tools"
rm -f .whl/setuptools-*.whl
zip -q -d .whl/ray-*.whl 'ray/dashboard/client/build/*'
whl=$(du -sb .whl | cut -f1)
repo=$( (git ls-files; git ls-files --others --exclude-standard) | sort -u \
        | while read -r f; do [ -f "$f" ] && stat -c %s "$f"; done | awk '{s += $1} END {print s + 0}')
awk -v r="$repo" -v w="$whl" 'BEGIN {
  printf "travels: repository %.1f MiB + .whl %.1f MiB = %.1f MiB of the 64 MiB a device call may carry\n",
         r / 1048576, w / 1048576, (r + w) / 1048576 }'
