#!/usr/bin/env bash
# Everything a fresh Debian 12 machine with a Rust toolchain needs for cxxlm's main job
# and its tests: archive tools and git for the readers' tests; g++ (libstdc++'s headers
# are test data, and it judges model programs) and bubblewrap (their sandbox); a font
# for the report card's plots; torch
# 2.11 (libtorch for the trainer) with the CUDA headers its wheel lacks; and the Python modules that check that other tools
# read our files: zstandard (shards), tokenizers (tokenizer.json), megatron-core (.bin/.idx),
# transformers (exported models); and openai, a real client of `cxxlm serve`.
set -euo pipefail
missing=()
for tool in git tar xz zstd bzip2 python3 g++ bwrap; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(font)
if [ ${#missing[@]} -gt 0 ]; then
    pkgs=()
    for tool in "${missing[@]}"; do
        case $tool in
            xz) pkgs+=(xz-utils) ;;
            bwrap) pkgs+=(bubblewrap) ;;
            font) pkgs+=(fonts-dejavu-core) ;;
            python3) pkgs+=(python3 python3-pip) ;;
            *) pkgs+=("$tool") ;;
        esac
    done
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi
# nvidia-cuda-crt completes the CUDA headers of torch's wheel, for the CUDA-graph shim.
python_modules=(zstandard tokenizers torch==2.11.0 nvidia-cuda-crt==13.0.88 megatron-core==0.16.1 transformers==5.18.0 openai==3.22.1)
if ! python3 -W ignore -c 'import zstandard, tokenizers, torch, megatron.core.datasets.indexed_dataset, os, openai, transformers
assert transformers.__version__ == "5.18.0" and openai.__version__ == "3.22.1"
assert os.path.exists(os.path.join(os.path.dirname(torch.__file__), "../nvidia/cu13/include/crt/host_config.h"))' 2>/dev/null; then
    python3 -m pip install -q "${python_modules[@]}" 2>/dev/null ||
        python3 -m pip install -q --break-system-packages "${python_modules[@]}"
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }
