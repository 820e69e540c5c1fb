/* A model of the synchronisation protocol of the sm90 forward (crates/flashattn/kernels/fwd_sm90.cu), for the
 * SPIN model checker: one CTA's producer and its consumer warpgroups over every sequence of up to NT tiles with
 * 0..MAXB key blocks each (chosen nondeterministically), every interleaving. It checks that nobody hangs (SPIN's
 * invalid end states), that every stage of the K/V rings and the Q buffer holds the block or tile a consumer
 * expects whenever it uses or releases it, and the ping-pong invariant (at most one turn granted and not taken).
 *
 * Modelled: mbarriers (phase counters; a wait for parity P passes once the phase of that parity has completed,
 * exactly as mbarrier.try_wait.parity), the TMA loads (a buffer is in flux from the issue until its bytes land,
 * loads landing in any order), the named barriers of the turns (bar.sync by the owner + bar.arrive by the predecessor),
 * one arrival per warpgroup on the "empty" barriers (the code's one per warp x 4 warps behaves the same). Not
 * modelled: wgmma (local to a warpgroup), the epilogue's own named barrier (local too), data values.
 *
 * Build options (spin -D...): NC = consumer warpgroups (2 or 3); PP = ping-pong turns on (1) or off (0); NT = tiles;
 * MAXB = key blocks per tile at most.
 * Run: tools/model/check.sh */

#ifndef NC
#define NC 2
#endif
#ifndef PP
#define PP 1
#endif
#ifndef NT
#define NT 3
#endif
#ifndef MAXB
#define MAXB 3
#endif

/* mbarriers: 0 full_q, 1 empty_q, 2-3 full_k[s], 4-5 empty_k[s], 6-7 full_v[s], 8-9 empty_v[s] */
#define FULL_Q 0
#define EMPTY_Q 1
#define FULL_K(s) (2 + (s))
#define EMPTY_K(s) (4 + (s))
#define FULL_V(s) (6 + (s))
#define EMPTY_V(s) (8 + (s))
byte phase[10];   /* completed phases (mod 256; waits look at the parity) */
byte pend[10];    /* arrivals in the current phase */
byte expect[10];  /* arrivals that complete a phase */

inline arrive(b) {
    d_step {
        pend[b]++;
        if
        :: pend[b] == expect[b] -> pend[b] = 0; phase[b]++
        :: else -> skip
        fi
    }
}
/* mbarrier.try_wait.parity P: passes once the phase with parity P has completed */
inline wait(b, par) { ((phase[b] % 2) != (par)) }

/* named barriers of the turns: pending predecessor arrivals */
byte turn_pend[NC];
inline turn_sync(w) { atomic { turn_pend[w] > 0 -> turn_pend[w]-- } }
inline turn_arrive(w) { d_step { turn_pend[w]++; assert(turn_pend[w] <= 1) } }

/* what the buffers hold: K/V block number per stage, tile number in the Q buffer (255: nothing yet) */
byte kst[2];
byte vst[2];
byte qbuf = 255;

byte nblk[NT];    /* key blocks of each tile of the walk (both roles walk the same sequence) */
bool started = false;

/* TMA loads: a buffer is in flux (254) from the issue until its bytes land; then its "full" barrier completes (the
 * producer's arrive.expect_tx plus the transaction count). One engine per buffer kind lands that kind's loads in
 * issue order, the three kinds in any order relative to each other. */
chan tma_k = [2] of { byte, byte };   /* stage, block */
chan tma_v = [2] of { byte, byte };
chan tma_q = [1] of { byte };         /* tile */
proctype engine_k() { byte st, v; end: do :: tma_k ? st, v -> d_step { kst[st] = v; arrive(FULL_K(st)) } od }
proctype engine_v() { byte st, v; end: do :: tma_v ? st, v -> d_step { vst[st] = v; arrive(FULL_V(st)) } od }
proctype engine_q() { byte v; end: do :: tma_q ? v -> d_step { qbuf = v; arrive(FULL_Q) } od }

proctype producer() {
    byte t = 0, b, it = 0, qt = 0, st;
    started;
    do
    :: t < NT ->
        b = 0;
        do
        :: b < nblk[t] ->
            st = it % 2;
            wait(EMPTY_K(st), ((it / 2) % 2) ^ 1);
            atomic { kst[st] = 254; tma_k ! st, it };
            if
            :: b == 0 ->
                wait(EMPTY_Q, (qt % 2) ^ 1);
                atomic { qbuf = 254; tma_q ! t };
                qt++
            :: else -> skip
            fi;
            wait(EMPTY_V(st), ((it / 2) % 2) ^ 1);
            atomic { vst[st] = 254; tma_v ! st, it };
            it++; b++
        :: else -> break
        od;
        t++
    :: else -> break
    od
}

/* consumer warpgroup w (0 .. NC-1) */
proctype consumer(byte w) {
    byte t = 0, k, it = 0, qt = 0, nb;
    byte my = w;
    byte nxt = (w + 1) % NC;
    started;
    if
    :: PP && w == NC - 1 -> turn_arrive(0)
    :: else -> skip
    fi;
    do
    :: t < NT ->
        nb = nblk[t];
        if
        :: nb > 0 ->
            wait(FULL_Q, qt % 2); qt++;
            wait(FULL_K(it % 2), (it / 2) % 2);
            if :: PP -> turn_sync(my) :: else -> skip fi;
            assert(qbuf == t && kst[it % 2] == it);   /* S = Q K^T issued */
            if :: PP -> turn_arrive(nxt) :: else -> skip fi;
            if :: nb == 1 -> arrive(EMPTY_Q) :: else -> skip fi;
            arrive(EMPTY_K(it % 2));
            k = 1;
            do
            :: k < nb ->
                wait(FULL_K((it + k) % 2), ((it + k) / 2) % 2);
                wait(FULL_V((it + k - 1) % 2), ((it + k - 1) / 2) % 2);
                if :: PP -> turn_sync(my) :: else -> skip fi;
                assert(qbuf == t && kst[(it + k) % 2] == it + k && vst[(it + k - 1) % 2] == it + k - 1);
                if :: PP -> turn_arrive(nxt) :: else -> skip fi;
                /* S waited for: Q (after the tile's last S) and K go back; then P.V done: V goes back */
                assert(qbuf == t && kst[(it + k) % 2] == it + k);
                if :: k == nb - 1 -> arrive(EMPTY_Q) :: else -> skip fi;
                arrive(EMPTY_K((it + k) % 2));
                assert(vst[(it + k - 1) % 2] == it + k - 1);
                arrive(EMPTY_V((it + k - 1) % 2));
                k++
            :: else -> break
            od;
            /* last turn: the last P.V */
            wait(FULL_V((it + nb - 1) % 2), ((it + nb - 1) / 2) % 2);
            if :: PP -> turn_sync(my) :: else -> skip fi;
            assert(vst[(it + nb - 1) % 2] == it + nb - 1);
            if :: PP -> turn_arrive(nxt) :: else -> skip fi;
            assert(vst[(it + nb - 1) % 2] == it + nb - 1);
            arrive(EMPTY_V((it + nb - 1) % 2));
            it = it + nb
        :: else ->
            skip
        fi;
        /* epilogue: local to the warpgroup */
        t++
    :: else -> break
    od;
    /* warpgroup 0 absorbs the last warpgroup's extra arrival */
    if
    :: PP && w == 0 -> turn_sync(0)
    :: else -> skip
    fi;
    assert(turn_pend[w] == 0)
}

init {
    byte i, v;
    expect[FULL_Q] = 1; expect[EMPTY_Q] = NC;
    for (i : 0 .. 1) {
        expect[FULL_K(i)] = 1; expect[EMPTY_K(i)] = NC;
        expect[FULL_V(i)] = 1; expect[EMPTY_V(i)] = NC;
    }
    kst[0] = 255; kst[1] = 255; vst[0] = 255; vst[1] = 255;
    /* every walk of NT tiles with 0 .. MAXB key blocks each */
    for (i : 0 .. NT - 1) {
        select(v : 0 .. MAXB);
        nblk[i] = v
    }
    atomic {
        run engine_k();
        run engine_v();
        run engine_q();
        run producer();
        for (i : 0 .. NC - 1) {
            run consumer(i)
        }
        started = true
    }
}
