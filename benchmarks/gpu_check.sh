#!/usr/bin/env bash
# One command for the GPU check (unattended, about 8 minutes on one H100/H200):
#   1. the CUDA tests (tests/cuda: every storage policy on CUDA against the CPU, solve, bench),
#   2. benchmarks/gpu_profile.py --device cuda -> results/gpu_profile_cuda.json (kernels, launches, syncs)
#   3. benchmarks/gpu_step.py --device cuda    -> results/gpu_step_cuda.json
#   4. benchmarks/vs_deepxde.py --device cuda  -> results/vs_deepxde_cuda.json
#   5. pinnsketch solve burgers --device cuda --storage exact|lowrank --steps 2000 --lbfgs-steps 300
#      (benchmarks/solve_burgers.py)          -> results/solve_burgers_cuda.json
#   6. gpu_step.py with 32 MiB chunks (the memory-bound setting) -> results/gpu_step_chunked_cuda.json
#   7. gpu_step.py with the compiled loss (CUDA only)         -> results/gpu_step_compiled_cuda.json
#   8. compiled_lowrank_probe.py at 2-256x6-1, 32,768 points (what a traced lowrank step would cost)
#                                                             -> results/compiled_lowrank_probe_cuda.json
# and a summary of the steps (exit status, seconds) -> results/gpu_check_cuda.json.
# Every step has its own time limit (`timeout`); a step that fails or times out is
# recorded and the others still run; the exit status is 1 when any step failed.
#
#   bash benchmarks/gpu_check.sh                     # on a CUDA machine, writes benchmarks/results/
#   bash benchmarks/gpu_check.sh --dry-run           # the same pipeline on the CPU, tiny sizes, < 60 s,
#                                                    # writing into a temporary folder (CI runs this)
#   bash benchmarks/gpu_check.sh [--dry-run] --out-dir DIR
#
# Run it inside the environment with pinnsketch installed (PYTHON=... to choose the interpreter); on a
# machine without internet see benchmarks/README.md ("The GPU check") for how it ran without installing.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY=1; shift ;;
        --out-dir) OUT="${2:?--out-dir needs a folder}"; shift 2 ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1'; use --dry-run and/or --out-dir DIR" >&2; exit 2 ;;
    esac
done

PY="${PYTHON:-python}"
export DDE_BACKEND=pytorch
export MPLCONFIGDIR="${MPLCONFIGDIR:-$(mktemp -d)}"

if [[ $DRY == 1 ]]; then
    DEVICE=cpu; TAG=cpu
    OUT="${OUT:-$(mktemp -d -t gpu_check_dry.XXXXXX)}"
    TESTS=(tests/cuda -q -p no:cacheprovider)
    PROFILE=(benchmarks/gpu_profile.py --device cpu --points 256 --storages nested exact lowrank)
    STEP=(benchmarks/gpu_step.py --device cpu --dry-run --interleave 2)
    VS=(benchmarks/vs_deepxde.py --device cpu --iterations 20 --block 10 --warmup 2 --variants exact lowrank)
    SOLVE=(benchmarks/solve_burgers.py --device cpu --steps 3 --lbfgs-steps 1 --points 200)
    CHUNKED=(benchmarks/gpu_step.py --device cpu --dry-run --networks mlp --storages exact lowrank --chunk-bytes 4096)
    COMPILED=()    # the compiled loss needs a C++ compiler on the CPU: the dry run leaves it out
    # the probe traced but not code-generated (aot_eager: no C++ compiler needed)
    PROBE=(benchmarks/compiled_lowrank_probe.py --device cpu --backend aot_eager --variants exact lowrank
           --width 16 --depth 2 --points 200 --rounds 2 --chunk 1)
    LIMITS=(300 300 300 300 300 300 300 300)  # backstops only: the dry run takes about 60 s of CPU time
else
    DEVICE=cuda; TAG=cuda
    OUT="${OUT:-benchmarks/results}"
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check.sh: torch sees no CUDA device here; run it on a CUDA machine, or pass --dry-run" >&2
        exit 2
    fi
    TESTS=(tests/cuda -q -rs -p no:cacheprovider)
    # Sizes for under 8 minutes in all: on an H200 steps 1-5 took 243 s, 6 about 25 s and 7 about 80 s
    # (most of it compiling), 8 is new (two compilations, about 2 minutes); the limits (805 s together) are backstops; gpu_step measures the MLP first and records what its budget cannot fit as skipped.
    PROFILE=(benchmarks/gpu_profile.py --device cuda --points 32768 262144)
    STEP=(benchmarks/gpu_step.py --device cuda --steps 3 --warmup 1 --interleave 4 --time-budget-s 105)
    VS=(benchmarks/vs_deepxde.py --device cuda --iterations 600 --block 50 --warmup 20)
    SOLVE=(benchmarks/solve_burgers.py --device cuda --steps 2000 --lbfgs-steps 300 --timeout-s 60)
    CHUNKED=(benchmarks/gpu_step.py --device cuda --networks mlp --points 32768 262144 --storages exact checkpoint lowrank
             --chunk-bytes 33554432 --steps 3 --warmup 1)
    COMPILED=(benchmarks/gpu_step.py --device cuda --networks mlp --points 32768 262144 --storages nested exact compiled
              --steps 3 --warmup 1)
    # two compilations of the 256x6 step (about a minute each the first time): last, so that a timeout costs nothing else
    PROBE=(benchmarks/compiled_lowrank_probe.py --device cuda --width 256 --depth 6 --points 32768 --variants exact lowrank
           --rounds 5 --chunk 10)
    LIMITS=(75 45 130 90 135 60 120 150)
fi
mkdir -p "$OUT"
SUMMARY="$OUT/gpu_check_${TAG}.tsv"
: > "$SUMMARY"
FAILED=0
START=$(date +%s%N)

seconds_since() {  # nanosecond timestamp -> seconds elapsed, 3 decimals (no bc needed)
    local ms=$(( ($(date +%s%N) - $1) / 1000000 ))
    printf '%d.%03d' $((ms / 1000)) $((ms % 1000))
}

run_step() {  # name limit command...
    local name="$1" limit="$2"; shift 2
    echo "== $name: $* (limit ${limit} s)" >&2
    local t0 rc
    t0=$(date +%s%N)
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    [[ $rc -ne 0 ]] && FAILED=1 && echo "== $name: exit $rc" >&2
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(seconds_since "$t0")" "$*" >> "$SUMMARY"
}

run_step cuda_tests "${LIMITS[0]}" "$PY" -m pytest "${TESTS[@]}"
run_step gpu_profile "${LIMITS[1]}" "$PY" "${PROFILE[@]}" --out "$OUT/gpu_profile_${TAG}.json"
run_step gpu_step "${LIMITS[2]}" "$PY" "${STEP[@]}" --out "$OUT/gpu_step_${TAG}.json"
run_step vs_deepxde "${LIMITS[3]}" "$PY" "${VS[@]}" --out "$OUT/vs_deepxde_${TAG}.json"
run_step solve_burgers "${LIMITS[4]}" "$PY" "${SOLVE[@]}" --out "$OUT/solve_burgers_${TAG}.json"
run_step gpu_step_chunked "${LIMITS[5]}" "$PY" "${CHUNKED[@]}" --out "$OUT/gpu_step_chunked_${TAG}.json"
if [[ ${#COMPILED[@]} -gt 0 ]]; then
    run_step gpu_step_compiled "${LIMITS[6]}" "$PY" "${COMPILED[@]}" --out "$OUT/gpu_step_compiled_${TAG}.json"
fi
run_step compiled_lowrank_probe "${LIMITS[7]}" "$PY" "${PROBE[@]}" --out "$OUT/compiled_lowrank_probe_${TAG}.json"

TOTAL=$(seconds_since "$START")
"$PY" - "$SUMMARY" "$OUT/gpu_check_${TAG}.json" "$DEVICE" "$DRY" "$TOTAL" <<'EOF'
import json, sys
import torch
from pinnsketch.data.bench import git_commit

tsv, out, device, dry, total = sys.argv[1:]
steps = []
for line in open(tsv):
    name, rc, seconds, command = line.rstrip("\n").split("\t")
    steps.append({"name": name, "exit": int(rc), "seconds": float(seconds), "command": command,
                  "status": "ok" if rc == "0" else ("timeout" if rc in ("124", "137") else "failed")})
payload = {"benchmark": "gpu_check", "command": "bash benchmarks/gpu_check.sh" + (" --dry-run" if dry == "1" else ""),
           "device": device, "dry_run": dry == "1", "total_s": float(total), "steps": steps,
           "gpu_name": torch.cuda.get_device_name() if device == "cuda" else None,
           "torch": torch.__version__, "commit": git_commit()}
open(out, "w").write(json.dumps(payload, indent=1) + "\n")
EOF
rm -f "$SUMMARY"
echo "gpu_check.sh: $( [[ $FAILED == 0 ]] && echo all steps passed || echo some steps FAILED ) in ${TOTAL} s; results in $OUT" >&2
exit $FAILED
