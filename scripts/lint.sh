#!/usr/bin/env bash
# ruff + mypy over the whole project. mypy cannot follow pyproject's package-dir mapping
# (dyadiq.passes -> passes/ ...), so it checks a throw-away tree of symlinks laid out the way
# the installed package is.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin
"$py/ruff" check dyadiq passes frontends backends tests benchmarks examples
"$py/ruff" format --check dyadiq passes frontends backends tests benchmarks examples
view=$(mktemp -d)
trap 'rm -rf "$view"' EXIT
mkdir "$view/dyadiq"
for entry in dyadiq/*; do ln -s "$PWD/$entry" "$view/dyadiq/"; done
for sub in passes frontends backends; do ln -s "$PWD/$sub" "$view/dyadiq/$sub"; done
(cd "$view" && "$OLDPWD/$py/mypy" --config-file "$OLDPWD/pyproject.toml" -p dyadiq)
