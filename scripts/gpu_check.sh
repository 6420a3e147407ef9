#!/usr/bin/env bash
# The whole GPU check in one command, within 8 minutes (benchmarks/README.md):
#
#   bash scripts/gpu_check.sh            # on a machine with an NVIDIA GPU
#   bash scripts/gpu_check.sh --dry-run  # print the stage plan and run nothing
#
# The stages (GPU parity tests, compute-sanitizer, the benchmark CLI, the
# training-step row, the summary) and their time limits live in
# benchmarks/gpu_check.py. Each stage runs under its own `timeout`, so a hang or
# crash in one still returns the others; stages of one group run side by side.
# Writes at most 8 files under $OUT (./gpu_out without it): summary.md,
# results.json, table.md, bars.png, scaling.png, logs.tar.gz (every stage's log).
# Uses the machine's python3 as it is ($PYTHON overrides; installs nothing, no network).
# Exit: 0 all stages passed, 1 a stage failed or timed out, 2 no CUDA device (within seconds).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-$PWD/gpu_out}"
if [ "${1:-}" = "--dry-run" ]; then
    exec "$PY" -m benchmarks.gpu_check plan --py "$PY" --out "$OUT"
fi
[ $# -eq 0 ] || { echo "usage: $0 [--dry-run]" >&2; exit 2; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET DEBIAS_OPS_BACKEND   # the real kernels on CUDA tensors
mapfile -t PLAN < <("$PY" -m benchmarks.gpu_check plan --tsv --py "$PY" --work "$WORK" --out "$OUT")
[ ${#PLAN[@]} -gt 0 ] || { echo "gpu_check: no stage plan (python -m benchmarks.gpu_check plan failed)" >&2; exit 2; }

run_stage() {  # name limit command: the stage's log, and "name<TAB>rc<TAB>seconds" in stages.tsv
    local t0=$SECONDS rc
    timeout -k 10 "$2" bash -c "$3" >"$WORK/$1.log" 2>&1 </dev/null
    rc=$?
    printf '%s\t%s\t%s\n' "$1" "$rc" "$((SECONDS - t0))" >>"$WORK/stages.tsv"
    echo "[$(date -u +%T)] $1: exit $rc after $((SECONDS - t0)) s (limit $2 s)"
    return $rc
}

group=""
for line in "${PLAN[@]}"; do
    IFS=$'\t' read -r g name limit cmd <<<"$line"
    if [ "$g" != "$group" ]; then wait; group="$g"; fi   # groups run one after the other
    echo "[$(date -u +%T)] $name: start (limit $limit s)"
    run_stage "$name" "$limit" "$cmd" &
    if [ "$name" = preflight ] && ! wait $!; then  # no CUDA device: stop here
        cat "$WORK/preflight.log" >&2
        rm -rf "$WORK"
        exit 2
    fi
done
wait

status=0
while IFS=$'\t' read -r name rc secs; do   # the end of each failed stage's log, then the summary
    [ "$rc" = 0 ] && continue
    status=1
    case "$rc" in 124|137) why="stopped at its time limit" ;; *) why="exit $rc" ;; esac
    echo "---- $name: $why; last lines of $name.log:"
    tail -n 15 "$WORK/$name.log"
done <"$WORK/stages.tsv"
tar -czf "$OUT/logs.tar.gz" -C "$WORK" . || echo "gpu_check: packing the logs failed" >&2
rm -rf "$WORK"
cat "$OUT/summary.md" 2>/dev/null || echo "gpu_check: no summary.md (summary.log is in logs.tar.gz)" >&2
exit $status
