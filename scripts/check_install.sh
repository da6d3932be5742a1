#!/usr/bin/env bash
# A plain (non-editable) `pip install .` into a fresh venv: the installed copy imports, `python -m tokenpaint.demo
# --help` runs and every shipped config loads. The fresh venv borrows the dependencies (torch, ...) of the project venv
# through a .pth path line, which does not run that venv's editable-install hook, so tokenpaint can only come from the
# fresh install (checked below).
# Usage: bash scripts/check_install.sh PROJECT_VENV_PYTHON
set -euo pipefail
PROJECT_PY=${1:?usage: check_install.sh PROJECT_VENV_PYTHON}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# the repository's files (tracked and new, not ignored) only: no build/ or egg-info left over from another build
mkdir "$TMP/src"
(cd "$ROOT" && git ls-files -z -co --exclude-standard | xargs -0 tar -cf - 2>/dev/null) | tar -xf - -C "$TMP/src"

BASE_PY=$("$PROJECT_PY" -c 'import sys; print(sys._base_executable)')
"$BASE_PY" -m venv "$TMP/venv"
SITE=$("$TMP/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PROJECT_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$SITE/project_deps.pth"
"$TMP/venv/bin/pip" install -q --no-deps "$TMP/src"
rm -rf "$TMP/src"  # nothing may be read from the source tree any more

cd "$TMP"
"$TMP/venv/bin/python" -m tokenpaint.demo --help > /dev/null
"$TMP/venv/bin/python" - "$SITE" <<'PY'
import sys
from pathlib import Path

import tokenpaint
from tokenpaint.resources import configs_dir

site = Path(sys.argv[1]).resolve()
installed = Path(tokenpaint.__file__).resolve()
assert site in installed.parents, f"tokenpaint was imported from {installed}, not from the fresh install in {site}"
assert site in configs_dir().parents, f"configs found at {configs_dir()}, not inside the installed package"

from tokenpaint import demo
from tokenpaint.transformer import load_transformer_yaml, model_config_from_yaml
from tokenpaint.utils import load_config
from tokenpaint.training.vqgan_stage import SCHEMA as VQGAN_SCHEMA
from tokenpaint.vqgan.config import VQGANConfig

demo_dir = Path(demo.CONFIG_DIR)
names = {p.name for p in demo_dir.glob("*.yaml")}
assert {"gpt.yaml", "mim.yaml", "vqgan.yaml"} <= names, f"demo configs in {demo_dir}: {sorted(names)}"
for path in sorted(configs_dir().rglob("*.yaml")):
    if path.name.startswith("vqgan"):
        VQGANConfig.from_dict(load_config(str(path), VQGAN_SCHEMA)["model"])
    else:
        model_config_from_yaml(load_transformer_yaml(path))
    print(f"loaded {path.relative_to(site)}")
print(f"non-editable install OK: tokenpaint {tokenpaint.__version__} from {installed.parent}")
PY
