#!/usr/bin/env bash
# The Python package's part of the test command (scripts/test.sh runs it after the Rust tests):
# build the wheel once (maturin, abi3), install it into a venv cached under
# ~/.cache/persona-gate/pyenv (maturin, numpy, pytest from PyPI; made on first use), and run
# python/tests against the real models and ../shared fixtures. Needs target/release/pgate (the
# CLI-parity tests run it); scripts/test.sh has built it by then.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${PGATE_CACHE:-$HOME/.cache/persona-gate}"
VENV="$CACHE/pyenv"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import maturin, numpy, pytest' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q maturin numpy pytest
fi
rm -rf target/wheels/persona_gate-*.whl
"$VENV/bin/maturin" build --release -m python/Cargo.toml --out target/wheels -q
"$VENV/bin/pip" install -q --force-reinstall --no-deps target/wheels/persona_gate-*.whl
# From outside the source folder, so the installed wheel (not python/persona_gate) is tested.
cd python/tests
PGATE_BIN="${PGATE_BIN:-$PWD/../../target/release/pgate}" "$VENV/bin/python" -m pytest -q -p no:cacheprovider . "$@"
