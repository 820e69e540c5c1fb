/* A model of the synchronisation protocol of the sm90 backward (crates/flashattn/kernels/bwd_sm90.cu) with dQ
 * through shared memory and one bulk reduce per step (issue 19, docs/notes/cuda-bwd.md: the dq_full / dq_empty
 * mbarriers and the dQ writer warp), for the SPIN model checker: one CTA's producer thread, dQ writer warp and two
 * consumer warpgroups over every number of steps NI from 0 to MAXI (chosen nondeterministically; the same for every
 * role, which all compute it from the same work item), every interleaving. It checks that nobody hangs (SPIN's
 * invalid end states); that every read of K/V, of a Q/dO stage, of a dS^T buffer, of an lse/D buffer and of the dQ
 * staging buffer sees the data of the step that reads it, for the whole time it is read; that nothing is written
 * while a reader of an earlier step may still read it (reader masks, asserted empty by every writer); that the
 * dQ buffer is never written while the bulk read of the step before is in flight or before that step's reduce was
 * issued; and that at exit the reductions of steps 0 .. NI-1 were each issued exactly once, in order, and all
 * completed.
 *
 * Modelled: mbarriers (a phase bit; a wait for parity P passes once the phase of that parity has completed,
 * exactly as mbarrier.try_wait.parity; a wait's return and the thread's next action are separate steps, so a
 * barrier may move on in between), the TMA loads (a buffer is in flux from the issue until its bytes land; the
 * K/V load and the loads of each Q/dO stage land in any order relative to each other; the arrive.expect_tx and
 * the transaction bytes of a stage count as one arrival at the landing: the phase cannot complete before it),
 * the bulk reduce (cp.reduce.async.bulk + commit_group: its read of the staging buffer is in flux from the issue
 * until it completes, asynchronously; its global writes complete later, in issue order; the writer's
 * cp.async.bulk.wait_group.read 0 and final wait_group 0), the 256-thread named barrier BAR_DS (bar.sync by both
 * warpgroups, reusable), the consumers' generic-proxy stores (dS^T, lse/D, dQ: in flux from the first store to
 * the barrier arrival that publishes them; the arrival on BAR_DS or dq_full is in the same step as the last
 * store, which changes nothing: nobody may read them before that arrival). The consumers: with NW = 1 each
 * warpgroup is one process arriving once on empty_q[s], dq_full and BAR_DS (the counts 8 become 2: every warp of
 * the code waits on the mbarriers itself before touching a buffer, and BAR_DS keeps all 8 warps within one step);
 * with NW = 2 each warpgroup is two warp processes, each waiting and arriving itself (counts 4), which checks that
 * per-warp arrivals and waits need no warpgroup-local barrier (NW = 4, the code's 8 warps, is too large to search).
 * Read windows are taken at their widest: a Q/dO stage from the S^T / dP^T issue to the release, a dS^T buffer
 * (every consumer's part) from the barrier to the release (so it also covers the SPLIT_D dK / dV products that
 * read it, not only dQ), an lse/D buffer from the S^T / dP^T issue to the barrier. The producer warpgroup returns
 * at once when NI = 0 (no K/V load), as in the code.
 * The writer warp is one process: in the code each lane issues the reduces of its rows in a bulk group of its own,
 * waits for it, and __syncwarp precedes lane 0's arrival, which is the same as one group. With DET = 1 the writer
 * frees the buffer only once its additions are complete (wait_group 0, as DETERMINISTIC does before passing the
 * key block's turn on); its wait for the turn (other CTAs) is a delay here, which every interleaving covers.
 * Not modelled: wgmma (local to a warpgroup), the fences (fence.proxy.async before BAR_DS and before the dq_full
 * arrival: memory ordering, not control), data values, the per-thread red.global.add path (DQ_BULK off, HEAD_DIM 64
 * and 256) and its DETERMINISTIC named barriers, the epilogue (registers only), other CTAs (the turn counter).
 *
 * Build options (spin -D...): STAGES = Q/dO ring depth (2, or 3: BWD90_STAGES); MAXI = steps at most (every NI
 * in 0 .. MAXI); NI = exactly this many steps instead; NW = processes per consumer warpgroup (1 or 2); DET = 1:
 * the writer of DETERMINISTIC.
 * Run: tools/model/check.sh */

#ifndef STAGES
#define STAGES 2
#endif
#ifndef MAXI
#define MAXI 6
#endif
#ifndef NW
#define NW 1
#endif
#ifndef DET
#define DET 0
#endif
#if MAXI > 250 || (defined(NI) && NI > 250)
#error "steps are tags below FLUX (254)"
#endif
#define NCW (2 * NW)   /* consumer processes: warpgroup w's are w NW .. w NW + NW - 1 */

/* mbarriers: 0 full_kv, 1 .. STAGES full_q[s], then empty_q[s], dq_full, dq_empty */
#define FULL_KV 0
#define FULL_Q(s) (1 + (s))
#define EMPTY_Q(s) (1 + STAGES + (s))
#define DQ_FULL (1 + 2 * STAGES)
#define DQ_EMPTY (2 + 2 * STAGES)
#define NBAR (3 + 2 * STAGES)
bit phase[NBAR];  /* parity of the current phase (completed phases mod 2: waits look at nothing else) */
byte pend[NBAR];  /* arrivals in the current phase */
byte expect[NBAR];/* arrivals that complete a phase */

inline arr(mb) {
    pend[mb]++;
    if
    :: pend[mb] == expect[mb] -> pend[mb] = 0; phase[mb] = 1 - phase[mb]
    :: else -> skip
    fi
}
/* mbarrier.try_wait.parity P: passes once the phase with parity P has completed */
inline wait(mb, pty) { (phase[mb] != (pty)) }

/* named barrier BAR_DS (bar.sync 1, 256: both consumer warpgroups) */
byte ds_cnt;
bit ds_gen;

#define FLUX 254   /* a buffer being written (TMA in flight, stores under way) */
#define NONE 255   /* nothing written yet */
byte ni;           /* steps of this CTA (w.n_iter) */
byte kv = NONE;    /* K and V: FLUX, then 0 */
byte qbuf[STAGES]; /* Q/dO stage: the step it holds */
byte qrd[STAGES];  /* consumers reading the stage (bit c) */
byte ds[2 * NCW];  /* dS^T buffer b, the part written by consumer c: ds[NCW b + c] = step */
byte dsrd[2];      /* consumers reading dS^T buffer b (all of it) */
byte ld[2 * NCW];  /* lse/D buffer b, entries stored by consumer c: ld[NCW b + c] = step */
byte ldrd[2];      /* consumers reading lse/D buffer b */
byte dq[NCW];      /* the dQ staging buffer, the part of consumer c: step */
bit bulk_rd;       /* the bulk reduce's read of the staging buffer is in flight */
byte nissued;      /* bulk reduces issued (step nissued - 1 the last) */
byte ndone;        /* bulk reduces complete (global writes done) */

/* every part of buffer array a from index base holds step v (k: a scratch local of the caller, left 0) */
#define ALL_EQ(a, base, v) \
    k = 0; \
    do \
    :: k < NCW -> assert(a[(base) + k] == (v)); k++ \
    :: else -> k = 0; break \
    od

/* The asynchronous units: TMA loads landing (K/V, each Q/dO stage, in any order), the bulk reduce's read
 * completing (its data must not have changed meanwhile), the bulk reduces' global writes completing in order. */
#define LAND_Q(s) :: d_step { qbuf[s] == FLUX -> qbuf[s] = qnext[s]; arr(FULL_Q(s)) }
byte qnext[STAGES];  /* step of the load in flight into stage s */
proctype engine() {
    byte k;
end:
    do
    :: d_step { kv == FLUX -> kv = 0; arr(FULL_KV) }
    LAND_Q(0)
    LAND_Q(1)
#if STAGES > 2
    LAND_Q(2)
#endif
    :: d_step { bulk_rd -> ALL_EQ(dq, 0, nissued - 1); bulk_rd = 0 }
    :: d_step { ndone + bulk_rd < nissued -> ndone++ }
    od
}

/* warp 0 of warpgroup 0, one thread */
proctype producer() {
    byte it = 0, st;
    if
    :: ni == 0 -> goto done   /* the whole warpgroup returns: nothing to load */
    :: else -> skip
    fi;
    d_step { kv = FLUX };     /* arrive.expect_tx(full_kv) + the K and V loads */
    do
    :: it < ni ->
        st = it % STAGES;
        wait(EMPTY_Q(st), ((it / STAGES) % 2) ^ 1);
        /* arrive.expect_tx(full_q[st]) + the Q and dO loads */
        d_step { assert(qrd[st] == 0 && qbuf[st] != FLUX); qbuf[st] = FLUX; qnext[st] = it };
        it++
    :: else -> break
    od;
done:
    skip
}

/* warp 1 of warpgroup 0: the dQ writer */
proctype writer() {
    byte it = 0, k;
    do
    :: it < ni ->
        wait(DQ_FULL, it % 2);
        /* cp.reduce.async.bulk ... add.f32 of the staging buffer + commit_group */
        d_step {
            ALL_EQ(dq, 0, it);
            assert(nissued == it && !bulk_rd);
            bulk_rd = 1; nissued++
        };
#if DET
        /* cp.async.bulk.wait_group 0 (the additions done: the turn is passed on), then arrive(dq_empty) */
        d_step { ndone == nissued -> arr(DQ_EMPTY) };
#else
        /* cp.async.bulk.wait_group.read 0, then arrive(dq_empty) */
        d_step { !bulk_rd -> arr(DQ_EMPTY) };
#endif
        it++
    :: else -> break
    od;
    ndone == nissued;   /* cp.async.bulk.wait_group 0 */
    assert(nissued == ni && ndone == ni && !bulk_rd)
}

/* consumer c: warpgroup c / NW (all of it when NW = 1, else one of its warps) */
proctype consumer(byte c) {
    byte it = 0, st, b, nb, k;
    bit g;
    byte me = 1 << c;
    if
    :: ni > 0 ->
        /* lse/D of step 0 stored into buffer 0, then the barrier, then K/V */
        d_step { assert(ldrd[0] == 0); ld[c] = FLUX };
        d_step {
            ld[c] = 0;
            g = ds_gen; ds_cnt++;
            if :: ds_cnt == NCW -> ds_cnt = 0; ds_gen = 1 - ds_gen :: else -> skip fi
        };
        d_step { ds_gen != g -> g = 0 };
        wait(FULL_KV, 0)
    :: else -> skip
    fi;
    do
    :: it < ni ->
        st = it % STAGES; b = it % 2; nb = 1 - b;
        wait(FULL_Q(st), (it / STAGES) % 2);
        /* S^T = K Q^T, dP^T = V dO^T issued (Q/dO read until the release); P^T, dS^T read the lse/D rows of
         * step it; the dS^T stores into buffer b and the lse/D stores of step it + 1 into buffer nb begin */
        d_step {
            assert(kv == 0 && qbuf[st] == it);
            qrd[st] = qrd[st] | me;
            ALL_EQ(ld, NCW * b, it);
            ldrd[b] = ldrd[b] | me;
            assert(dsrd[b] == 0);
            ds[NCW * b + c] = FLUX;
            if
            :: it + 1 < ni -> assert(ldrd[nb] == 0); ld[NCW * nb + c] = FLUX
            :: else -> skip
            fi
        };
        /* stores done, fence.proxy.async, bar.sync BAR_DS */
        d_step {
            ds[NCW * b + c] = it;
            if :: it + 1 < ni -> ld[NCW * nb + c] = it + 1 :: else -> skip fi;
            ALL_EQ(ld, NCW * b, it);
            ldrd[b] = ldrd[b] & ~me;
            g = ds_gen; ds_cnt++;
            if :: ds_cnt == NCW -> ds_cnt = 0; ds_gen = 1 - ds_gen :: else -> skip fi
        };
        /* past the barrier: dQ = dS K (every consumer's dS^T, and K) and dK issued */
        d_step {
            ds_gen != g -> g = 0;
            assert(kv == 0);
            ALL_EQ(ds, NCW * b, it);
            dsrd[b] = dsrd[b] | me
        };
        /* dQ done (wgmma_wait<1>): the staging buffer is free once the step before's bulk read is done */
        wait(DQ_EMPTY, b ^ 1);
        d_step { assert(!bulk_rd && nissued == it); dq[c] = FLUX };
        /* stores done, fence.proxy.async, arrive on dq_full */
        d_step { dq[c] = it; arr(DQ_FULL) };
        /* dK, dV done (wgmma_wait<0>): release the stage */
        d_step {
            assert(qbuf[st] == it);
            ALL_EQ(ds, NCW * b, it);
            qrd[st] = qrd[st] & ~me;
            dsrd[b] = dsrd[b] & ~me;
            arr(EMPTY_Q(st))
        };
        it++
    :: else -> break
    od
    /* epilogue: dK, dV from registers */
}

init {
    byte i;
    d_step {
        expect[FULL_KV] = 1;
        for (i : 0 .. STAGES - 1) {
            expect[FULL_Q(i)] = 1; expect[EMPTY_Q(i)] = NCW;
            qbuf[i] = NONE
        }
        expect[DQ_FULL] = NCW; expect[DQ_EMPTY] = 1;
        for (i : 0 .. 2 * NCW - 1) { ds[i] = NONE; ld[i] = NONE }
        for (i : 0 .. NCW - 1) { dq[i] = NONE }
        i = 0
    };
#ifdef NI
    ni = NI;
#else
    select(ni : 0 .. MAXI);
#endif
    atomic {
        run engine();
        run producer();
        run writer();
        for (i : 0 .. NCW - 1) {
            run consumer(i)
        }
    }
}
