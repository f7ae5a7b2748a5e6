#!/usr/bin/env bash
# The project's test command (README, .ci/run): fetch the real models and everything the tests need,
# then run every test in release mode (the engine runs real models in f32; an unoptimized build
# would take hours). Needs nothing installed by hand:
# - Chromium (Debian's package) for the report test, installed with apt when missing;
# - llama.cpp (llama-cpp-python, built once into the cache) for the control-vector cross-check,
#   built in the background while the tests compile, so it does not add to the run;
# - the Python package's wheel and pytest (maturin, numpy, pytest in a venv cached under
#   ~/.cache/persona-gate/pyenv; scripts/test-python.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-models.sh
if [ ! -x /usr/bin/chromium ] && ! command -v chromium >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  # Wait for another apt or dpkg run to let go of the lock rather than fail on it.
  APT=(apt-get -o DPkg::Lock::Timeout=600)
  ($SUDO "${APT[@]}" update -qq && DEBIAN_FRONTEND=noninteractive $SUDO "${APT[@]}" install -y -qq chromium) ||
    echo "warning: could not install chromium; the report test will fail" >&2
fi
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-$(nproc)}"
LCPP_LOG="$(mktemp)"
bash scripts/setup-llamacpp.sh >"$LCPP_LOG.py" 2>"$LCPP_LOG" &
LCPP=$!
cargo test --release --workspace --no-run
if wait "$LCPP"; then
  export PGATE_LLAMA_CPP_PYTHON="${PGATE_LLAMA_CPP_PYTHON:-$(tail -1 "$LCPP_LOG.py")}"
else
  echo "warning: building llama-cpp-python failed (log: $LCPP_LOG); the cross-check test will retry" >&2
fi
RC=0
cargo test --release --workspace --no-fail-fast -- --test-threads=1 "$@" || RC=$?
# The Python package (python/): wheel built once, pytest against the same models and fixtures.
bash scripts/test-python.sh || RC=$?
exit $RC
