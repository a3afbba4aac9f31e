#!/usr/bin/env bash
# Debian packages the tests use to synthesize speech (espeak-ng, flite), to
# inspect audio (sox) and to run the web page in real browsers (chromium,
# firefox-esr).
# Installs only what is missing: a second run does nothing.
set -euo pipefail
need=()
for pkg in espeak-ng flite sox chromium firefox-esr; do
  command -v "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
# The local microphone/speaker (run_agent.py cli) and its tests: PortAudio, a
# PulseAudio server with pactl, and ALSA's pulse plugin (PortAudio reaches it via ALSA).
for pkg in libportaudio2 pulseaudio pulseaudio-utils libasound2-plugins; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need+=("$pkg")
done
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
