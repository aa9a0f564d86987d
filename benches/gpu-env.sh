# Sourced by the GPU benches once they have set $work (scratch) and $out (results): libtorch
# from the Python wheel, bubblewrap and make from gpu/ where the machine lacks them (they
# judge the model's programs), the binary of gpu/cxxlm.tar.xz unpacked into $work, the GPU recorded.
# Results come back as few files: unless the bench set its own exit trap, a results folder
# of more than 8 files is packed on exit into results.tar.gz beside summary.txt.
# What an earlier call staged (benches/stage.sh) and this one did not carry.
for staged in /tmp/cxxlm-stage/*; do
    if [ -e "$staged" ] && [ ! -e "gpu/${staged##*/}" ]; then ln -s "$staged" "gpu/${staged##*/}"; fi
done
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
command -v bwrap >/dev/null || export PATH=$PWD/gpu/bin:$PATH LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$PWD/gpu/lib
# The sandbox runs /usr/bin's programs: the agent's task repositories build with make.
if [ ! -x /usr/bin/make ] && [ -x gpu/bin/make ]; then
    { cp gpu/bin/make /usr/bin/make 2>/dev/null && echo "installed gpu/bin/make as /usr/bin/make"; } ||
        echo "no make in /usr/bin: the agent's task repositories cannot build" >&2
fi
[ -x "$work/cxxlm-torch" ] || python3 -c "import sys,tarfile;tarfile.open(sys.argv[1]).extractall(sys.argv[2])" gpu/cxxlm.tar.xz "$work"
# cxxlm-torch runs every command; as cxxlm it is what the runs' own stages start again.
[ -e "$work/cxxlm" ] || ln -s cxxlm-torch "$work/cxxlm"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
nproc >"$out/cores.txt"

# $work/pre: the run PRETRAINED names, linked; or a d12 pretrained for $1 seconds on
# gpu/data (packed into $work/pack first) with the bench's "${shapes[@]}".
pretrained_d12() {
    rm -rf "$work/pre"
    if [ -n "${PRETRAINED:-}" ]; then
        ln -s "$PRETRAINED" "$work/pre"
        return
    fi
    [ -f "$work/pack/pack.json" ] || "$work/cxxlm" pack --tokenizer gpu/tokenizer.json -i gpu/data \
        -o "$work/pack" --val-fraction 0.005 >"$out/pack.log"
    "$work/cxxlm" train pretrain --pack "$work/pack" --out "$work/pre" --set model.preset=d12 "${shapes[@]}" \
        --set train.steps=5000 --set train.time_budget="$1" --set eval.every=0 \
        >"$out/pretrain.log" 2>&1 || { tail -20 "$out/pretrain.log"; exit 1; }
}

bundle_results() {
    local files
    files=$(find "$out" -type f | wc -l)
    if [ "$files" -gt 8 ]; then
        (cd "$out" && find . -type f ! -name summary.txt ! -name results.tar.gz -print0 \
            | tar -czf results.tar.gz --null -T - --remove-files)
    fi
}
[ -n "$(trap -p EXIT)" ] || trap bundle_results EXIT
