# Sourced by scripts/test.sh and scripts/launch.sh: make sure .venv exists and
# holds this checkout's install. Reinstalls when pyproject.toml changes.
# EDSAM_SYSTEM_PYTHON=1 skips the venv and uses the `python` on PATH as it is, for a
# machine whose interpreter already holds the dependencies and cannot install them
# (a GPU image without network, with the project's wheels installed by bench/gpu_check.sh).
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${EDSAM_SYSTEM_PYTHON:-0}" != 1 ]; then
  _venv="$_root/.venv"
  _stamp="$_venv/.edsam-install-stamp"
  _want="$(sha256sum "$_root/pyproject.toml" | cut -d' ' -f1)"
  if [ ! -x "$_venv/bin/python" ] || [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
    echo "[env] installing edsam-online into $_venv (first run takes a few minutes)" >&2
    "${PYTHON:-python3.11}" -m venv "$_venv"
    "$_venv/bin/python" -m pip install -q --upgrade pip >&2
    "$_venv/bin/python" -m pip install -q -e "$_root[test]" >&2
    echo "$_want" > "$_stamp"
  fi
  export PATH="$_venv/bin:$PATH"
fi
export WANDB_MODE="${WANDB_MODE:-offline}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
