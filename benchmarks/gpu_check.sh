#!/usr/bin/env bash
# One-shot GPU check for a session lent a GPU machine (see the README's "GPU check" section).
#
# Before the run, on the CPU machine:
#   mkdir -p .gpu && cp ../shared/device/*.whl .gpu/ && echo /.gpu/ >> .git/info/exclude
#   .venv/bin/pip download -q -d .gpu pytest pluggy iniconfig packaging jsonargparse docstring-parser typeshed-client
# then:  run(command="bash benchmarks/gpu_check.sh", carry=[".gpu"], timeout_s=560)
# Everything it prints is also written under $OUT; commit $OUT/*.txt to benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/dmmh-gpu-out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.txt"
exec > >(tee -a "$LOG") 2>&1

echo "# dmmh GPU check — $(date -u +%Y-%m-%dT%H:%MZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PY=${PY:-python3}

# mamba-ssm (wheel in .gpu/, built for this machine) and any test tools the image lacks, into a side folder
SITE=/tmp/dmmh-site
mkdir -p "$SITE"
if ls .gpu/mamba_ssm-*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-deps --target "$SITE" .gpu/mamba_ssm-*.whl
fi
for whl in .gpu/*.whl; do
  case "$whl" in *mamba_ssm*) ;; *) $PY -m pip install -q --no-deps --target "$SITE" "$whl" 2>/dev/null || true ;; esac
done
export PYTHONPATH="$PWD:$SITE:${PYTHONPATH:-}"
$PY - <<'PYEOF'
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "device", torch.cuda.get_device_name())
try:
    import selective_scan_cuda  # noqa: F401
    print("mamba-ssm CUDA extension: importable")
except Exception as e:
    print("mamba-ssm CUDA extension: NOT importable:", e)
PYEOF

status=0
step() { echo; echo "## $*"; "$@" || { echo "!! failed ($?): $*"; status=1; }; }

export PYTHONUNBUFFERED=1
# each step's limit keeps the whole run inside one call of about 9 minutes (the session has 15)
step timeout 180 $PY -m pytest -q -p no:cacheprovider -m cuda tests
step timeout 120 $PY benchmarks/bench_model.py --device cuda --batch 4096 --train-batch 1024 --repeats 5 --agreement-epochs 5 --out "$OUT"
step timeout 60 $PY benchmarks/bench_selective_scan.py --device cuda --repeats 10 --out "$OUT"
step timeout 60 $PY benchmarks/bench_pack.py --device cuda --out "$OUT"
step timeout 60 $PY benchmarks/bench_knn.py --device cuda --out "$OUT"
step timeout 45 $PY benchmarks/bench_map.py --device cuda --repeats 3 --baseline-queries 200
echo; echo "# done, status $status"
exit $status
