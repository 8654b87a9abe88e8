#!/usr/bin/env bash
# Runs libFuzzer targets one after another and prints one line per target:
#   fuzz <target>: ok|FAILED  <execs> execs (<per s>/s), cov <edges>, ft <features>, corpus <n> [artifact]
# Usage: fuzz/run.sh BUILD_DIR SECONDS TARGET...
# Each target starts from its committed seeds (fuzz/corpus/<t>/, read only) and
# the inputs earlier runs found (BUILD_DIR/corpus/<t>/, where new ones go).
# A crash, sanitizer report, leak, input slower than 10 s (-timeout) or a
# single allocation over 512 MB (-malloc_limit_mb: no input of at most
# -max_len bytes needs one, so it means a size taken from the file) fails the
# target, and the input that did it is kept in BUILD_DIR/artifacts/<t>/.
# Exit status: the number of failed targets (0: all ok).
set -uo pipefail
build=$1 seconds=$2
shift 2
failed=0
for t in "$@"; do
    bin=$build/bin/$t
    work=$build/corpus/$t
    art=$build/artifacts/$t/
    log=$build/logs/$t.log
    mkdir -p "$work" "$art" "$(dirname "$log")"
    seeds=fuzz/corpus/$t
    [[ -d $seeds ]] || seeds=
    # One process, one job: the machine's cores are shared. -max_len 65536 lets
    # the seeds (a few KB) grow; -rss_limit_mb bounds the whole process.
    ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=0 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    PEFTLAB_THREADS=1 \
        "$bin" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=512 \
        -max_len=65536 -print_final_stats=1 -artifact_prefix="$art" "$work" $seeds >"$log" 2>&1
    rc=$?
    execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -n1)
    persec=$(grep -oE 'stat::average_exec_per_sec: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -n1)
    last=$(grep -E '^#[0-9]+.*cov: ' "$log" | tail -n1)
    cov=$(grep -oE 'cov: [0-9]+' <<<"$last" | grep -oE '[0-9]+')
    ft=$(grep -oE 'ft: [0-9]+' <<<"$last" | grep -oE '[0-9]+')
    corp=$(grep -oE 'corp: [0-9]+' <<<"$last" | grep -oE '[0-9]+')
    if [[ $rc -eq 0 ]]; then
        status=ok extra=
    else
        status=FAILED failed=$((failed + 1))
        extra=" (rc $rc; $(grep -m1 -E 'ERROR|SUMMARY|Test unit written' "$log" | cut -c1-160); log $log)"
    fi
    echo "fuzz $t: $status  ${execs:-0} execs (${persec:-0}/s), cov ${cov:-0}, ft ${ft:-0}, corpus ${corp:-0}$extra"
done
exit $failed
