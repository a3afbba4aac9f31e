#!/usr/bin/env bash
# Debian packages the tests use to synthesize speech (espeak-ng, flite) and to
# inspect audio (sox). Installs only what is missing.
set -euo pipefail
need=()
for pkg in espeak-ng flite sox; do
  command -v "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
