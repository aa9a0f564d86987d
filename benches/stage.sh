#!/usr/bin/env bash
# For a bench whose gpu/ inputs and the tree are more than the 64 MiB one call carries: a
# first call carries some of them (say gpu/data) and runs this, which copies them to
# /tmp/cxxlm-stage on the GPU machine; the next call, on the same warm machine, carries
# the rest, and benches/gpu-env.sh puts the staged ones back under gpu/.
#
# Usage: benches/stage.sh gpu/PATH...
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p /tmp/cxxlm-stage
for p in "$@"; do
    case "$p" in gpu/?*) ;; *) echo "stage.sh: $p is not under gpu/" >&2; exit 1 ;; esac
    rm -rf "/tmp/cxxlm-stage/${p#gpu/}"
    mkdir -p "$(dirname "/tmp/cxxlm-stage/${p#gpu/}")"
    cp -r "$p" "/tmp/cxxlm-stage/${p#gpu/}"
done
du -sh /tmp/cxxlm-stage/*
