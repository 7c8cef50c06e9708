#!/usr/bin/env bash
# The prepared GPU check: everything a GPU machine with CUDA 13 but no Rust, Deno or network
# needs to run the CUDA parity tests, the one-GPU NCCL check and bench/gpu.ts, in one call of
# under 8 minutes.
#
#   tools/gpu-check.sh pack     here (Rust + npx): builds the stripped release library and the
#                               CUDA test binaries, packs them with an xz-compressed Deno into
#                               .device/ (git-ignored) and checks that it travels (< 64 MiB)
#   tools/gpu-check.sh device   there, from the repo root: unpacks Deno, runs the NVRTC and
#                               parity tests, the NCCL check (rust/tests/nccl.rs: a one-rank
#                               communicator's all-reduce on the backend's stream must leave
#                               its input unchanged) and bench/gpu.ts, writes logs and results to $OUT
#                               (./out when unset); without a GPU it prints one line, exits 3
#
# .device/ is git-ignored, so it must be carried: with this workplace's device tool, run
# `tools/gpu-check.sh device` with carry [".device"] and timeout_s 540 (the budget is 470 s).
# GPU_CHECK_BUDGET_S overrides the budget.
#
# The TypeScript sources are not packed: they are tracked files and travel with the tree.
# CUDA libraries are not packed either: the engine loads them at run time (cudarc dynamic
# loading, by SONAME: libcuda.so.1, libnvrtc.so.13, libcublas(Lt).so.13, libcusolver.so.12,
# libcusparse.so.12, libnvJitLink.so.13), preloading them from $QGALORE_CUDA_LIB_DIR when set.
# `device` sets it to the first folder holding libnvrtc.so.13 and libcublas.so.13 among: the
# value given, python3's pip `nvidia/cu13/lib` (PyTorch's CUDA 13 wheels), /usr/local/cuda.
# NCCL: cudarc opens it as `libnccl.so` (the development link), which pip's nvidia-nccl-cu13
# and the libnccl2 package lack; `device` finds a libnccl.so.2 ($QGALORE_NCCL_LIB_DIR, pip's
# nvidia/nccl/lib or nvidia/cu13/lib, the CUDA folder, ldconfig) and links libnccl.so to it
# in a private folder on LD_LIBRARY_PATH. Without one the NCCL check is reported NOT RUN.
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=.device
LIMIT_MIB=64
BUDGET_S=${GPU_CHECK_BUDGET_S:-470} # the device part's whole run, under the 8-minute target

die() { echo "gpu-check: $*" >&2; exit "${EXIT:-1}"; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

pack() {
  command -v cargo >/dev/null || die "cargo not found: pack runs where the Rust toolchain is"
  command -v xz >/dev/null || die "xz not found (apt-get install xz-utils)"
  mkdir -p "$PACK"
  echo "gpu-check: building the release library and the CUDA test binaries…"
  (cd rust && cargo build --release --quiet)
  # The test binaries' paths, from cargo's own report (hashes change with every build).
  local json
  json=$(cd rust && cargo test --release --no-run --message-format=json --test cuda_parity --test kernels --test nccl) ||
    die "building the CUDA test binaries failed: cd rust && cargo test --release --no-run --test cuda_parity --test kernels --test nccl"
  local t exe
  for t in cuda_parity kernels nccl; do
    exe=$(grep -o "\"executable\":\"[^\"]*/$t-[0-9a-f]*\"" <<<"$json" | tail -1 | cut -d'"' -f4)
    [ -n "$exe" ] && [ -x "$exe" ] || die "no test binary for $t in cargo's report"
    strip -o "$PACK/$t" "$exe"
  done
  strip -o "$PACK/libqgalore.so" rust/target/release/libqgalore.so

  # Deno: the pinned npm build, xz-compressed; recompressed only when the binary changes.
  local deno=${DENO_BIN:-}
  [ -n "$deno" ] || deno=$(DENO_NO_UPDATE_CHECK=1 npx -y deno@2.9.6 eval 'console.log(Deno.execPath())')
  [ -x "$deno" ] || die "no Deno binary (set DENO_BIN)"
  local sum
  sum=$(sha256sum "$deno" | cut -d' ' -f1)
  if [ ! -f "$PACK/deno.xz" ] || [ "$(cat "$PACK/deno.sha256" 2>/dev/null)" != "$sum" ]; then
    echo "gpu-check: compressing Deno $("$deno" --version | head -1 | cut -d' ' -f2) (xz -9, about 1.5 min)…"
    xz -9 -T1 -c "$deno" >"$PACK/deno.xz.tmp" && mv "$PACK/deno.xz.tmp" "$PACK/deno.xz"
    echo "$sum" >"$PACK/deno.sha256"
  fi

  # bench/gpu.ts must need nothing from the network: only local files and node: built-ins.
  local mods remote
  mods=$(DENO_NO_UPDATE_CHECK=1 "$deno" info --json bench/gpu.ts |
    python3 -c 'import json, sys; print("\n".join(m["specifier"] for m in json.load(sys.stdin)["modules"]))')
  remote=$(grep -v -e '^file://' -e '^node:' <<<"$mods" || true)
  [ -z "$remote" ] || die "bench/gpu.ts imports remote modules: $remote"

  {
    echo "gpu-check pack: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo '+changes') $(date -u +%FT%TZ)"
    (cd "$PACK" && sha256sum libqgalore.so cuda_parity kernels nccl deno.xz)
    echo "bench/gpu.ts runs from the tree (tracked files): $(sed "s#^file://$PWD/##" <<<"$mods" | tr '\n' ' ')"
  } >"$PACK/MANIFEST"

  local bytes tree
  bytes=$(du -cb "$PACK" | tail -1 | cut -f1)
  tree=$( (git ls-files -co --exclude-standard -z 2>/dev/null || true) | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
  ls -l "$PACK" | tail -n +2
  echo "gpu-check: $PACK/ is $(mib "$bytes") MiB; with the working tree ($(mib "${tree:-0}") MiB) $(mib $((bytes + ${tree:-0}))) MiB of the ${LIMIT_MIB} MiB that travel"
  [ $((bytes + ${tree:-0})) -lt $((LIMIT_MIB * 1048576)) ] || die "too large to travel"
  echo "gpu-check: on the GPU machine, from the repo root with $PACK carried: tools/gpu-check.sh device"
}

# The folder of a libnccl.so.2, first found: $QGALORE_NCCL_LIB_DIR, python3's pip wheels
# (nvidia/nccl/lib, nvidia/cu13/lib), $QGALORE_CUDA_LIB_DIR, /usr/local/cuda, ldconfig's cache.
find_nccl() {
  local pip cand
  pip=$(python3 -c 'import nvidia, os; print("\n".join(os.path.join(p, d, "lib") for p in nvidia.__path__ for d in ("nccl", "cu13")))' 2>/dev/null || true)
  while read -r cand; do
    if [ -n "$cand" ] && [ -e "$cand/libnccl.so.2" ]; then echo "$cand"; return; fi
  done < <(printf '%s\n' "${QGALORE_NCCL_LIB_DIR:-}" "$pip" "${QGALORE_CUDA_LIB_DIR:-}" /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
    "$(ldconfig -p 2>/dev/null | awk '/libnccl\.so\.2 / { print $NF; exit }' | xargs -r dirname)")
}

# Seconds left of the device budget.
left() { echo $((END - $(date +%s))); }

# step NAME CAP_S LOGFILE CMD…: runs CMD under timeout (CAP_S or what is left), logs, records.
step() {
  local name=$1 cap=$2 log=$3
  shift 3
  local t=$(($(left) - 5)) rc t0
  [ "$t" -lt "$cap" ] || t=$cap
  if [ "$t" -lt 10 ]; then
    echo "$name: SKIPPED (budget spent)" | tee -a "$OUT/results.txt"
    FAIL=1
    return
  fi
  echo "gpu-check: $name (at most ${t}s)…"
  t0=$(date +%s)
  set +e
  timeout --kill-after=10 "$t" "$@" >"$log" 2>&1
  rc=$?
  set -e
  local verdict=ok
  if [ $rc = 124 ] || [ $rc = 137 ]; then verdict="TIMED OUT after ${t}s"; elif [ $rc != 0 ]; then verdict="FAILED (exit $rc)"; fi
  [ "$verdict" = ok ] || FAIL=1
  echo "$name: $verdict in $(($(date +%s) - t0))s (log: $(basename "$log"))" | tee -a "$OUT/results.txt"
}

device() {
  OUT=${OUT:-./out}
  mkdir -p "$OUT"
  OUT=$(cd "$OUT" && pwd)
  local log="$OUT/gpu-check.log"
  : >"$OUT/results.txt"
  local f
  for f in libqgalore.so cuda_parity kernels nccl deno.xz; do
    [ -f "$PACK/$f" ] || EXIT=2 die "$PACK/$f missing: run tools/gpu-check.sh pack first and carry $PACK"
  done
  START=$(date +%s)
  END=$((START + BUDGET_S))
  local work=${TMPDIR:-/tmp}/gpu-check
  mkdir -p "$work"
  {
    echo "gpu-check device: $(date -u +%FT%TZ) on $(uname -srm)"
    cat "$PACK/MANIFEST"
  } >"$log"

  # Deno, unpacked outside the tree (xz, or Python's lzma where xz is missing).
  if command -v xz >/dev/null; then
    xz -dc "$PACK/deno.xz" >"$work/deno"
  else
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
      "$PACK/deno.xz" "$work/deno"
  fi
  chmod +x "$work/deno" "$PACK/cuda_parity" "$PACK/kernels" "$PACK/nccl"
  "$work/deno" --version >>"$log" 2>&1 || EXIT=2 die "the packed Deno does not run here (see $log)"

  # The GPU: nvidia-smi must list one; otherwise one line and nothing is run.
  local gpus
  if ! command -v nvidia-smi >/dev/null; then
    echo "no GPU: nvidia-smi not found" >>"$log"
    EXIT=3 die "no NVIDIA GPU found (nvidia-smi not found); nothing run"
  fi
  if ! gpus=$(nvidia-smi -L 2>&1) || ! grep -q '^GPU ' <<<"$gpus"; then
    echo "no GPU: nvidia-smi -L: $gpus" >>"$log"
    EXIT=3 die "no NVIDIA GPU found (nvidia-smi -L: $(head -1 <<<"$gpus")); nothing run"
  fi
  echo "$gpus" | tee -a "$log"
  nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true

  # The CUDA 13 libraries (see the header).
  local dir cand
  dir=""
  local pip
  pip=$(python3 -c 'import nvidia, os; print("\n".join(os.path.join(p, "cu13", "lib") for p in nvidia.__path__))' 2>/dev/null || true)
  while read -r cand; do
    if [ -n "$cand" ] && [ -e "$cand/libnvrtc.so.13" ] && [ -e "$cand/libcublas.so.13" ]; then dir=$cand; break; fi
  done < <(printf '%s\n' "${QGALORE_CUDA_LIB_DIR:-}" "$pip" /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib)
  [ -n "$dir" ] || EXIT=2 die "GPU present but no folder with libnvrtc.so.13 and libcublas.so.13 (set QGALORE_CUDA_LIB_DIR)"
  export QGALORE_CUDA_LIB_DIR=$dir
  # The driver's libcuda.so.1 is normally on the loader path already; the NVIDIA container
  # mount is added in case it is not.
  local ld=$dir
  [ ! -d /usr/local/nvidia/lib64 ] || ld=$ld:/usr/local/nvidia/lib64
  export LD_LIBRARY_PATH=$ld${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export QGALORE_CACHE=$work/kernel-cache QGALORE_REQUIRE_NVRTC=1
  export QGALORE_LIB=$PWD/$PACK/libqgalore.so
  export DENO_DIR=$work/deno-dir DENO_NO_UPDATE_CHECK=1 NO_COLOR=1
  echo "CUDA libraries: $dir" | tee -a "$log"

  FAIL=0
  step "kernels (NVRTC, sm_80 and sm_90)" 60 "$OUT/kernels.log" "$PACK/kernels" --test-threads=1 --nocapture
  step "cuda_parity (GPU against CPU)" 180 "$OUT/parity.log" "$PACK/cuda_parity" --test-threads=1 --nocapture
  if grep -q "skipped: no GPU" "$OUT/parity.log" 2>/dev/null; then
    echo "cuda_parity: the engine found no GPU although nvidia-smi lists one (CUDA libraries?)" | tee -a "$OUT/results.txt"
    FAIL=1
  fi
  # NCCL on one GPU: a one-rank communicator (two ranks on one GPU are not attempted: NCCL
  # refuses them). Missing NCCL is reported, not failed: the machine lacks a library.
  local nccl_dir
  nccl_dir=$(find_nccl)
  if [ -z "$nccl_dir" ]; then
    echo "nccl (one-rank communicator): NOT RUN (no libnccl.so.2 found: set QGALORE_NCCL_LIB_DIR)" | tee -a "$OUT/results.txt"
  else
    local link=$work/nccl-link
    mkdir -p "$link"
    if [ -e "$nccl_dir/libnccl.so" ]; then link=$nccl_dir; else ln -sf "$nccl_dir/libnccl.so.2" "$link/libnccl.so"; fi
    echo "NCCL library: $nccl_dir/libnccl.so.2 (opened as $link/libnccl.so)" | tee -a "$log"
    step "nccl (one-rank communicator on the GPU)" 45 "$OUT/nccl.log" \
      env LD_LIBRARY_PATH="$link:$nccl_dir:$LD_LIBRARY_PATH" QGALORE_REQUIRE_NCCL=1 NCCL_DEBUG=WARN \
      "$PACK/nccl" --exact one_rank_communicator --nocapture --test-threads=1
  fi
  # bench/gpu.ts prints one JSON line per case; partial output survives a timeout. The 7B
  # step runs in its own call (after one small case) so a slow model sweep cannot starve it.
  step "bench/gpu.ts llama-60m…1b" 170 "$OUT/bench.jsonl" \
    "$work/deno" run -A bench/gpu.ts --skip-7b
  step "bench/gpu.ts llama-7b qgalore step" 200 "$OUT/bench-7b.jsonl" \
    "$work/deno" run -A bench/gpu.ts --models llama-60m --optimizers adamw

  local total=$(($(date +%s) - START))
  echo "total: ${total}s of ${BUDGET_S}s" | tee -a "$OUT/results.txt"
  cat "$OUT/results.txt" >>"$log"
  if [ "$FAIL" != 0 ]; then
    echo "gpu-check: FAILED (see $OUT/results.txt and the logs beside it)"
    exit 1
  fi
  echo "gpu-check: passed; results in $OUT"
}

case "${1:-}" in
  pack) pack ;;
  device) device ;;
  *)
    echo "usage: tools/gpu-check.sh pack|device   (see the header of this file)" >&2
    exit 2
    ;;
esac
