# Sourced by scripts/test.sh and scripts/launch.sh: make sure .venv exists and
# holds this checkout's install. Reinstalls when pyproject.toml changes.
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
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
export WANDB_MODE="${WANDB_MODE:-offline}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
