#!/usr/bin/env bash
# Installs (with apt) the system packages that the browser, PostgreSQL and multi-node tests need, only those
# missing: chromium + chromium-driver (headless UI test), postgresql (MLflow on a real PostgreSQL), and
# openssh-server + pdsh (DeepSpeed's multi-node launcher over SSH to 127.0.0.1; the test starts its own sshd
# with its own keys and config, the system's sshd is never started or configured).
# Idempotent: exits 0 at once when everything is present. Set MGPO_SKIP_SYSTEM_DEPS=1 to skip it entirely
# (the tests that need them then skip themselves with a reason). Usage: bash infra/system_deps.sh
set -euo pipefail

if [ "${MGPO_SKIP_SYSTEM_DEPS:-0}" = 1 ]; then
  echo "system_deps: skipped (MGPO_SKIP_SYSTEM_DEPS=1); the browser, PostgreSQL and multi-node tests will skip" >&2
  exit 0
fi

# What each package provides, checked by file so that a present package costs no apt call at all.
have_initdb() { compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; }
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
have_initdb || missing+=(postgresql)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
[ -x /usr/bin/pdsh ] || missing+=(pdsh)

if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
echo "system_deps: installing ${missing[*]} (apt)" >&2

if ! command -v apt-get >/dev/null 2>&1; then
  echo "system_deps: apt-get not found; install ${missing[*]} with your system's package manager," \
    "or set MGPO_SKIP_SYSTEM_DEPS=1 to let the tests that need them skip" >&2
  exit 1
fi
sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo_cmd=(sudo -n)
  else
    echo "system_deps: not root and no password-less sudo; run as root: apt-get install -y ${missing[*]}," \
      "or set MGPO_SKIP_SYSTEM_DEPS=1 to let the tests that need them skip" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
# Debian's postgresql and openssh-server packages try to start their service (a default cluster, the system
# sshd): in a container without an init system that fails the install, and the tests start their own throwaway
# server anyway. policy-rc.d exit 101 forbids it.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | "${sudo_cmd[@]}" tee "$policy" >/dev/null
  "${sudo_cmd[@]}" chmod +x "$policy"
  made_policy=1
fi
cleanup() { if [ "$made_policy" = 1 ]; then "${sudo_cmd[@]}" rm -f "$policy"; fi; }
trap cleanup EXIT

echo "system_deps: apt-get update" >&2
"${sudo_cmd[@]}" apt-get update -qq
# fonts-liberation: without a font the screenshots of the UIs show boxes instead of text.
echo "system_deps: apt-get install -y ${missing[*]} fonts-liberation" >&2
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" fonts-liberation >/dev/null

still=()
[ -x /usr/bin/chromium ] || still+=(chromium)
[ -x /usr/bin/chromedriver ] || still+=(chromium-driver)
have_initdb || still+=(postgresql)
[ -x /usr/sbin/sshd ] || still+=(openssh-server)
[ -x /usr/bin/pdsh ] || still+=(pdsh)
if [ "${#still[@]}" -gt 0 ]; then
  echo "system_deps: apt finished but ${still[*]} still missing" >&2
  exit 1
fi
echo "system_deps: ready (chromium $(/usr/bin/chromium --version 2>/dev/null | awk '{print $2}'))" >&2
