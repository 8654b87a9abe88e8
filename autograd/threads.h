#pragma once
// One thread setting for OpenBLAS and our OpenMP loops. Debian's OpenMP build
// of OpenBLAS runs its kernels on the same OpenMP pool, so setting both to the
// same number never oversubscribes the cores.
//
// On cores shared with other processes, a thread that runs out of work in a
// parallel region spins (libgomp's default: 300000 spins, about a
// millisecond) and takes CPU time from the team's slowest thread: on a busy
// 2-core machine, 2-thread training steps were measured 3-4x and generation
// 10-15x slower than with 1 thread. libgomp reads OMP_WAIT_POLICY and
// GOMP_SPINCOUNT only when the process starts (not even an ELF pre-init hook
// can set them for it), so set them in the environment: GOMP_SPINCOUNT=3000
// stays within ~10% of the default on an idle machine and near the 1-thread
// speed on a busy one; OMP_WAIT_POLICY=passive is the most robust under load
// but costs decoding 15-35% on an idle machine. The Makefile exports
// GOMP_SPINCOUNT=3000 (unless set) to everything it runs, and `make bench`
// passes it to both its sides. Our own loops fork a team only for
// enough work (kParallelMin below, kMacsParallelMin in ops_util.h), and
// through parallel_region / parallel_for below, which keep serial work out of
// OpenMP. The few-row GEMMs and the one-token attention of decoding run on a
// pool of our own instead (pool_ranges / pool_for / pool_for_balanced below).
#include <algorithm>
#include <atomic>
#include <cstdint>

#include <omp.h>

namespace peftlab {

// n <= 0 means "all cores". Applies to OpenBLAS and OpenMP together.
void set_threads(int n);
int threads();
// Reads PEFTLAB_THREADS (if set and valid) and applies it; returns the count.
// Throws std::invalid_argument naming the variable and its value if invalid.
int init_threads_from_env();
// OpenBLAS's name for the kernel it runs (e.g. "Haswell") and its build config.
const char* blas_core_name();
const char* blas_config();

// Element-wise loops (autograd's ops, the optimizers) split across the team
// from this many elements: below it the fork costs more than it saves.
inline constexpr int64_t kParallelMin = 32768;

// Runs region() on every thread of a new OpenMP team when `parallel` holds
// and the thread setting (omp_get_max_threads) is above one; a `#pragma omp
// for` inside it splits its loop among them. Otherwise, outside any parallel
// region, calls it once, here, without entering OpenMP (an orphaned `omp for`
// then runs the whole loop, omp_get_thread_num() is 0). Why not `#pragma omp
// parallel if (parallel)`: libgomp starts a team of one for a false `if` (and
// at 1 thread), and ends every team with a futex wake, a system call. A
// small-config decoding step entered 75 regions: 25 GEMVs and, at 2 threads,
// 50 teams of one (bias rows, LayerNorm, attention, adds, GELU); at 1 thread
// all 75 were teams of one. On a paravirtualized guest kernel a 1-thread
// 64 + 64 generate took 30.2 ms (median) with them and 19.0 without (README
// "Serial work outside OpenMP"). Inside a running team (which no caller does
// today) the old form is kept: there an orphaned `omp for` would bind to the
// enclosing team and split the loop among its threads.
template <class F>
void parallel_region(bool parallel, const F& region) {
    const bool team = parallel && omp_get_max_threads() > 1;
    if (!team && !omp_in_parallel()) {
        region();
        return;
    }
#pragma omp parallel if (team)
    region();
}

// body(i) for every i in [0, n), the range split statically among the team as
// parallel_region decides. Each i runs on one thread, so results that depend
// only on i do not depend on the thread count.
template <class F>
void parallel_for(int64_t n, bool parallel, const F& body) {
    parallel_region(parallel, [&] {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; ++i) body(i);
    });
}

namespace detail {
// [begin, end) of thread t of T over [0, n) as libgomp's `omp for
// schedule(static)` splits it: n / T items each, the first n % T one more.
struct Range {
    int64_t begin, end;
};
inline Range static_range(int64_t n, int64_t t, int64_t T) {
    const int64_t q = n / T, r = n % T, begin = t * q + std::min(t, r);
    return {begin, begin + q + (t < r ? 1 : 0)};
}

using RangeFn = void (*)(const void* body, int64_t begin, int64_t end, int thread);
void pool_run(int64_t n, RangeFn fn, const void* body);
}  // namespace detail

// body(begin, end, thread) on the threads of peftlab's own worker pool, [0, n)
// split statically as `omp for schedule(static)` splits it (thread t of T
// gets n / T items, one more if t < n % T; thread 0 is the caller), each
// range once, `thread` in [0, T). Range t >= 1 runs on worker t or, if that
// worker has not started it when the caller has finished range 0 (asleep, or
// off its core beside another process), on the caller after range 0, in
// increasing t, still as `thread` t: so a range may wait only for ranges
// numbered below it, and its result must not depend on which thread runs it.
// T is the calling thread's thread setting (omp_get_max_threads(), so a
// per-thread scratch of threads() slots has one for every `thread`). Returns
// when every range is done; the first exception from a range the caller ran
// (range 0, and any it took over) is rethrown after the others finish, one
// from a range a worker ran terminates the process (as in an OpenMP region):
// which of the two a range t >= 1 meets depends on timing. Failing to start
// a worker throws std::system_error before any range runs. For n <= 1, at
// T = 1, inside an OpenMP team, inside a pool range, or while another thread
// runs the pool, the caller runs [0, n) alone with thread 0.
//
// Why a pool beside OpenMP: for the few-row GEMMs of decoding, 25 (small) to
// 73 (gpt2) per generated token, each a few to a few hundred microseconds.
// A libgomp region costs ~3 us more than its work on a paravirtualized
// 2-core guest (team start, two barriers, each ending in a futex wake, a
// system call), against ~0.4 us here (a throwaway loop of 1024-float regions,
// 20000 each, interleaved). The pool's workers spin on a generation counter
// for 100 us after a range, so consecutive GEMVs reach them without a system
// call, then sleep on it (std::atomic::wait, a futex). During a burst of
// calls the workers (and the caller, until the workers' ranges are done) hold
// their cores through the serial work between calls; after it, 100 spinning
// microseconds are all they take from other work.
template <class F>
void pool_ranges(int64_t n, const F& body) {
    detail::pool_run(
        n,
        [](const void* f, int64_t begin, int64_t end, int thread) { (*static_cast<const F*>(f))(begin, end, thread); },
        &body);
}

// body(i) for every i in [0, n), split as pool_ranges splits it. Each i runs
// on one thread, so results that depend only on i do not depend on the
// thread count.
template <class F>
void pool_for(int64_t n, const F& body) {
    pool_ranges(n, [&](int64_t begin, int64_t end, int) {
        for (int64_t i = begin; i < end; ++i) body(i);
    });
}

// body(i) for every i in [0, n), each i once, on the worker pool with
// stealing: thread t starts on the i that pool_for gives it, in order, and a
// thread done with its own takes the others' remaining i from their ends, one
// at a time. So the threads finish together when one runs slower (the other
// core's load, its share of the memory bandwidth), while each still reads its
// range front to back. Which thread runs an i depends on timing: body(i) must
// give the same result on any thread. A claim is a compare-and-swap on the
// owner's 64-byte slot, so for i of a few microseconds or less plain pool_for
// is cheaper. Above 64 threads it is pool_for.
template <class F>
void pool_for_balanced(int64_t n, const F& body) {
    constexpr int kMaxThreads = 64;
    const int T = threads();
    if (T <= 1 || T > kMaxThreads || n >= (int64_t(1) << 32)) return pool_for(n, body);
    struct alignas(64) Span {
        std::atomic<uint64_t> next_end;  // the owner's next i (low 32 bits) and its range's end (high 32 bits)
    };
    Span spans[kMaxThreads];
    for (int t = 0; t < T; ++t) {  // schedule(static)'s split, as pool_ranges makes it
        const detail::Range r = detail::static_range(n, t, T);
        spans[t].next_end.store(uint64_t(r.begin) | uint64_t(r.end) << 32, std::memory_order_relaxed);
    }
    // One range per thread; run alone (pool busy, nested), thread 0 takes every range in turn.
    pool_ranges(T, [&](int64_t, int64_t, int thread) {
        for (int k = 0; k < T; ++k) {
            const bool own = k == 0;
            std::atomic<uint64_t>& slot = spans[(thread + k) % T].next_end;
            for (uint64_t v = slot.load(std::memory_order_relaxed);;) {
                const uint64_t next = v & 0xffffffffu, end = v >> 32;
                if (next >= end) break;
                const uint64_t claimed = own ? next : end - 1;
                const uint64_t rest = own ? (next + 1) | end << 32 : next | (end - 1) << 32;
                if (slot.compare_exchange_weak(v, rest, std::memory_order_relaxed)) {
                    v = rest;  // (a failed exchange reloads v)
                    body(int64_t(claimed));
                }
            }
        }
    });
}

}  // namespace peftlab
