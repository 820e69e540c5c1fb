#!/usr/bin/env bash
# Model-checks, with SPIN, the sm90 forward's synchronisation protocol (tools/model/sm90_fwd_sync.pml) in every
# configuration the kernel has (2 and 3 consumer warpgroups, ping-pong on and off; every walk of NT tiles with up
# to MAXB key blocks each, every interleaving), the sm90 backward with dQ through shared memory and a bulk reduce
# (tools/model/sm90_bwd_sync.pml: every count of steps up to NT * MAXB + 2 with each consumer warpgroup as one
# process, up to NT + MAXB with two warps per warpgroup; Q/dO rings of 2 and 3 stages), and the split-KV merge of
# the decode kernel (tools/model/kv_split_merge.pml: counters, refusals, calls sharing a workspace). Needs spin and
# gcc (apt-get install spin). Exit status 1 if any configuration has an error (a hang, a wrong buffer, the turn
# invariant, a dirty counter, a wrong merge, a dQ reduce missed or repeated). Usage: tools/model/check.sh [NT] [MAXB]
# (default 3 3: about 5 minutes and 6 GB at most; CI runs 2 2, about 35 s)
set -euo pipefail
DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NT=${1:-3}
MAXB=${2:-3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
fail=0

# verify MODEL LABEL PASS-MESSAGE SPIN-DEFINES...: builds the verifier, searches every state, prints one line.
verify() {
    local model=$1 label=$2 ok=$3
    shift 3
    spin -a "$@" "$DIR/$model" > spin.log 2>&1 || { cat spin.log; exit 1; }
    gcc -O2 -w -DSAFETY -DCOLLAPSE -o pan pan.c
    ./pan -m1000000 -w27 > pan.log 2>&1 || true
    local errors states
    errors=$(sed -n 's/.*errors: \([0-9]*\).*/\1/p' pan.log)
    states=$(sed -n 's/^ *\([0-9.e+]*\) states, stored.*/\1/p' pan.log)
    if [ "${errors:-1}" != 0 ] || grep -q "search not completed\|max search depth too small" pan.log; then
        echo "FAIL $label"
        grep -E "assertion|invalid end|error|violated|depth" pan.log | head -5
        fail=1
    else
        echo "ok   $label: $states states, $ok"
    fi
}

# The sm90 forward: 2 and 3 consumer warpgroups, ping-pong on and off.
for nc in 2 3; do
    for pp in 1 0; do
        verify sm90_fwd_sync.pml "NC=$nc PP=$pp NT=$NT MAXB=$MAXB" "no hang, buffers and turns as expected" \
            -DNC=$nc -DPP=$pp -DNT="$NT" -DMAXB="$MAXB"
    done
done
# The sm90 backward, dQ through shared memory: Q/dO rings of 2 and 3 stages; each consumer warpgroup one process
# (NW=1; also with the DETERMINISTIC writer, DET=1), then two warps each (NW=2: per-warp arrivals, fewer steps;
# 3 stages only from NT 3).
for st in 2 3; do
    verify sm90_bwd_sync.pml "sm90_bwd STAGES=$st NW=1 MAXI=$((NT * MAXB + 2))" "no hang, buffers and dQ reduces as expected" \
        -DSTAGES=$st -DNW=1 -DMAXI=$((NT * MAXB + 2))
done
verify sm90_bwd_sync.pml "sm90_bwd STAGES=2 NW=1 MAXI=$((NT * MAXB + 2)) DET=1" "no hang, buffers and dQ reduces as expected" \
    -DSTAGES=2 -DNW=1 -DMAXI=$((NT * MAXB + 2)) -DDET=1
bwd_stages=(2)
if [ "$NT" -ge 3 ]; then bwd_stages+=(3); fi
for st in "${bwd_stages[@]}"; do
    verify sm90_bwd_sync.pml "sm90_bwd STAGES=$st NW=2 MAXI=$((NT + MAXB))" "no hang, buffers and dQ reduces as expected" \
        -DSTAGES=$st -DNW=2 -DMAXI=$((NT + MAXB))
done
# The split-KV merge of kv_attn: NG query tiles x NS splits over NCALLS calls sharing one workspace.
kv_cfgs=("2 2 2" "1 4 3")
if [ "$NT" -ge 3 ]; then kv_cfgs+=("2 3 2"); fi
for cfg in "${kv_cfgs[@]}"; do
    read -r ng ns nc <<< "$cfg"
    verify kv_split_merge.pml "kv_split_merge NG=$ng NS=$ns NCALLS=$nc" \
        "counters back to 0 after every call, merges as expected" -DNG="$ng" -DNS="$ns" -DNCALLS="$nc"
done
exit $fail
