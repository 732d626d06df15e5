#!/usr/bin/env bash
# Installs what the local stack, the tests and the demo need on Debian: Debian packages, the Node packages of the
# stand-ins, and a Python virtualenv in .venv. Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_cmd=""
if [ "$(id -u)" -ne 0 ]; then sudo_cmd="sudo"; fi

# Debian packages: Dovecot (the IMAP server), Chromium (the consent tests' browser), Node.js (Azurite, the
# Entra ID stand-in) and Python's venv module.
missing=()
for pkg in dovecot-imapd chromium nodejs npm python3-venv; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# Node may come from elsewhere than Debian's package; then only the Debian parts are needed.
if command -v node >/dev/null && command -v npm >/dev/null; then
  missing=($(printf '%s\n' "${missing[@]}" | grep -v -x -e nodejs -e npm || true))
fi
if command -v python3.11 >/dev/null && python3.11 -m venv --help >/dev/null 2>&1; then
  missing=($(printf '%s\n' "${missing[@]}" | grep -v -x -e python3-venv || true))
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Node packages of the stand-ins, pinned by devstack/package-lock.json.
lock_sum=$(sha256sum devstack/package-lock.json | cut -d' ' -f1)
if [ ! -f devstack/node_modules/.lock-sum ] || [ "$(cat devstack/node_modules/.lock-sum)" != "$lock_sum" ]; then
  echo "setup: installing Node packages (Azurite, oidc-provider)"
  (cd devstack && npm ci --no-audit --no-fund --loglevel=error)
  echo "$lock_sum" > devstack/node_modules/.lock-sum
fi

# Python 3.11 (the Flex Consumption runtime) in .venv with the runtime and development requirements.
python_bin=$(command -v python3.11 || command -v python3)
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $python_bin"
  "$python_bin" -m venv .venv
fi
req_sum=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
if [ ! -f .venv/.req-sum ] || [ "$(cat .venv/.req-sum)" != "$req_sum" ]; then
  echo "setup: installing Python packages"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r requirements-dev.txt
  echo "$req_sum" > .venv/.req-sum
fi
echo "setup: done"
