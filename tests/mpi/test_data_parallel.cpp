// Data parallelism on MPI (nn/trainer.h, mpi/world.h), run as 2 ranks by
// `make test-mpi`: the communicator, bitwise equivalence of 2 ranks with one
// process accumulating 2 micro-batches, resume across rank counts, and failures
// (an exception on one rank's shard; a rank killed with SIGKILL; a bad flag)
// that end the job with a message naming the rank instead of hanging.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <thread>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include "autograd/tape.h"
#include "nn/checkpoint.h"
#include "nn/dist.h"
#include "nn/gpt.h"
#include "nn/optim.h"
#include "nn/safetensors.h"
#include "nn/trainer.h"
#include "peft/adapter.h"
#include "peft/registry.h"

using namespace peftlab;
using Catch::Contains;
namespace fs = std::filesystem;

namespace {

constexpr int64_t kB = 4, kT = 8, kV = 32;

GPTConfig tiny() {
    GPTConfig c;
    c.vocab = kV, c.d_model = 32, c.n_layers = 2, c.n_heads = 2, c.d_ff = 64, c.max_seq = kT;
    return c;
}

// A global batch of kB rows; row r does not count its first r + 1 targets (as
// the source of a conditional example), so the two halves count 13 and 9
// tokens and must be weighed by them.
struct Batch {
    ModelInput in;
    std::vector<int32_t> targets;
};
Batch global_batch(Rng& rng) {
    Batch b;
    b.in.B = kB, b.in.T = kT;
    for (int64_t r = 0; r < kB; ++r)
        for (int64_t t = 0; t < kT; ++t) {
            b.in.tokens.push_back(int32_t(rng.below(kV)));
            const int32_t target = int32_t(rng.below(kV));
            b.targets.push_back(t <= r ? -1 : target);
        }
    return b;
}
Batch rows(const Batch& b, int64_t from, int64_t to) {
    Batch out;
    out.in.B = to - from, out.in.T = kT;
    out.in.tokens.assign(b.in.tokens.begin() + from * kT, b.in.tokens.begin() + to * kT);
    out.targets.assign(b.targets.begin() + from * kT, b.targets.begin() + to * kT);
    return out;
}

using Snapshot = std::vector<std::vector<float>>;
Snapshot snapshot(const NamedTensors& ts) {
    Snapshot s;
    for (auto& [n, t] : ts) s.push_back(t.to_vector());
    return s;
}

// One fine-tuning run of `method` on the tiny base: AdamW, clipping, a cosine
// schedule over 8 updates.
struct Run {
    std::unique_ptr<GPT> model;
    std::unique_ptr<peft::Adapter> adapter;
    std::unique_ptr<AdamW> opt;
    std::function<void(int64_t step, int shard, Batch&)> corrupt;  // test hook: bad input
    explicit Run(const std::string& method) {
        model = std::make_unique<GPT>(tiny(), 3);
        peft::AdapterOptions o;
        o.n = 4;
        adapter = peft::make_adapter(method, o);
        adapter->activate(*model);
        NamedTensors ps(adapter->parameters().begin(), adapter->parameters().end());
        opt = std::make_unique<AdamW>(ps, AdamWOptions{2e-2, 0.9, 0.999, 1e-8, 0.01});
    }
    NamedTensors trained() const { return NamedTensors(adapter->parameters().begin(), adapter->parameters().end()); }
    TrainSummary train(dist::Communicator& comm, int grad_accum, int64_t steps, const std::string& dir = "",
                       bool resume = false, int64_t ckpt_every = 0) {
        TrainOptions to;
        to.steps = steps, to.grad_accum = grad_accum, to.clip_norm = 1.0, to.log_every = 0;
        to.schedule = LRSchedule{2e-2, 2, 8, LRSchedule::Decay::Cosine, 0.1};
        to.out_dir = dir, to.resume = resume, to.ckpt_every = ckpt_every, to.data_seed = 9, to.comm = &comm;
        Trainer t(trained(), *opt,
                  [&](int64_t step, Rng& rng, const dist::Shard& shard) -> MicroBatchLoss {
                      Batch b = rows(global_batch(rng), shard.begin(kB), shard.end(kB));
                      if (corrupt) corrupt(step, shard.index, b);
                      return {model->loss(b.in, b.targets), counted_targets(b.targets)};
                  },
                  to);
        return t.run();
    }
};

dist::SingleProcess one_process;

// A directory every rank sees (rank 0 makes it, removed at the end).
struct SharedDir {
    std::string path;
    SharedDir() {
        std::string p;
        if (dist::is_root()) {
            char tmpl[] = "/tmp/peftlab-mpi-XXXXXX";
            p = ::mkdtemp(tmpl) ? tmpl : "";
        }
        path = dist::broadcast_string(dist::world(), p, 0);
        REQUIRE(!path.empty());
    }
    ~SharedDir() {
        dist::world().barrier();
        if (dist::is_root()) fs::remove_all(path);
    }
    std::string sub(const std::string& name) const { return path + "/" + name; }
};

}  // namespace

TEST_CASE("communicator: sums over ranks, broadcast from a root, rank count", "[mpi]") {
    dist::Communicator& comm = dist::world();
    INFO(comm.describe());
    REQUIRE(comm.size() == 2);  // make test-mpi runs 2 ranks
    const int r = comm.rank(), R = comm.size();
    std::vector<float> f = {float(r + 1), 0.5f * float(r), -1.f};
    comm.all_reduce_sum(f.data(), f.size());
    CHECK(f == std::vector<float>{float(R * (R + 1) / 2), 0.5f * float(R * (R - 1) / 2), -float(R)});
    double d[2] = {1e300, double(r)};
    comm.all_reduce_sum(d, 2);
    CHECK(d[0] == 1e300 * R);
    CHECK(d[1] == double(R * (R - 1) / 2));
    CHECK(dist::broadcast_string(comm, r == 1 ? "from rank one" : "", 1) == "from rank one");
    CHECK(comm.comm_seconds() > 0.0);
}

TEST_CASE("2 ranks give bitwise the loss curve and weights of one process with grad_accum 2", "[mpi]") {
    const std::string method = GENERATE("prefix", "lora", "full");
    INFO(method);
    Run ranks(method), accum(method), one_batch(method);
    const TrainSummary s2 = ranks.train(dist::world(), 1, 6);
    const TrainSummary sa = accum.train(one_process, 2, 6);  // the same halves, one after the other
    const TrainSummary s1 = one_batch.train(one_process, 1, 6);
    REQUIRE(s2.losses.size() == 6);
    CHECK(s2.losses == sa.losses);
    CHECK(snapshot(ranks.trained()) == snapshot(accum.trained()));
    CHECK(snapshot(ranks.opt->state_dict()) == snapshot(accum.opt->state_dict()));
    // And as one batch of all 4 rows, to float rounding: the halves (13 and 9
    // counted tokens) are weighed by their tokens.
    for (size_t i = 0; i < 6; ++i) CHECK(s2.losses[i] == Approx(s1.losses[i]).epsilon(1e-5));
    // Only the trained tensors' gradients travel: the rest of the model is
    // frozen (for full: the model itself) and untouched on every rank.
    CHECK(s2.comm_ms_per_step > 0.0);
}

TEST_CASE("resume: a checkpoint of 2 ranks continues on 1, and one of 1 on 2, as the uninterrupted run", "[mpi]") {
    SharedDir dir;
    Run straight("prefix");
    const TrainSummary full = straight.train(one_process, 2, 8);
    REQUIRE(full.losses.size() == 8);

    // 2 ranks write the checkpoint at update 4 (rank 0 writes, both run).
    Run first("prefix");
    REQUIRE(first.train(dist::world(), 1, 4, dir.sub("from2")).completed);
    dist::world().barrier();
    // Each rank resumes alone on its own copy of it.
    const std::string mine = dir.sub(fmt::format("from2-on1-rank{}", dist::world().rank()));
    fs::copy(dir.sub("from2"), mine, fs::copy_options::recursive);
    Run resumed("prefix");
    for (auto& [n, t] : resumed.trained()) std::fill(Tensor(t).data(), Tensor(t).data() + t.numel(), 0.25f);
    const TrainSummary rest = resumed.train(one_process, 2, 8, mine, true);
    CHECK(rest.start_step == 4);
    REQUIRE(rest.losses.size() == 4);
    for (size_t i = 0; i < 4; ++i) CHECK(rest.losses[i] == full.losses[i + 4]);
    CHECK(snapshot(resumed.trained()) == snapshot(straight.trained()));

    // One process writes the checkpoint at update 4; 2 ranks resume from it.
    if (dist::is_root()) {
        Run alone("prefix");
        REQUIRE(alone.train(one_process, 2, 4, dir.sub("from1")).completed);
    }
    dist::world().barrier();
    Run both("prefix");
    const TrainSummary rest2 = both.train(dist::world(), 1, 8, dir.sub("from1"), true);
    CHECK(rest2.start_step == 4);
    REQUIRE(rest2.losses.size() == 4);
    for (size_t i = 0; i < 4; ++i) CHECK(rest2.losses[i] == full.losses[i + 4]);
    CHECK(snapshot(both.trained()) == snapshot(straight.trained()));
    dist::world().barrier();
    if (dist::is_root()) {  // rank 0 wrote metrics.jsonl as one run: 8 rows
        std::ifstream in(dir.sub("from1/metrics.jsonl"));
        int lines = 0;
        for (std::string l; std::getline(in, l);) ++lines;
        CHECK(lines == 8);
    }
}

TEST_CASE("bad input on one rank's shard stops every rank naming that rank and cause; checkpoint intact",
          "[mpi][faults]") {
    SharedDir dir;
    Run reference("prefix");
    REQUIRE(reference.train(one_process, 2, 2).completed);

    Run run("prefix");
    // Update 4 (step index 3): a token id beyond the vocabulary in shard 1 only.
    run.corrupt = [](int64_t step, int shard, Batch& b) {
        if (step == 3 && shard == 1) b.in.tokens[2] = 99;
    };
    const auto t0 = std::chrono::steady_clock::now();
    CHECK_THROWS_WITH(run.train(dist::world(), 1, 6, dir.sub("run"), false, 2),
                      Contains("rank 1 of 2 failed at step 4 of 6") && Contains("99"));
    clear_tape();
    CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(20));
    dist::world().barrier();
    // The checkpoint of update 2 is the last good one: it loads and holds the
    // reference's weights after 2 updates.
    Run check("prefix");
    Rng data;
    const TrainingState st =
        load_training_state(dir.sub("run/checkpoint.safetensors"), check.trained(), *check.opt, {{"data", &data}});
    CHECK(st.step == 2);
    CHECK(snapshot(check.trained()) == snapshot(reference.trained()));
}

namespace {

// Runs `mpirun -np 2 <argv...>` in `cwd` as a job of its own: this process
// is itself a rank, so the launcher's variables are left out of the child's
// environment (an MPI job started from inside another would otherwise try
// to join it). stderr goes to `log`. Returns the pid.
pid_t start_job(const std::string& cwd, const std::vector<std::string>& args, const std::string& log) {
    std::vector<std::string> env;
    for (char** e = environ; *e; ++e) {
        const std::string v = *e;
        if (v.rfind("OMPI_", 0) == 0 || v.rfind("PMIX_", 0) == 0 || v.rfind("PMI_", 0) == 0 ||
            v.rfind("OPAL_", 0) == 0 || v.rfind("HYDRA_", 0) == 0)
            continue;
        env.push_back(v);
    }
    env.push_back("PEFTLAB_THREADS=1");
    std::vector<std::string> argv = {"mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "--mca",
                                     "mpi_yield_when_idle", "1", "-np", "2"};
    argv.insert(argv.end(), args.begin(), args.end());
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        ::setpgid(0, 0);
        if (::chdir(cwd.c_str()) != 0) ::_exit(126);
        FILE* f = std::fopen(log.c_str(), "w");
        if (!f) ::_exit(126);
        ::dup2(::fileno(f), 2);
        ::dup2(::fileno(f), 1);
        std::vector<char*> a, e;
        for (auto& s : argv) a.push_back(s.data());
        a.push_back(nullptr);
        for (auto& s : env) e.push_back(s.data());
        e.push_back(nullptr);
        ::execvpe("mpirun", a.data(), e.data());
        ::_exit(127);
    }
    return pid;
}

// Waits up to `limit` for the job; on time-out kills its process group and
// returns -1. Otherwise its wait status.
int wait_job(pid_t pid, std::chrono::seconds limit) {
    const auto t0 = std::chrono::steady_clock::now();
    int status = 0;
    while (std::chrono::steady_clock::now() - t0 < limit) {
        if (::waitpid(pid, &status, WNOHANG) == pid) return status;
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    ::kill(-pid, SIGKILL);
    ::waitpid(pid, &status, 0);
    return -1;
}

std::string read_text(const std::string& path) {
    std::ifstream in(path);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

std::string bin(const std::string& name) { return fs::absolute(fs::path("build/bin") / name).string(); }

}  // namespace

TEST_CASE("a rank killed with SIGKILL ends the whole job within seconds, naming the rank; checkpoint intact",
          "[mpi][faults]") {
    SharedDir dir;
    if (dist::is_root()) {  // rank 0 runs the job; rank 1 waits at the end
        REQUIRE(fs::exists(bin("pretrain")));
        const std::string log = dir.sub("job.log");
        // Pretraining a tiny base checkpoints every 5% of its updates into runs/pretrain/<hash>/.
        const pid_t job = start_job(dir.path,
                                    {bin("pretrain"), "--config", "tiny", "--pretrain-steps", "4000", "--batch", "4",
                                     "--seq", "16"},
                                    log);
        // Wait for rank 1's pid and for a checkpoint.
        pid_t victim = 0;
        std::string ckpt;
        const auto t0 = std::chrono::steady_clock::now();
        while (std::chrono::steady_clock::now() - t0 < std::chrono::seconds(60) && (victim == 0 || ckpt.empty())) {
            std::this_thread::sleep_for(std::chrono::milliseconds(100));
            const std::string text = read_text(log);
            const auto at = text.find("mpi: rank 1 of 2");
            if (at != std::string::npos) {
                const auto p = text.find("(pid ", at);
                if (p != std::string::npos) victim = pid_t(std::atoi(text.c_str() + p + 5));
            }
            if (fs::exists(dir.sub("runs/pretrain")))
                for (auto& e : fs::directory_iterator(dir.sub("runs/pretrain")))
                    if (fs::exists(e.path() / "checkpoint.safetensors")) ckpt = (e.path() / "checkpoint.safetensors").string();
        }
        INFO(read_text(log));
        REQUIRE(victim > 0);
        REQUIRE(!ckpt.empty());
        REQUIRE(::kill(victim, SIGKILL) == 0);
        const auto t_kill = std::chrono::steady_clock::now();
        const int status = wait_job(job, std::chrono::seconds(30));
        const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_kill).count();
        INFO(read_text(log));
        REQUIRE(status != -1);  // not a hang
        CHECK(took < 10.0);
        CHECK(!(WIFEXITED(status) && WEXITSTATUS(status) == 0));
        const std::string text = read_text(log);
        CHECK_THAT(text, Contains("rank 1") && Contains("signal 9"));
        // The last checkpoint written is whole: it parses and holds the step.
        const StFile f = load_safetensors(ckpt);
        CHECK(!f.tensors.empty());
        CHECK(f.metadata.count("step") == 1);
    }
    dist::world().barrier();
}

TEST_CASE("a flag that fails on every rank ends the job with each rank's message, never a hang", "[mpi][faults]") {
    SharedDir dir;
    if (dist::is_root()) {
        const std::string log = dir.sub("job.log");
        // 2 ranks cannot split a global batch of 1 row.
        const pid_t job = start_job(dir.path, {bin("compare"), "--config", "tiny", "--batch", "1"}, log);
        const int status = wait_job(job, std::chrono::seconds(30));
        const std::string text = read_text(log);
        INFO(text);
        REQUIRE(status != -1);
        CHECK(!(WIFEXITED(status) && WEXITSTATUS(status) == 0));
        CHECK_THAT(text, Contains("--batch 1") && Contains("2 micro-batches"));
    }
    dist::world().barrier();
}
