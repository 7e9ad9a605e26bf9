#!/usr/bin/env bash
# Installs every dependency of gbmoe: Debian packages and the LibTorch (torch wheel) venv.
# Idempotent: a second run installs nothing new. Downloads only from Debian and PyPI mirrors.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

debian_packages=(
  build-essential cmake ninja-build ccache clang-format git pkg-config
  openmpi-bin libopenmpi-dev
  libcxxopts-dev libyaml-cpp-dev
  libgtest-dev libgmock-dev googletest
  libbenchmark-dev
  libsentencepiece-dev sentencepiece
  nlohmann-json3-dev zlib1g-dev
)

missing=()
for p in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The venv, the CPU and CUDA builds and the test corpus take about 15 GiB; say so up front where
# the disk has less, since pip and the compiler only report "No space left on device".
free_kib=$(df -Pk "$root" | awk 'NR == 2 { print $4 }')
if [ -n "$free_kib" ] && [ "$free_kib" -lt $((15 * 1024 * 1024)) ]; then
  echo "setup: warning: $((free_kib / 1024 / 1024)) GiB free on the disk of $root; the venv, the" \
    "builds and the tests need about 15 GiB" >&2
fi

# LibTorch comes from the CPU torch wheel, in a venv inside the project (ignored by git).
torch_version=${GBMOE_TORCH_VERSION:-2.13.0}
venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$torch_version' else 1)" 2>/dev/null; then
  echo "setup: installing torch==$torch_version into $venv"
  "$venv/bin/pip" install -q "torch==$torch_version" numpy
fi
"$venv/bin/python" -c "import numpy" 2>/dev/null || "$venv/bin/pip" install -q numpy
# matplotlib draws the pictures of scripts/plot_runs.py (the balance comparison report).
matplotlib_version=3.11.2
if ! "$venv/bin/python" -c "import matplotlib, sys; sys.exit(0 if matplotlib.__version__ == '$matplotlib_version' else 1)" 2>/dev/null; then
  echo "setup: installing matplotlib==$matplotlib_version into $venv"
  "$venv/bin/pip" install -q "matplotlib==$matplotlib_version"
fi
# transformers, safetensors and tokenizers: the Hugging Face interoperability tests
# (tests/train/hf_interop_test.py) build, save and load models with them.
hf_packages=(transformers==5.17.0 safetensors==0.8.0 tokenizers==0.23.3)
if ! "$venv/bin/python" - "${hf_packages[@]}" <<'PY' 2>/dev/null; then
import importlib.metadata as md, sys
sys.exit(0 if all(md.version(p.split("==")[0]) == p.split("==")[1] for p in sys.argv[1:]) else 1)
PY
  echo "setup: installing ${hf_packages[*]} into $venv"
  "$venv/bin/pip" install -q "${hf_packages[@]}"
fi
# tensorboard: its event reader checks the event files gbmoe-train writes (tests), and it shows them.
tensorboard_version=2.21.0
if ! "$venv/bin/python" -c "import tensorboard, sys; sys.exit(0 if tensorboard.__version__ == '$tensorboard_version' else 1)" 2>/dev/null; then
  echo "setup: installing tensorboard==$tensorboard_version into $venv"
  "$venv/bin/pip" install -q "tensorboard==$tensorboard_version"
fi
echo "setup: done (torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)'))"
