#!/usr/bin/env bash
# The GPU figures of the speed-and-scale work, as one prepared script for a machine with CUDA:
# the overhead benchmark (genspec's defaults against a plain hand loop), the CUDA-graph tests,
# every shipped spec run tiny on CUDA (tests/test_specs.py with GENSPEC_TEST_DEVICE=cuda), the
# full-study estimate, and on request the overhead benchmark like for like, the streamed loader
# and the quick study comparison. Each step has its own time limit and the script goes on past a
# failed one; results and the whole log (log.txt) go to $OUT (else reports/benchmarks/).
#
#   bash benchmarks/gpu_check.sh                     # overhead graphs specs study_estimate (about 5 minutes)
#   bash benchmarks/gpu_check.sh overhead_fp32 smoke loader study  # the rest
#
# A device call may run 10 minutes and a session has 15 minutes of device time, the machine's
# start included: the default steps fit one call, most important first (the ratio on a GPU, every
# spec on CUDA, the full study's time), so that a call cut short still brings back the first.
#
# Where genspec's pure-Python dependencies are missing (jsonschema above all), put their wheels in
# .whl/ first; they are installed into /tmp/site. MNIST is read from $GENSPEC_DATA, else .data/
# (gzipped files there are unpacked first, so that a copy travels at a fifth of the size):
#   mkdir -p .data/MNIST/raw && for f in ../shared/data/MNIST/raw/*; do gzip -c $f > .data/MNIST/raw/${f##*/}.gz; done
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 \
#       -d .whl jsonschema jsonschema-specifications referencing rpds-py torch-fidelity
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G '.whl/*.whl' >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
for gz in .data/MNIST/raw/*.gz; do
  [[ -e "$gz" && ! -e "${gz%.gz}" ]] && gunzip -k "$gz"
done
if [[ -z "${GENSPEC_DATA:-}" ]]; then
  GENSPEC_DATA="$PWD/.data"
  [[ -d "$GENSPEC_DATA/MNIST/raw" || ! -d ../shared/data/MNIST/raw ]] || GENSPEC_DATA="$(cd ../shared/data && pwd)"
fi
export GENSPEC_DATA
out="${OUT:-reports/benchmarks}"
mkdir -p "$out"
exec > >(tee -a "$out/log.txt") 2>&1  # the whole log comes back, not only the output's tail

# What every step needs, checked before any of them: genspec imports, MNIST is there.
python3 -c "import genspec, jsonschema" || { echo "genspec does not import: put the missing wheels in .whl/ (see above)"; exit 2; }
[[ -d "$GENSPEC_DATA/MNIST/raw" ]] || { echo "no MNIST under GENSPEC_DATA=$GENSPEC_DATA: copy ../shared/data/MNIST to .data/"; exit 2; }
steps=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=(overhead graphs specs study_estimate)

wanted() { [[ " ${steps[*]} " == *" $1 "* ]]; }
step() { echo "== $1 ($(date +%T))" >&2; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"

if wanted smoke; then
  step "smoke: the quick-start on CUDA"
  timeout 90 python3 -m genspec run specs/quickstart.yaml --out /tmp/genspec_qs --overwrite --no-progress \
    --set train.epochs=3 2>&1 | tail -n 4
fi
if wanted overhead; then
  step "overhead: genspec's CUDA defaults (CUDA graphs, bf16 autocast, channels-last, fused Adam) against a plain fp32 hand loop"
  # deterministic kernels in both loops, so that params_match compares the arithmetic, not cuDNN's choice of order
  timeout 150 python3 benchmarks/overhead.py --deterministic --out "$out/overhead_defaults.jsonl"
fi
if wanted graphs; then
  step "graphs: CUDA-graph replays against eager steps (tests/test_cuda_graphs.py)"
  timeout 120 python3 -m pytest tests/test_cuda_graphs.py -q -p no:cacheprovider -rfEs 2>&1 | tee "$out/graphs.txt" | tail -n 30
fi
if wanted specs; then
  step "specs: every shipped spec, shrunk to 8 steps, end to end on CUDA (CUDA graphs; studies stacked, two seeds)"
  parallel=(); python3 -c "import xdist" 2>/dev/null && parallel=(-n 8)  # pytest-xdist where it is installed
  GENSPEC_TEST_DEVICE=cuda timeout 150 python3 -m pytest tests/test_specs.py -k end_to_end -m "" -q -p no:cacheprovider \
    "${parallel[@]}" -rfEs 2>&1 | tee "$out/specs.txt" | tail -n 40
fi
if wanted study_estimate; then
  step "study: the full 120-run study for 1 and 4 epochs, extrapolated to 250"
  timeout 300 python3 benchmarks/study.py --estimate 1,4 | tee "$out/study_estimate.jsonl"
fi
if wanted overhead_fp32; then
  step "overhead: like for like (fp32, no channels-last, no fused Adam, no CUDA graphs): genspec's own overhead"
  timeout 150 python3 benchmarks/overhead.py --deterministic --set train.precision=fp32 --set train.channels_last=false \
    --set train.fused=false --set train.cuda_graphs=false --out "$out/overhead_fp32.jsonl"
fi
if wanted loader; then
  step "loader: streamed JPEGs against a hand-written ImageFolder DataLoader"
  timeout 100 python3 benchmarks/loader.py --images 4000 --workers 0,4,8,15 | tee "$out/loader.jsonl"
fi
if wanted study; then
  step "study: 12 FC configurations x 2 seeds, 40 steps: sequential, parallel, stacked, stacked in parallel"
  timeout 240 python3 benchmarks/study.py --quick | tee "$out/study.jsonl"
fi
step "done"
