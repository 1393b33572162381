# The two set-up commands of the README. Both are idempotent.
.PHONY: demo test install install-test

# Let Python write the bytecode of what it imports (into .venv and gitignored __pycache__ dirs) even
# where the environment sets PYTHONDONTWRITEBYTECODE: setup.sh installs with --no-compile, so
# otherwise every process compiles its imports from source again (a run's: 13.5-15.7 s vs 4.8 s).
export PYTHONDONTWRITEBYTECODE :=

demo: install
	.venv/bin/aligned-probing run configs/quickstart.toml

test: install-test
	.venv/bin/python -m mypy  # [tool.mypy] in pyproject.toml: disallow_untyped_defs on aligned_probing
	.venv/bin/python -m pytest -q

install:
	scripts/setup.sh

install-test:
	scripts/setup.sh --test
