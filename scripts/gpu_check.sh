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
# A cold machine may take a while to import torch and start CUDA: the preflight
# has benchmarks/gpu_check.py's PREFLIGHT_S, and time a stage leaves unused goes
# to the next group, so the script ends within BUDGET_S (+ one kill grace) in all
# cases. The summary (summary.md, results.json) and logs.tar.gz are written
# whatever happens, a failed preflight included.
# Exit: 0 all stages passed, 1 a stage failed or timed out, 2 no CUDA device or
# the preflight did not finish (the summary says which step it reached).
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
T0=$SECONDS
mapfile -t PLAN < <("$PY" -m benchmarks.gpu_check plan --tsv --py "$PY" --work "$WORK" --out "$OUT")
if [ ${#PLAN[@]} -eq 0 ]; then
    msg="gpu_check: no stage plan (\`$PY -m benchmarks.gpu_check plan\` failed: is $PY a python with this checkout?)"
    echo "$msg" >&2
    printf '# debias_ops GPU check: not run\n\n%s\n' "$msg" >"$OUT/summary.md"
    rm -rf "$WORK"
    exit 2
fi

run_stage() {  # name limit command: the stage's log, and "name<TAB>rc<TAB>seconds<TAB>limit" in stages.tsv
    local t0=$SECONDS rc
    timeout -k 10 "$2" bash -c "$3" >"$WORK/$1.log" 2>&1 </dev/null
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$1" "$rc" "$((SECONDS - t0))" "$2" >>"$WORK/stages.tsv"
    echo "[$(date -u +%T)] $1: exit $rc after $((SECONDS - t0)) s (limit $2 s)"
    return $rc
}

given_limit() {  # limit start: the stage's limit plus what earlier groups left unused (at least 5 s)
    local t=$(( $1 + $2 - (SECONDS - T0) ))
    [ $t -ge 5 ] && echo $t || echo 5
}

group="" status=0
summary_line="${PLAN[-1]}"   # the summary: last, whatever happened before
for line in "${PLAN[@]:0:${#PLAN[@]}-1}"; do
    IFS=$'\t' read -r g name limit start cmd <<<"$line"
    if [ "$g" != "$group" ]; then wait; group="$g"; fi   # groups run one after the other
    lim=$(given_limit "$limit" "$start")
    echo "[$(date -u +%T)] $name: start (limit $lim s)"
    run_stage "$name" "$lim" "$cmd" &
    if [ "$name" = preflight ] && ! wait $!; then  # no CUDA device, or the machine did not come up in time
        cat "$WORK/preflight.log" >&2
        status=2
        break
    fi
done
wait

IFS=$'\t' read -r g name limit start cmd <<<"$summary_line"
run_stage "$name" "$(given_limit "$limit" "$start")" "$cmd"
while IFS=$'\t' read -r name rc secs lim; do   # the end of each failed stage's log, then the summary
    [ "$rc" = 0 ] && continue
    [ "$status" = 0 ] && status=1
    case "$rc" in 124|137) why="stopped at its time limit ($lim s)" ;; *) why="exit $rc" ;; esac
    echo "---- $name: $why; last lines of $name.log:"
    tail -n 15 "$WORK/$name.log"
done <"$WORK/stages.tsv"
tar -czf "$OUT/logs.tar.gz" -C "$WORK" . || echo "gpu_check: packing the logs failed" >&2
rm -rf "$WORK"
cat "$OUT/summary.md" 2>/dev/null || echo "gpu_check: no summary.md (summary.log is in logs.tar.gz)" >&2
exit $status
