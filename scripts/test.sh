#!/usr/bin/env bash
# The README's test command. Creates .venv when missing, then runs pytest.
#   scripts/test.sh            default suite (not slow)
#   scripts/test.sh --slow     only the slow tests (shipped LDM rebuilt bit for bit, fidelity bars, the whole GPU check, a producer past its restart cap)
#   scripts/test.sh ARGS...    extra pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
if [ "${1:-}" = "--slow" ]; then
  shift
  exec python -m pytest -m slow "$@"
fi
exec python -m pytest "$@"
