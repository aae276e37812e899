#!/usr/bin/env bash
# The GPU check of issue 12, on a lent GPU machine, in under 6 minutes (docs/gpu.md has the exact
# device call). From the repository root, with .whl/ carried (tests/gpu/device_wheels.sh builds it):
#   1. Ray + Serve, openai and grpcio-tools from the carried wheels (../shared/device/install-wheels.sh's line)
#   2. the gRPC stubs (python -m gateway.grpc_stubs)
#   3. pytest -m gpu tests/gpu      (at most PYTEST_BUDGET_S, each test at most 150 s)
#   4. python -m tests.bench.bench_gpu  (at most BENCH_BUDGET_S)
# Logs go to $OUT (the device call brings them back), else to a fresh temporary directory.
# GPU_CHECK_PARTS="tests" or "bench" runs one of 3 and 4 (a rerun); PYTEST_ARGS adds to pytest's
# arguments (e.g. "-k serve").
# `--here` skips step 1 and uses .venv/bin/python: a dry run where CUDA is absent (every GPU test
# skips with its reason, the benchmark prints its one line), or a run on a GPU box with the venv.
if [ "${1:-}" != "--here" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH || exit
  PY=python3
else
  PY=.venv/bin/python
fi
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-$(mktemp -d -t gpu-check-XXXX)}
PYTEST_BUDGET_S=${PYTEST_BUDGET_S:-210}
BENCH_BUDGET_S=${BENCH_BUDGET_S:-120}
PARTS=${GPU_CHECK_PARTS:-tests bench}
start=$SECONDS
tests_rc=skipped
bench_rc=skipped

{
  nvidia-smi -L 2>&1 || echo "nvidia-smi: not here"
  "$PY" -c 'import sys, torch, transformers
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available(), "| transformers", transformers.__version__)
for name in ("ray", "openai", "grpc", "google.protobuf", "triton"):
    try:
        module = __import__(name, fromlist=["__version__"])
        print(name, getattr(module, "__version__", "?"))
    except ImportError as exc:
        print(name, "MISSING:", exc)'
} 2>&1 | tee "$OUT/env.log"

"$PY" -m gateway.grpc_stubs >"$OUT/stubs.log" 2>&1 || { cat "$OUT/stubs.log"; echo "gRPC stubs: FAILED"; }

if [[ " $PARTS " == *" tests "* ]]; then
  echo "== pytest -m gpu tests/gpu (budget ${PYTEST_BUDGET_S} s)"
  # shellcheck disable=SC2086  # PYTEST_ARGS is a list of words
  timeout -k 10 "$PYTEST_BUDGET_S" "$PY" -m pytest -m gpu tests/gpu -v -ra --durations=15 -p no:cacheprovider --timeout 150 \
    --junitxml "$OUT/pytest.xml" ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest.log"
  tests_rc=${PIPESTATUS[0]}
fi

if [[ " $PARTS " == *" bench "* ]]; then
  echo "== python -m tests.bench.bench_gpu (budget ${BENCH_BUDGET_S} s)"
  timeout -k 10 "$BENCH_BUDGET_S" "$PY" -m tests.bench.bench_gpu 2>&1 | tee "$OUT/bench.log"
  bench_rc=${PIPESTATUS[0]}
fi

echo "gpu check: pytest $tests_rc, bench $bench_rc (0: passed, 124: past its budget)," \
     "$((SECONDS - start)) s; logs in $OUT" | tee "$OUT/summary.log"
[[ "$tests_rc" =~ ^(0|skipped)$ && "$bench_rc" =~ ^(0|skipped)$ ]]
