#!/usr/bin/env bash
# Install bidst with everything its jobs and tests need: PyTorch (CPU build pinned), the package
# with its test/plot/vision extras, and the Fashion-MNIST files from Debian where apt is available.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# torch is pinned: an unpinned install pulls a multi-GB CUDA build
"$PYTHON" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[test,plots,images]"

# Fashion-MNIST (real IDX files) from Debian's package, when we may use apt; otherwise bidst
# downloads it into ~/.cache/bidst on first use, or says how to get it.
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
            || echo "setup: could not install dataset-fashion-mnist with apt; bidst will try to download it" >&2
    else
        echo "setup: not root, skipping 'apt-get install dataset-fashion-mnist'; bidst will try to download it" >&2
    fi
fi
echo "setup: bidst $("$PYTHON" -c 'import bidst; print(bidst.__version__)') installed" >&2
