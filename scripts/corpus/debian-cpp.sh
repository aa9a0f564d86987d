#!/usr/bin/env bash
# Fetch real C/C++ Debian source packages (their upstream and Debian tarballs, not
# unpacked: `cxxlm data run` reads the archives directly) into an ignored folder.
#
# Usage: scripts/corpus/debian-cpp.sh [OUT_DIR] [PACKAGE...]
# Default OUT_DIR: corpus/debian. Needs root (it adds deb-src entries derived from the
# machine's own apt sources and runs apt-get update).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-corpus/debian}
shift || true
packages=("$@")
if [ ${#packages[@]} -eq 0 ]; then
    packages=(llvm-toolchain-15 boost1.81 qtbase-opensource-src opencv grpc protobuf abseil
              fmtlib spdlog googletest eigen3 ninja-build gcc-12
              # More projects, of every kind and size, so that a sample is not a few
              # large ones (BENCHMARKS.md, "A sample spread over 60 projects").
              aria2 armadillo benchmark botan box2d bullet capnproto catch2 cli11 cmake cppcheck
              double-conversion fish gdal gecode gflags glm google-glog kcoreaddons kdevelop
              kicad kio konsole krita kwin leveldb libcrypto++ libtorrent-rasterbar nlohmann-json3
              ogre-1.12 okular onetbb opencascade openexr openscad openvdb poco poppler pugixml
              pybind11 qbittorrent qtdeclarative-opensource-src range-v3 rapidjson re2 rocksdb
              simdjson snappy squid thrift tinyxml2 wxwidgets3.2 xapian-core yaml-cpp z3)
fi

src_list=/etc/apt/sources.list.d/cxxlm-deb-src.sources
if ! grep -rqs '^Types:.*deb-src\|^deb-src ' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    tmp=$(mktemp)
    # deb822 files: the same stanzas with Types: deb-src.
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -e "$f" ] || continue
        sed -n '/^Types:/s/^Types:.*/Types: deb-src/p; /^Types:/!p' "$f" >>"$tmp"
        echo >>"$tmp"
    done
    # One-line lists: each `deb` line again as `deb-src`.
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -e "$f" ] || continue
        grep -E '^deb ' "$f" | sed 's/^deb /deb-src /' >>"${src_list%.sources}.list" || true
    done
    if [ -s "$tmp" ]; then mv "$tmp" "$src_list"; else rm -f "$tmp"; fi
    apt-get update -qq
fi

mkdir -p "$out"
cd "$out"
for p in "${packages[@]}"; do
    if ls "${p}"_*.dsc >/dev/null 2>&1; then
        echo "$p: already here"
        continue
    fi
    echo "$p: fetching"
    apt-get source --download-only -qq "$p" || echo "$p: not available, skipped" >&2
done
# Some packages (gcc) ship upstream tarballs inside their orig tarball: those are
# taken out beside it, named so that the package stays the project.
for f in *.orig.tar.*; do
    [ -e "$f" ] || continue
    stem=${f%%.orig.tar.*}
    ls "$stem".orig-*.tar.* >/dev/null 2>&1 && continue
    members=$(tar tf "$f" | grep -v '/$' || true)
    [ "$(echo "$members" | wc -l)" -le 5 ] || continue
    inner=$(echo "$members" | grep -E '/[^/]*(-dfsg)?\.tar\.(xz|gz|bz2)$' | grep -v -E 'newlib|gm2' | head -1 || true)
    [ -n "$inner" ] || continue
    echo "$f: taking out $inner"
    tar xf "$f" -O "$inner" >"$stem.orig-$(basename "$inner").tmp"
    mv "$stem.orig-$(basename "$inner").tmp" "$stem.orig-$(basename "$inner")"
done
du -sh .
