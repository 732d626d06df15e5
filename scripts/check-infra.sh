#!/usr/bin/env bash
# Offline security scan of infra/ with checkov. Fails when a Bicep file does not parse (checkov itself exits 0 on
# a parse error, so its JSON report is read) or when a check fails without a `//checkov:skip=ID: reason` comment in
# the resource that it concerns. checkov lives in its own virtualenv (.tools/checkov): it conflicts with the app's
# dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned together. checkov pins pycep-parser 0.5.1; 0.7.1 is the parser the unit tests use, so it replaces the
# pinned one after checkov is installed and both checks read the templates with one grammar (pip reports the
# override, which is expected).
CHECKOV_VERSION=3.3.30
PYCEP_VERSION=0.7.1
venv=.tools/checkov

installed() {
  "$venv/bin/python" - "$CHECKOV_VERSION" "$PYCEP_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version

sys.exit(0 if (version("checkov"), version("pycep-parser")) == (sys.argv[1], sys.argv[2]) else 1)
EOF
}

if [ ! -x "$venv/bin/checkov" ] || ! installed; then
  echo "check-infra: installing checkov $CHECKOV_VERSION into $venv"
  python_bin=$(command -v python3.11 || command -v python3)
  "$python_bin" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet "checkov==$CHECKOV_VERSION"
  "$venv/bin/python" -m pip install --quiet "pycep-parser==$PYCEP_VERSION" 2>&1 \
    | grep -v -e "dependency resolver" -e "requires pycep-parser==" || true
  installed || { echo "check-infra: could not install checkov $CHECKOV_VERSION with pycep-parser $PYCEP_VERSION" >&2; exit 1; }
fi

report=$(mktemp)
trap 'rm -f "$report"' EXIT
# --skip-download: no call to the vendor's platform; every check that runs is in the installed package.
# checkov exits 1 on failed checks; the verdict below comes from the report, which also covers parse errors.
"$venv/bin/checkov" --directory infra --framework bicep --output json --skip-download > "$report" || true

"$venv/bin/python" - "$report" <<'EOF'
import json
import sys

with open(sys.argv[1], encoding="utf-8") as handle:
    text = handle.read()
try:
    report = json.loads(text)
except json.JSONDecodeError:
    print("check-infra: checkov did not produce a JSON report:\n" + text[:2000], file=sys.stderr)
    sys.exit(1)
if isinstance(report, list):
    report = next((r for r in report if r.get("check_type") == "bicep"), {})
results = report.get("results", {})
summary = report.get("summary", {})
parsing_errors = results.get("parsing_errors", [])
failed = results.get("failed_checks", [])
skipped = results.get("skipped_checks", [])

for check in skipped:
    reason = (check.get("check_result") or {}).get("suppress_comment", "").strip()
    print(f"suppressed {check['check_id']} {check['resource']}: {reason}")
for path in parsing_errors:
    print(f"PARSE ERROR {path}", file=sys.stderr)
for check in failed:
    lines = check.get("file_line_range", ["?", "?"])
    print(
        f"FAILED {check['check_id']} {check['resource']} ({check['file_path']}:{lines[0]}-{lines[1]}): "
        f"{check['check_name']}",
        file=sys.stderr,
    )
print(
    "check-infra: {} resources, {} passed, {} failed, {} suppressed, {} parse errors".format(
        summary.get("resource_count", 0), len(results.get("passed_checks", [])), len(failed), len(skipped),
        len(parsing_errors),
    )
)
if not summary.get("resource_count"):
    print("check-infra: checkov scanned no Bicep resource", file=sys.stderr)
    sys.exit(1)
sys.exit(1 if parsing_errors or failed else 0)
EOF
