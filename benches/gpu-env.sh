# Sourced by the GPU benches once they have set $work (scratch) and $out (results): libtorch
# from the Python wheel, bubblewrap from gpu/ where the machine lacks it (it judges the
# model's programs), the binaries of gpu/cxxlm.tar.xz unpacked into $work, the GPU recorded.
# Results come back as few files: unless the bench set its own exit trap, a results folder
# of more than 8 files is packed on exit into results.tar.gz beside summary.txt.
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
command -v bwrap >/dev/null || export PATH=$PWD/gpu/bin:$PATH LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$PWD/gpu/lib
[ -x "$work/cxxlm-torch" ] || python3 -c "import sys,tarfile;tarfile.open(sys.argv[1]).extractall(sys.argv[2])" gpu/cxxlm.tar.xz "$work"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
nproc >"$out/cores.txt"

bundle_results() {
    local files
    files=$(find "$out" -type f | wc -l)
    if [ "$files" -gt 8 ]; then
        (cd "$out" && find . -type f ! -name summary.txt ! -name results.tar.gz -print0 \
            | tar -czf results.tar.gz --null -T - --remove-files)
    fi
}
[ -n "$(trap -p EXIT)" ] || trap bundle_results EXIT
