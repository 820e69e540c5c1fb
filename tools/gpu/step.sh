# Sourced by the device-side scripts of tools/gpu/: `step NAME TIMEOUT_S CMD...` runs CMD under `timeout`,
# appends its output to $OUT/log.txt, and its status, time and the last lines matching $STEP_SUMMARY (an
# extended regex) to $OUT/summary.txt.
step() {
    local name=$1 t=$2
    shift 2
    echo "== $name: $*" | tee -a "$OUT/summary.txt" >> "$OUT/log.txt"
    local t0=$SECONDS from
    from=$(($(wc -l < "$OUT/log.txt") + 1))
    timeout "$t" "$@" >> "$OUT/log.txt" 2>&1
    local rc=$?
    {
        echo "   rc=$rc ($((SECONDS - t0)) s)$([ $rc = 124 ] && echo ' TIMED OUT')"
        tail -n +"$from" "$OUT/log.txt" | grep -E "$STEP_SUMMARY" | tail -n "${STEP_LINES:-6}" | sed 's/^/   /'
    } >> "$OUT/summary.txt"
}
