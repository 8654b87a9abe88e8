#include "autograd/threads.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <exception>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <cblas.h>
#include <omp.h>
#include <pthread.h>

namespace peftlab {

void set_threads(int n) {
    if (n <= 0) n = omp_get_num_procs();
    omp_set_num_threads(n);
    openblas_set_num_threads(n);
}

int threads() { return omp_get_max_threads(); }

int init_threads_from_env() {
    const char* v = std::getenv("PEFTLAB_THREADS");
    int n = 0;
    if (v && *v) {
        char* end = nullptr;
        long parsed = std::strtol(v, &end, 10);
        if (*end != '\0' || parsed < 0 || parsed > 4096)
            throw std::invalid_argument(std::string("PEFTLAB_THREADS: invalid value '") + v +
                                        "' (expected a thread count, 0 = all cores)");
        n = int(parsed);
    }
    set_threads(n);
    return threads();
}

namespace {

// How long a pool worker spins for the next range before it sleeps. Longer
// than the serial work between two GEMVs of a decoding step (LayerNorm,
// one-token attention: a few microseconds at small, tens at gpt2) and the
// sampling between steps, so that a generate wakes a sleeping worker about
// once per call; short enough that a worker left spinning after the last GEMV
// costs the next OpenMP region or another process little.
constexpr auto kPoolSpin = std::chrono::microseconds(100);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

// T - 1 workers; the caller of try_run() is thread 0. One job at a time:
// try_run() publishes it by bumping `generation_` to g. Range t >= 1 of job g
// is claimed once, by a compare-and-swap of claims_[t - 1] from g - 1 to g: by
// worker t when it sees g, or by the caller when it has finished its own
// range and worker t has not claimed yet (it sleeps, or another process holds
// its core). The caller then waits for `done_` to count the ranges the
// workers claimed. It starts the workers (or restarts them at a new T).
//
// Why the caller takes ranges over: it used to wait for every worker. Beside
// another process on the same cores a worker is often off its core for a
// scheduler time slice (milliseconds), and a small batch-1 decoding step, 25
// pool calls of a few microseconds, took one slice per call: 1847 ms per
// generate beside a medium training step (OpenMP threads spinning at their
// barriers) against 12 ms alone.
class WorkerPool {
public:
    // Joins the workers at exit; no thread may be running the pool then.
    ~WorkerPool() { resize(1); }

    static WorkerPool& instance() {
        static WorkerPool pool;
        // Registered once the pool exists: a child forked before then has none.
        static const int registered = [] {
            if (int err = pthread_atfork(nullptr, nullptr, [] { pool.after_fork_in_child(); }))
                throw std::system_error(err, std::generic_category(), "pool_ranges: pthread_atfork");
            return 0;
        }();
        (void)registered;
        return pool;
    }

    // True if it ran the job; false if another thread holds the pool.
    bool try_run(int64_t n, detail::RangeFn fn, const void* body, int T) {
        if (busy_.exchange(true, std::memory_order_acquire)) return false;
        struct Release {
            std::atomic<bool>& busy;
            ~Release() { busy.store(false, std::memory_order_release); }
        } release{busy_};
        if (int(workers_.size()) + 1 != T) resize(T);
        fn_ = fn;
        body_ = body;
        n_ = n;
        done_.store(0, std::memory_order_relaxed);
        // Publishes fn_, body_, n_, done_ = 0 to the worker that claims a range.
        const uint32_t g = generation_.fetch_add(1, std::memory_order_seq_cst) + 1;
        // seq_cst pairs with the worker's sleepers_ increment before it waits:
        // either we see it and wake it, or its wait sees the new generation.
        if (sleepers_.load(std::memory_order_seq_cst) > 0) generation_.notify_all();
        std::exception_ptr error;
        const auto run_range = [&](int t) {
            const detail::Range r = detail::static_range(n, t, T);
            try {
                fn(body, r.begin, r.end, t);
            } catch (...) {
                if (!error) error = std::current_exception();
            }
        };
        run_range(0);
        int claimed = T - 1;  // ranges the workers run
        for (int t = 1; t < T; ++t)  // in increasing t: a range may wait for a lower one
            if (uint32_t unclaimed = g - 1;
                claims_[t - 1].gen.compare_exchange_strong(unclaimed, g, std::memory_order_relaxed))
                run_range(t), --claimed;
        // Spin until the workers are done, yielding the core now and then only
        // with more threads than cores (where a worker may be waiting for this
        // one). Not sleeping here paid: with a CPU-bound process beside a
        // 2-thread medium generate, 257 / 549 ms (minimum / median) against
        // 518 / 821 when this wait slept after kPoolSpin as the workers do
        // (small: 33.5 / 39.3 against 26.3 / 38.2, within the noise).
        for (uint32_t spins = 1; done_.load(std::memory_order_acquire) != claimed; ++spins) {
            cpu_relax();
            if (oversubscribed_ && spins % 1024 == 0) std::this_thread::yield();
        }
        if (error) std::rethrow_exception(error);
        return true;
    }

private:
    // A forked child has only the thread that called fork(): the workers'
    // std::thread objects name threads that do not exist there, and
    // destroying or joining them would abort or hang. Their vector is
    // abandoned (its buffer leaks, once per fork) and the next call starts
    // new workers.
    void after_fork_in_child() {
        new (&workers_) std::vector<std::thread>();
        busy_.store(false, std::memory_order_relaxed);
        sleepers_.store(0, std::memory_order_relaxed);
        stop_.store(false, std::memory_order_relaxed);  // fork() may have come while another thread was in resize()
    }

    void resize(int T) {
        if (!workers_.empty()) {
            stop_.store(true, std::memory_order_relaxed);  // published by the generation bump
            generation_.fetch_add(1, std::memory_order_seq_cst);
            generation_.notify_all();
            for (auto& w : workers_) w.join();
            workers_.clear();
            stop_.store(false, std::memory_order_relaxed);
        }
        T_ = T;
        // Read here, not per call: libgomp's omp_get_num_procs() is a
        // sched_getaffinity system call each time (per call, it cost a small
        // batch-1 generate 10.5 -> 14.0 ms median). An affinity narrowed after
        // the workers start (taskset -p) is seen at the next thread setting.
        oversubscribed_ = T > omp_get_num_procs();
        const uint32_t start = generation_.load(std::memory_order_relaxed);
        claims_ = std::make_unique<Claim[]>(size_t(T - 1));
        for (int t = 1; t < T; ++t) claims_[t - 1].gen.store(start, std::memory_order_relaxed);
        for (int t = 1; t < T; ++t) workers_.emplace_back([this, t, start] { work(t, start); });
    }

    void work(int t, uint32_t seen) {
        for (;;) {
            uint32_t now = generation_.load(std::memory_order_acquire);
            const auto deadline = std::chrono::steady_clock::now() + kPoolSpin;
            for (uint32_t spins = 1; now == seen; ++spins) {
                cpu_relax();
                if (spins % 64 == 0 && std::chrono::steady_clock::now() > deadline) {
                    sleepers_.fetch_add(1, std::memory_order_seq_cst);
                    generation_.wait(seen, std::memory_order_seq_cst);
                    sleepers_.fetch_sub(1, std::memory_order_relaxed);
                }
                now = generation_.load(std::memory_order_acquire);
            }
            seen = now;
            if (stop_.load(std::memory_order_relaxed)) return;
            // Every job before `now` has all its ranges claimed (the caller
            // returns only then), so the slot holds now - 1 unless the caller
            // took this range over: then the job's fields may already be the
            // next job's, and the worker must not read them. Relaxed is
            // enough: the fields of job `now` were published by the
            // generation bump this thread loaded with acquire, and a
            // successful exchange from now - 1 proves `now` is still the
            // current job (the next one waits for this range's done_).
            uint32_t unclaimed = now - 1;
            if (!claims_[t - 1].gen.compare_exchange_strong(unclaimed, now, std::memory_order_relaxed)) continue;
            const detail::Range r = detail::static_range(n_, t, T_);
            fn_(body_, r.begin, r.end, t);
            done_.fetch_add(1, std::memory_order_release);
        }
    }

    std::vector<std::thread> workers_;
    std::atomic<bool> busy_{false};
    std::atomic<uint32_t> generation_{0};
    std::atomic<int> done_{0}, sleepers_{0};
    struct alignas(64) Claim {  // one cache line per range: claims do not contend
        std::atomic<uint32_t> gen{0};
    };
    std::unique_ptr<Claim[]> claims_;  // [T - 1]: slot t - 1, the job whose range t was claimed last
    // Written by the caller before the generation bump, read by workers after.
    detail::RangeFn fn_ = nullptr;
    const void* body_ = nullptr;
    int64_t n_ = 0;
    int T_ = 1;
    // Atomic: a worker whose range the caller took over may still be reading
    // it when the next call restarts the workers.
    std::atomic<bool> stop_{false};
    bool oversubscribed_ = false;  // more threads than the cores this process may use
};

}  // namespace

void detail::pool_run(int64_t n, RangeFn fn, const void* body) {
    const int T = omp_get_max_threads();
    // A call from inside a range finds the pool busy and runs alone.
    if (T > 1 && n > 1 && !omp_in_parallel() && WorkerPool::instance().try_run(n, fn, body, T)) return;
    fn(body, 0, n, 0);
}

const char* blas_core_name() { return openblas_get_corename(); }
const char* blas_config() { return openblas_get_config(); }

}  // namespace peftlab
