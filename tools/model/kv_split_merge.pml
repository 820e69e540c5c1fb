/* A model of the split-KV merge protocol of kv_attn (crates/flashattn/kernels/kvcache.cu), for SPIN: NG query
 * tiles ("groups") of NS splits each, over NCALLS consecutive calls that reuse one workspace (status word and
 * arrival counters), every interleaving of the CTAs. In each call a group's sequence may be out of range
 * (bad_seq, chosen nondeterministically per call and group: such CTAs set status bit 1) and a CTA may meet a bad
 * page index (status bit 2); the status word may also be set before the call (a refused append).
 * Checks, after every call: every counter is back to 0 (the workspace is reusable); a group merged at most once,
 * and only by a CTA that found all NS partials of this call written; in a call where nothing was refused and no
 * page was bad, every group merged exactly once. (The output of a refused call is not used: the host reports the
 * error.) Run: tools/model/check.sh (or spin -a kv_split_merge.pml; gcc -DSAFETY pan.c; ./pan). */

#ifndef NG
#define NG 2
#endif
#ifndef NS
#define NS 2
#endif
#ifndef NCALLS
#define NCALLS 2
#endif
#define FAILED 16   /* KV_SPLIT_FAILED, scaled down: more than NS */

byte status;                 /* the workspace's status word */
byte counter[NG];            /* split_count[group] */
byte written[NG];            /* partials of the current call written (and fenced) per group */
byte merged[NG];             /* merges in the current call per group */
bool bad[NG];                /* this call: the group's sequence is out of range */
byte running;                /* CTAs of the current call still running */
byte call = 0;

/* last_split(): one atomicAdd; the last of NS arrivals resets the counter; true when none failed */
inline last_split(gr, ok, last) {
    d_step {
        counter[gr] = counter[gr] + (ok -> 1 : 1 + FAILED);
        if
        :: (counter[gr] % FAILED) >= NS -> last = (counter[gr] < FAILED); counter[gr] = 0
        :: else -> last = false
        fi
    }
}

proctype cta(byte gr) {
    byte st;
    bool last;
    st = status;                              /* ld_now(p.status) at entry */
    if
    :: st != 0 || bad[gr] ->
        if :: bad[gr] -> status = status | 1 :: else -> skip fi;
        last_split(gr, false, last);
        assert(!last)
    :: else ->
        /* main loop: a bad page index sets bit 2 and the split carries on */
        if :: status = status | 2 :: skip fi;
        written[gr]++;                        /* partials, then __threadfence */
        last_split(gr, true, last);
        if
        :: last ->
            if
            :: status != 0 -> skip            /* ld_cg(p.status) != 0: nothing is written */
            :: else -> assert(written[gr] == NS); merged[gr]++
            fi
        :: else -> skip
        fi
    fi;
    running--
}

init {
    byte g, s, v;
    do
    :: call < NCALLS ->
        atomic {
            /* the host's view between calls: it reads and clears the status word of a refused call */
            status = 0;
            if :: status = 1 :: skip fi;       /* a refused append before kv_attn (kv_append sets bit 1) */
            for (g : 0 .. NG - 1) {
                written[g] = 0; merged[g] = 0;
                if :: bad[g] = true :: bad[g] = false fi
            }
            running = NG * NS;
            for (g : 0 .. NG - 1) {
                for (s : 0 .. NS - 1) {
                    run cta(g)
                }
            }
        }
        running == 0;
        for (g : 0 .. NG - 1) {
            assert(counter[g] == 0);
            assert(merged[g] <= 1);
            assert(status != 0 || merged[g] == 1)
        }
        call++
    :: else -> break
    od
}
