#!/usr/bin/env bash
# Installs the Docker engine the benchmark's docker and llm-sandbox peers run on: Debian's docker.io (dockerd,
# containerd, runc), runsc (gVisor, for the `docker-runsc` row) and busybox-static (the benchmark imports a
# local image from it; nothing is ever pulled).
# Nothing is started here: `python -m bench` starts a private dockerd in a temporary directory and stops it.
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
  echo "install_docker.sh: run as root (apt-get install docker.io runsc busybox-static)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends docker.io runsc busybox-static iproute2 util-linux >/dev/null
dockerd --version
