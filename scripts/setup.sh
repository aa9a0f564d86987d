#!/usr/bin/env bash
# Everything a fresh Debian 12 machine with a Rust toolchain needs for cxxlm's main job
# and its tests: archive tools and git for the readers' tests, and Python's zstandard
# and tokenizers modules to check that Python reads our shards and our tokenizer.
set -euo pipefail
missing=()
for tool in git tar xz zstd bzip2 python3; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    pkgs=()
    for tool in "${missing[@]}"; do
        case $tool in
            xz) pkgs+=(xz-utils) ;;
            python3) pkgs+=(python3 python3-pip) ;;
            *) pkgs+=("$tool") ;;
        esac
    done
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi
if ! python3 -c 'import zstandard, tokenizers' 2>/dev/null; then
    python3 -m pip install -q zstandard tokenizers 2>/dev/null ||
        python3 -m pip install -q --break-system-packages zstandard tokenizers
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }
