#!/usr/bin/env bash
# Installs llm-sandbox (PyPI) with its Docker extra into its own venv, $STOCKADE_BENCH_PEERS/llm-sandbox, so
# that its dependencies never mix with stockade's. It runs on the benchmark's private dockerd (install_docker.sh).
# LLM_SANDBOX_VERSION pins the release (default: the one the published figures used).
set -euo pipefail
PEERS=${STOCKADE_BENCH_PEERS:-/var/tmp/stockade-bench-peers}
VERSION=${LLM_SANDBOX_VERSION:-0.3.46}
PY=${PYTHON:-python3}
mkdir -p "$PEERS"
"$PY" -m venv "$PEERS/llm-sandbox"
"$PEERS/llm-sandbox/bin/python" -m pip install -q --disable-pip-version-check "llm-sandbox[docker]==$VERSION"
"$PEERS/llm-sandbox/bin/python" -c 'import importlib.metadata as m; print("llm-sandbox", m.version("llm-sandbox"))'
