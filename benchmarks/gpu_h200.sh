#!/usr/bin/env bash
# benchmarks/gpu_h200.py on the lent H200, from the repository root:
#   bash benchmarks/gpu_h200.sh [--parts mae,simclr] [--budget-s 420] ...
# That machine's image has torch, torchvision, timm, accelerate, einops and PyYAML but no package
# registry; this package's other needs travel as wheels in $WHEELS (default .whl, see
# benchmarks/README.md) and are unpacked into /tmp/site. The JSON goes to stdout and, where the
# device runner sets $OUT, to $OUT/gpu_h200.json. PYTHON picks the interpreter (default python3).
set -euo pipefail
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" >&2
exec "$PYTHON" -m benchmarks.gpu_h200 "$@"
