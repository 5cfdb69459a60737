#!/usr/bin/env bash
# Fetch, on a machine with internet, the wheels that a CUDA machine without internet lacks to run
# train.py, the tests and scripts/gpu_suite.py: the Hydra stack, pinned to the versions this project
# is tested with. Everything else is assumed there (as on common CUDA images with PyTorch: torch,
# triton, numpy, tokenizers, tqdm, PyYAML, packaging, safetensors, matplotlib, pytest); datasets and
# wandb are imported only when a run asks for them (an hf corpus, logger=wandb), so they stay behind.
#
#   bash scripts/offline_wheels.sh [DEST=.whl] [PYTHON_VERSION=3.12]     # here: 3 wheels, 393 KB in all
#   python scripts/gpu_suite.py --wheels .whl --out results/              # there: installs them first
#   # or by hand, there:
#   python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#
# DEST (.whl/) is git-ignored: copy it along with the repository. PYTHON_VERSION is the target
# machine's (the wheels are pure Python; pip checks the tags against it). EXTRA="name==version ..."
# adds packages (name their dependencies too: --no-deps fetches none).
set -euo pipefail
dest=${1:-.whl}
pyver=${2:-3.12}
pins="hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 ${EXTRA:-}"
mkdir -p "$dest"
for pkg in $pins; do  # one version of each in DEST: two of one package stop the whole install
  stem=$(echo "${pkg%%==*}" | tr '-' '_')
  rm -f "$dest/$stem"-*.whl
done
platforms=""
for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
  platforms="$platforms --platform $p"
done
for pkg in $pins; do
  case $pkg in
    antlr4-python3-runtime*)  # published as an sdist only: build its pure-Python wheel here
      python3 -m pip wheel --no-deps -q -w "$dest" "$pkg" ;;
    *)
      python3 -m pip download --no-deps --only-binary=:all: --python-version "$pyver" \
        --implementation cp $platforms -q -d "$dest" "$pkg" ;;
  esac
done
ls -l "$dest"/*.whl
du -ch "$dest"/*.whl | tail -1
