#!/usr/bin/env bash
# Installs Anthropic's sandbox-runtime (`srt`) from the npm registry into $STOCKADE_BENCH_PEERS/srt, with
# Node.js and npm from Debian when the machine has none, and what srt needs on Linux (bubblewrap, socat,
# ripgrep). Never vendored. SRT_VERSION pins the release (default: the one the published figures used).
set -euo pipefail
PEERS=${STOCKADE_BENCH_PEERS:-/var/tmp/stockade-bench-peers}
VERSION=${SRT_VERSION:-0.0.83}
need=()
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
for tool in bwrap:bubblewrap socat:socat rg:ripgrep; do
  command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install_srt.sh: missing ${need[*]}; run as root or: apt-get install ${need[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
mkdir -p "$PEERS/srt"
# srt declares node >= 22.12; it runs on the node 20 of this machine kind (checked by the benchmark, which
# skips srt with the error if it does not start).
npm install --prefix "$PEERS/srt" --no-audit --no-fund --loglevel=error "@anthropic-ai/sandbox-runtime@$VERSION"
"$PEERS/srt/node_modules/.bin/srt" --version
