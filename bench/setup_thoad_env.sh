#!/usr/bin/env bash
# Create the Python 3.12 virtual environment that the benchmark uses to run thoad and
# jet-for-pytorch.
#
# thoad (https://pypi.org/project/thoad/) and jet-for-pytorch
# (https://pypi.org/project/jet-for-pytorch/, the taylor sweep's peer) need Python >= 3.12,
# while hod and the rest of the benchmark run on the project's interpreter. The harness
# therefore talks to them through worker processes (bench/thoad_worker.py, bench/jet_worker.py)
# started with this environment's interpreter.
#
# Usage (from anywhere):   bash bench/setup_thoad_env.sh
# Environment overrides:
#   PYTHON312        path of a Python 3.12+ interpreter (default: first found of python3.12 on
#                    PATH, pyenv's 3.12.x, /usr/bin/python3.12)
#   THOAD_VENV       where to create the environment (default: <repo>/.venv312, git-ignored)
#   TORCH_VERSION    torch version to install (default: 2.13.0, the project's pin)
#   TORCH_INDEX_URL  extra index to take torch from, e.g. https://download.pytorch.org/whl/cpu
#                    for the CPU-only build where that index is reachable. Without it pip takes
#                    torch from PyPI, whose Linux wheel is the CUDA build (several GB with its
#                    nvidia-* dependencies); it runs on CPU-only machines all the same.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${THOAD_VENV:-$ROOT/.venv312}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
THOAD_VERSION="0.1.0"
JET_VERSION="1.0.0"

is_python312() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

find_python312() {
    if [[ -n "${PYTHON312:-}" ]]; then
        is_python312 "$PYTHON312" && echo "$PYTHON312"
        return
    fi
    local candidate
    # pyenv shims on PATH may exist without the version being selected: try each candidate.
    for candidate in \
        "$(command -v python3.12 || true)" \
        "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python \
        /usr/bin/python3.12 \
        "$(command -v python3.13 || true)"; do
        if [[ -n "$candidate" && -x "$candidate" ]] && is_python312 "$candidate"; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

if ! PY="$(find_python312)"; then
    echo "error: no working Python >= 3.12 found; set PYTHON312=/path/to/python3.12" >&2
    exit 1
fi

echo "creating $VENV with $PY ($("$PY" --version))"
"$PY" -m venv "$VENV"

PIP_ARGS=()
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    PIP_ARGS+=(--extra-index-url "$TORCH_INDEX_URL")
fi
"$VENV/bin/python" -m pip install ${PIP_ARGS[@]+"${PIP_ARGS[@]}"} "torch==$TORCH_VERSION" "thoad==$THOAD_VERSION" \
    "jet-for-pytorch==$JET_VERSION" numpy

"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import sys

import jet
import torch
import thoad  # noqa: F401

x = torch.rand(3, 4, requires_grad=True)
ctrl = thoad.backward(tensor=(x @ x.T).sum(), order=2)
block, _ = ctrl.fetch_hgrad(variables=(x, x))
ctrl.clear()
y = torch.rand(3)
lap = jet.laplacian(lambda v: torch.tanh(v).sum().reshape(1), (y,))(y)
exact = (-2 * torch.tanh(y) / torch.cosh(y) ** 2).sum()
assert torch.allclose(lap, exact.reshape(1), atol=1e-6), (lap, exact)
print(
    f"ok: python {sys.version.split()[0]}, torch {torch.__version__} "
    f"(cuda build: {torch.version.cuda}), thoad {md.version('thoad')}, "
    f"second-order block shape {tuple(block.shape)}; jet-for-pytorch "
    f"{md.version('jet-for-pytorch')}, Laplacian of sum(tanh) checked"
)
EOF
echo "environment ready: $VENV (the benchmark finds it there, or set THOAD_PYTHON)"
