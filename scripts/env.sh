# Sourced by scripts/test and scripts/demo: make (once) and enter the project's virtual environment.
# PYTHON picks the interpreter (default: the first Python 3.11 to 3.14 on PATH, found by
# scripts/find_python.sh, which names the fix when there is none); VENV the folder (default .venv).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python="$(scripts/find_python.sh)"
  echo "Making $VENV with $python (Python $("$python" -c 'import sys; print(sys.version.split()[0])'))."
  "$python" -m venv "$VENV"
fi
# Install only when the requirements or the project's metadata changed since the last install.
# The project itself goes in editable, so the scripts import `syncdiffusion` from this checkout.
stamp="$VENV/.requirements.sha256"
want="$(cat requirements.txt requirements-dev.txt requirements-eval.txt requirements-app.txt \
  pyproject.toml \
  | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r requirements-dev.txt
  "$VENV/bin/python" -m pip install --quiet --no-deps -e .
  echo "$want" > "$stamp"
fi
# coglet starts its worker with a bare `python`: the environment's bin must lead PATH.
export PATH="$PWD/$VENV/bin:$PATH"
