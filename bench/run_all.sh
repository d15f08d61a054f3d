#!/usr/bin/env bash
# Run every benchmark in turn and collect their one-line JSON summaries.
#
#   bench/run_all.sh [--quick] [--source DIR] ...   (options are passed to every script)
#
# Tables go to bench/output/<name>.txt, summaries to bench/output/summary.jsonl; with
# BENCH_LABEL=name they are also copied to bench/output/name/ (e.g. BENCH_LABEL=head-quick).
# A failing benchmark is reported and the others still run; the exit code is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p bench/output
summary=bench/output/summary.jsonl
: >"$summary"
failed=()
for name in render startup memory throughput ratelimit fairness scrape stall register proxy notifications sidecar prometheus; do
    echo "### bench_${name}.py $*"
    started=$SECONDS
    if "$PY" "bench/bench_${name}.py" "$@" | tee "bench/output/${name}.txt"; then
        grep '^BENCH_JSON ' "bench/output/${name}.txt" | sed 's/^BENCH_JSON //' >>"$summary"
    else
        failed+=("$name")
    fi
    echo "### bench_${name}.py took $((SECONDS - started)) s"
    echo
done
echo "summaries: $summary"
if [[ -n ${BENCH_LABEL:-} ]]; then
    mkdir -p "bench/output/$BENCH_LABEL"
    cp bench/output/*.txt bench/output/*.json "$summary" "bench/output/$BENCH_LABEL/"
    echo "copied to bench/output/$BENCH_LABEL/"
fi
if ((${#failed[@]})); then
    echo "failed: ${failed[*]}" >&2
    exit 1
fi
