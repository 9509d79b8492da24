#!/usr/bin/env bash
# Print the interpreter scripts/env.sh builds .venv with: $PYTHON if set, else the first of
# python3.11 ... python3.14, python3 that is Python 3.11 to 3.14. pyproject.toml asks for 3.11 or
# later, and torch 2.14.1 (requirements.txt) publishes wheels up to 3.14; cog.yaml and the tests
# use 3.11. When none fits, say so on stderr, with the fix, and exit 1.
set -uo pipefail
MIN=11
MAX=14

version_of() {  # "3.12", or nothing when $1 is not a Python that runs
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null
}

fits() {  # $1 is a version such as 3.12
  local major="${1%%.*}" minor="${1#*.}"
  [ "$major" = 3 ] && [ "$minor" -ge "$MIN" ] 2>/dev/null && [ "$minor" -le "$MAX" ]
}

if [ -n "${PYTHON:-}" ]; then
  found="$(version_of "$PYTHON")"
  if fits "$found"; then
    echo "$PYTHON"
    exit 0
  fi
  what="does not run"
  [ -n "$found" ] && what="is Python $found"
  echo "PYTHON=$PYTHON $what; the project needs" \
    "Python 3.$MIN to 3.$MAX: set PYTHON to one (e.g. PYTHON=python3.11 scripts/demo)." >&2
  exit 1
fi
tried=()
for name in python3.11 python3.12 python3.13 python3.14 python3; do
  command -v "$name" >/dev/null 2>&1 || continue
  found="$(version_of "$name")"
  if fits "$found"; then
    command -v "$name"
    exit 0
  fi
  tried+=("$name is ${found:-not runnable}")
done
echo "No Python 3.$MIN to 3.$MAX found on PATH${tried:+ (${tried[*]})}." \
  "Install one (e.g. apt-get install python3.11, or from python.org)," \
  "then run this again, or name it: PYTHON=/path/to/python3.12 scripts/demo." >&2
exit 1
