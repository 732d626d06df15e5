#!/bin/sh
# azd prepackage hook (POSIX): compiles the app's own modules to bytecode before azd zips the package, so that a cold
# start on Azure loads them instead of compiling every module again. The package is mounted read-only there, so
# bytecode compiled at run time is never kept: without this each cold start compiles the whole app again.
#
# Hash-checked bytecode (PEP 552): a .pyc is used only while the hash of its source still matches, whatever the file
# times say after zipping, so a stale one is never run. It must be compiled by the Python version the app runs on
# (infra/app/api.bicep); another version's bytecode would be ignored, so without that version this hook only says so.
set -eu

runtime=3.11
packages="function_app.py api collectors consumers shared"

python_bin=""
for candidate in "python$runtime" python3 python; do
  found=$(command -v "$candidate" || true)
  if [ -n "$found" ] && [ "$("$found" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$runtime" ]; then
    python_bin=$found
    break
  fi
done

# Bytecode left by local runs (another version, or checked by file times) is not shipped either way.
for folder in . $packages; do
  [ -d "$folder" ] && find "$folder" -type d -name __pycache__ -prune -exec rm -rf {} +
done

if [ -z "$python_bin" ]; then
  echo "prepackage: Python $runtime (the app's runtime) was not found; the package ships without bytecode, and every"
  echo "  cold start compiles the app's modules (tens of milliseconds). Install Python $runtime to ship it compiled."
  exit 0
fi
# shellcheck disable=SC2086  # the package list is split on purpose
"$python_bin" -m compileall -q --invalidation-mode checked-hash $packages
echo "prepackage: the app's modules are compiled for Python $runtime (hash-checked bytecode)"
