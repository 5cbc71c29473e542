#!/usr/bin/env bash
# Installs every peer of the benchmark (as root): Docker engine, srt, llm-sandbox.
set -euo pipefail
here="$(dirname "$0")"
"$here/install_docker.sh"
"$here/install_srt.sh"
"$here/install_llm_sandbox.sh"
