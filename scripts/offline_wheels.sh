#!/usr/bin/env bash
# Download, on a machine with internet, the wheels that a GPU machine without internet needs to run
# train.py and sample.py: the Hydra stack. torch, numpy, tokenizers, tqdm, matplotlib and
# safetensors are assumed to be there already (they are on common CUDA images); datasets and wandb
# are imported only when a run asks for them (an hf corpus, logger=wandb), so they are optional.
#
#   bash scripts/offline_wheels.sh [DEST=.whl] [PYTHON_VERSION=3.12]      # here
#   python3 -m pip install --no-index --no-deps --target /tmp/site DEST/*.whl \
#       && export PYTHONPATH=/tmp/site                                     # there
#
# EXTRA="wandb==0.31.0 ..." adds packages (name their dependencies too: --no-deps fetches none).
set -euo pipefail
dest=${1:-.whl}
pyver=${2:-3.12}
mkdir -p "$dest"
packages="hydra-core omegaconf antlr4-python3-runtime==4.9.3 ${EXTRA:-}"
platforms=""
for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
  platforms="$platforms --platform $p"
done
for pkg in $packages; do
  case $pkg in
    antlr4-python3-runtime*)  # ships as an sdist only: build its (pure Python) wheel here
      python3 -m pip wheel --no-deps -q -w "$dest" "$pkg" ;;
    *)
      python3 -m pip download --no-deps --only-binary=:all: --python-version "$pyver" \
        --implementation cp $platforms -q -d "$dest" "$pkg" ;;
  esac
done
ls -1 "$dest"
