# The two set-up commands of the README. Both are idempotent.
.PHONY: demo test install install-test

demo: install
	.venv/bin/aligned-probing run configs/quickstart.toml

test: install-test
	.venv/bin/python -m mypy  # [tool.mypy] in pyproject.toml: disallow_untyped_defs on aligned_probing
	.venv/bin/python -m pytest -q

install:
	scripts/setup.sh

install-test:
	scripts/setup.sh --test
