// Faults during training: a process killed (SIGKILL) at random moments while it
// writes checkpoints, a full disk (RLIMIT_FSIZE) under every writer, output
// directories that cannot be written or vanish mid-run, non-finite values in
// loaded tensors.
//
// The kill test runs training in child processes: this test binary re-executed
// with PEFTLAB_TEST_CHILD=train (tests/main.cpp hands that to
// run_test_child), so the child is a fresh process with no state shared with
// the suite.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "autograd/ops.h"
#include "autograd/tape.h"
#include "experiments/lib/harness.h"
#include "nn/checkpoint.h"
#include "nn/optim.h"
#include "nn/safetensors.h"
#include "nn/trainer.h"
#include "peft/adapter_io.h"
#include "peft/registry.h"
#include "tests/testing.h"

using namespace peftlab;
using Catch::Contains;
using peftlab::testing::TempDir;
namespace fs = std::filesystem;

namespace {

constexpr int64_t kChildSteps = 16;

GPTConfig child_config() {
    GPTConfig c;
    c.vocab = 64, c.d_model = 64, c.n_layers = 2, c.n_heads = 4, c.d_ff = 128, c.max_seq = 8;
    return c;
}

std::string read_all(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
}

// The training a child runs: resumes from dir's checkpoint if there is one,
// checkpoints after every update. Random batches from the data generator and
// dropout, so every generator must come back on resume.
int train_child(const std::string& dir) {
    GPTConfig c = child_config();
    c.dropout = 0.1f;
    GPT model(c, 3);
    AdamW opt(trainable_named_parameters(model));
    TrainOptions o;
    o.steps = kChildSteps;
    o.ckpt_every = 1;
    o.log_every = 0;
    o.out_dir = dir;
    o.resume = true;
    o.data_seed = 5;
    o.rngs = {{"dropout", &model.dropout_rng()}};
    Trainer t(trainable_named_parameters(model), opt,
              [&](int64_t, Rng& data, const dist::Shard&) {
                  ModelInput in;
                  in.B = 2, in.T = c.max_seq;
                  std::vector<int32_t> targets;
                  for (int64_t i = 0; i < in.B * in.T; ++i) {
                      in.tokens.push_back(int32_t(data.below(uint32_t(c.vocab))));
                      targets.push_back(int32_t(data.below(uint32_t(c.vocab))));
                  }
                  return lm_loss(model.forward(in), targets);
              },
              o);
    return t.run().completed ? 0 : 1;
}

// Runs this binary as a training child on dir; kills it with SIGKILL after
// kill_after (never if negative). Returns the child's exit status or -signal.
int run_child(const std::string& dir, std::chrono::microseconds kill_after) {
    const pid_t pid = ::fork();
    if (pid == 0) {
        ::setenv("PEFTLAB_TEST_CHILD", "train", 1);
        ::setenv("PEFTLAB_TEST_CHILD_DIR", dir.c_str(), 1);
        ::setenv("PEFTLAB_THREADS", "1", 1);
        ::execl("/proc/self/exe", "peftlab-tests", static_cast<char*>(nullptr));
        ::_exit(127);
    }
    REQUIRE(pid > 0);
    if (kill_after.count() >= 0) {
        std::this_thread::sleep_for(kill_after);
        ::kill(pid, SIGKILL);
    }
    int status = 0;
    ::waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
}

std::vector<double> losses_of(const std::string& dir) {
    std::vector<double> out;
    std::ifstream in(fs::path(dir) / "metrics.jsonl");
    for (std::string line; std::getline(in, line);) out.push_back(nlohmann::json::parse(line)["loss"].get<double>());
    return out;
}

// Names in dir that are not in `allowed` (temp files left behind, etc.).
std::vector<std::string> extra_files(const fs::path& dir, std::vector<std::string> allowed) {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(dir)) {
        const std::string n = e.path().filename().string();
        if (std::find(allowed.begin(), allowed.end(), n) == allowed.end()) out.push_back(n);
    }
    return out;
}

// Sets RLIMIT_FSIZE (a full disk as the writer sees it: writes past `bytes`
// fail with EFBIG; SIGXFSZ, which would kill us, ignored) for its lifetime.
class FileSizeLimit {
public:
    explicit FileSizeLimit(rlim_t bytes) {
        ::getrlimit(RLIMIT_FSIZE, &old_);
        old_handler_ = std::signal(SIGXFSZ, SIG_IGN);
        rlimit lim = old_;
        lim.rlim_cur = bytes;
        ::setrlimit(RLIMIT_FSIZE, &lim);
    }
    ~FileSizeLimit() {
        ::setrlimit(RLIMIT_FSIZE, &old_);
        std::signal(SIGXFSZ, old_handler_);
    }

private:
    rlimit old_{};
    void (*old_handler_)(int) = nullptr;
};

}  // namespace

// Called by tests/main.cpp in a child process (see the file comment).
int run_test_child(const std::string& mode) {
    const char* dir = std::getenv("PEFTLAB_TEST_CHILD_DIR");
    if (mode == "train" && dir) return train_child(dir);
    fmt::print(stderr, "unknown test child mode '{}'\n", mode);
    return 2;
}

TEST_CASE("SIGKILL at random moments during checkpoint writes: the last checkpoint loads, resume is bitwise identical",
          "[faults]") {
    TempDir tmp;
    // The uninterrupted run, also timed to spread the kills over a run's length.
    const auto t0 = std::chrono::steady_clock::now();
    REQUIRE(run_child(tmp.path("straight"), std::chrono::microseconds(-1)) == 0);
    const auto run_us = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0);
    const std::vector<double> expected = losses_of(tmp.path("straight"));
    REQUIRE(expected.size() == size_t(kChildSteps));

    // Kills land within the first half of a run's time, so that most interrupt
    // it; a run that finished anyway is checked and started over.
    const std::string dir = tmp.path("killed");
    Rng rng(2026);
    int kills = 0, completed = 0;
    int64_t last_step = 0;
    for (int i = 0; i < 16; ++i) {
        const auto after = std::chrono::microseconds(int64_t(rng.uniform() * 0.5 * double(run_us.count())));
        const int rc = run_child(dir, after);
        if (rc == -SIGKILL) ++kills;
        else if (rc != 0) FAIL("child exited with " << rc);
        // Whatever the moment of the kill, the checkpoint there is complete and loads.
        const std::string ckpt = (fs::path(dir) / "checkpoint.safetensors").string();
        if (!fs::exists(ckpt)) continue;
        GPT model(child_config(), 0);
        AdamW opt(trainable_named_parameters(model));
        Rng data(0), dropout(0);
        TrainingState st;
        REQUIRE_NOTHROW(st = load_training_state(ckpt, trainable_named_parameters(model), opt,
                                                 {{"data", &data}, {"dropout", &dropout}}));
        CHECK(st.step >= last_step);  // progress is never lost past the last checkpoint
        last_step = st.step;
        if (st.step == kChildSteps) {  // resumed through to the end: the curve of the uninterrupted run
            ++completed;
            CHECK(losses_of(dir) == expected);  // bitwise: the same doubles
            // A run killed after its last checkpoint may have left the temp file of a later
            // write (metrics.csv); the next writer of that file removes it (checked at the end).
            if (rc == 0) CHECK(extra_files(dir, {"checkpoint.safetensors", "metrics.jsonl", "metrics.csv"}).empty());
            fs::remove_all(dir);
            last_step = 0;
        }
    }
    INFO(kills << " kills, " << completed << " runs resumed to the end");
    CHECK(kills >= 8);
    REQUIRE(run_child(dir, std::chrono::microseconds(-1)) == 0);  // finish the last run
    CHECK(losses_of(dir) == expected);
    // A killed writer cannot remove its temp file; the next run's writer clears
    // those of processes that no longer run.
    CHECK(extra_files(dir, {"checkpoint.safetensors", "metrics.jsonl", "metrics.csv"}).empty());
}

TEST_CASE("A full disk under every writer: an error naming the path, the previous file intact, no temp file",
          "[faults]") {
    TempDir tmp;
    const std::unique_ptr<GPT> model = std::make_unique<GPT>(child_config(), 1);  // ~100k params: > 64 KB files
    const NamedTensors params = model->named_parameters();
    constexpr rlim_t kLimit = 64 * 1024;

    SECTION("safetensors and model checkpoints") {
        const std::string path = tmp.path("model.safetensors");
        save_model(path, *model);
        const std::string before = read_all(path);
        {
            FileSizeLimit full(kLimit);
            CHECK_THROWS_WITH(save_model(path, *model), Contains(path) && Contains("File too large"));
        }
        CHECK(read_all(path) == before);
        CHECK(tmp.entries() == std::vector<std::string>{"model.safetensors"});
    }
    SECTION("training state") {
        AdamW opt(trainable_named_parameters(*model));
        Rng data(1);
        const std::string path = tmp.path("checkpoint.safetensors");
        save_training_state(path, trainable_named_parameters(*model), opt, {{"data", &data}}, {3, {}});
        const std::string before = read_all(path);
        {
            FileSizeLimit full(kLimit);
            CHECK_THROWS_WITH(
                save_training_state(path, trainable_named_parameters(*model), opt, {{"data", &data}}, {4, {}}),
                Contains(path));
        }
        CHECK(read_all(path) == before);
        CHECK(tmp.entries() == std::vector<std::string>{"checkpoint.safetensors"});
    }
    SECTION("adapters, own and Hugging Face layout") {
        for (const bool hf : {false, true}) {
            peft::AdapterOptions o;
            o.n = 128;  // 2*128*64 floats per layer: over the limit
            o.positions = "hf";
            GPT base(child_config(), 1);
            auto a = peft::make_adapter("prefix-kv", o);
            a->attach(base);
            const std::string dir = tmp.path(hf ? "hf" : "own");
            hf ? peft::export_hf(dir, *a) : peft::save_adapter(dir, *a);
            const std::string weights = read_all(fs::path(dir) / peft::kAdapterWeightsFile);
            const std::string config = read_all(fs::path(dir) / peft::kAdapterConfigFile);
            {
                FileSizeLimit full(kLimit);
                CHECK_THROWS_WITH(hf ? peft::export_hf(dir, *a) : peft::save_adapter(dir, *a),
                                  Contains((fs::path(dir) / peft::kAdapterWeightsFile).string()) &&
                                      Contains("File too large"));
            }
            CHECK(read_all(fs::path(dir) / peft::kAdapterWeightsFile) == weights);
            CHECK(read_all(fs::path(dir) / peft::kAdapterConfigFile) == config);
            CHECK(extra_files(dir, {peft::kAdapterWeightsFile, peft::kAdapterConfigFile}).empty());
        }
    }
    SECTION("results") {
        harness::MethodResult r;
        r.method = r.label = "lora";
        const std::string dir = tmp.path("run");
        harness::write_results(dir, "faults", {r}, {{"note", "first"}});
        const std::string before = read_all(fs::path(dir) / "results.json");
        {
            FileSizeLimit full(16);  // smaller than any results.json
            CHECK_THROWS_WITH(harness::write_results(dir, "faults", {r}, {{"note", "second"}}),
                              Contains(dir) && Contains("File too large"));
        }
        CHECK(read_all(fs::path(dir) / "results.json") == before);
        for (const std::string& n : extra_files(dir, {})) CHECK(n.find(".tmp.") == std::string::npos);
    }
}

TEST_CASE("Unwritable output, a checkpoint directory deleted mid-run: clear errors", "[faults]") {
    TempDir tmp;
    GPT model(child_config(), 1);
    // A path under a regular file cannot be created by anyone, root included
    // (the suite may run as root, for whom permission bits do not apply).
    const std::string blocker = tmp.file("not_a_dir", "x");
    AdamW opt(trainable_named_parameters(model));
    auto loss = [&](int64_t, Rng& data, const dist::Shard&) {
        ModelInput in;
        in.B = 1, in.T = 4;
        std::vector<int32_t> targets;
        for (int i = 0; i < 4; ++i) {
            in.tokens.push_back(int32_t(data.below(64)));
            targets.push_back(int32_t(data.below(64)));
        }
        return lm_loss(model.forward(in), targets);
    };
    SECTION("--out under a file") {
        TrainOptions o;
        o.steps = 2, o.log_every = 0, o.out_dir = blocker + "/run";
        Trainer t(trainable_named_parameters(model), opt, loss, o);
        CHECK_THROWS_WITH(t.run(), Contains(blocker + "/run"));
        CHECK_THROWS_WITH(save_model(blocker + "/m.safetensors", model), Contains(blocker + "/m.safetensors"));
        CHECK_THROWS_WITH(harness::write_results(blocker + "/out", "x", {}, {}), Contains(blocker + "/out"));
    }
    SECTION("adapter directory that cannot be written") {
        auto a = peft::make_adapter("lora");
        a->attach(model);
        CHECK_THROWS_WITH(peft::save_adapter(blocker + "/adapter", *a), Contains(blocker + "/adapter"));
        if (::geteuid() != 0) {  // permission bits bind everyone but root
            const fs::path ro = tmp.dir / "ro";
            fs::create_directories(ro);
            fs::permissions(ro, fs::perms::owner_read | fs::perms::owner_exec);
            CHECK_THROWS_WITH(peft::save_adapter(ro.string(), *a), Contains(ro.string()) && Contains("Permission denied"));
        }
    }
    SECTION("checkpoint directory deleted mid-run") {
        TrainOptions o;
        o.steps = 6, o.ckpt_every = 1, o.log_every = 0, o.out_dir = tmp.path("run");
        Trainer t(trainable_named_parameters(model), opt,
                  [&](int64_t step, Rng& data, const dist::Shard& shard) {
                      if (step == 3) fs::remove_all(tmp.path("run"));
                      return loss(step, data, shard);
                  },
                  o);
        CHECK_THROWS_WITH(t.run(), Contains(tmp.path("run")));
        clear_tape();
    }
}

TEST_CASE("NaN/Inf in loaded weights or adapter tensors: refused at load naming the tensor, unless allowed",
          "[faults]") {
    TempDir tmp;
    const float nan = std::nanf(""), inf = INFINITY;
    GPT model(child_config(), 1);
    Tensor fc = model.blocks[1]->mlp.fc.weight;
    fc.data()[5] = nan;
    save_model(tmp.path("nan.safetensors"), model);
    GPT other(child_config(), 2);
    const std::vector<float> before = other.blocks[1]->mlp.fc.weight.to_vector();
    CHECK_THROWS_WITH(load_model(tmp.path("nan.safetensors"), other),
                      Contains(tmp.path("nan.safetensors")) &&
                          Contains("tensor 'blocks.1.mlp.fc.weight' holds nan at element 5 (of 8192)"));
    CHECK(other.blocks[1]->mlp.fc.weight.to_vector() == before);  // all or nothing
    CHECK_THROWS_WITH(load_model_new(tmp.path("nan.safetensors")), Contains("'blocks.1.mlp.fc.weight' holds nan"));
    LoadOptions allow;
    allow.allow_nonfinite = true;
    load_model(tmp.path("nan.safetensors"), other, allow);
    CHECK(std::isnan(other.blocks[1]->mlp.fc.weight.data()[5]));

    // Training state: a moment of AdamW.
    GPT m(child_config(), 1);
    AdamW opt(trainable_named_parameters(m));
    for (auto& [key, t] : opt.state_dict())
        if (key == "wpe.weight.exp_avg_sq") Tensor(t).data()[0] = inf;
    save_training_state(tmp.path("state.safetensors"), trainable_named_parameters(m), opt, {}, {1, {}});
    CHECK_THROWS_WITH(load_training_state(tmp.path("state.safetensors"), trainable_named_parameters(m), opt, {}),
                      Contains("tensor 'optim.wpe.weight.exp_avg_sq' holds inf at element 0"));

    // Adapters, own and Hugging Face layout.
    GPT base(child_config(), 1);
    auto lora = peft::make_adapter("lora");
    lora->attach(base);
    for (auto& [name, t] : lora->parameters())
        if (name == "blocks.0.attn.v_proj.lora_B.weight") Tensor(t).data()[3] = -inf;
    peft::save_adapter(tmp.path("lora"), *lora);
    peft::export_hf(tmp.path("lora_hf"), *lora);
    GPT base2(child_config(), 1);
    CHECK_THROWS_WITH(peft::load_adapter(tmp.path("lora"), base2),
                      Contains("tensor 'blocks.0.attn.v_proj.lora_B.weight' holds -inf at element 3"));
    CHECK_THROWS_WITH(peft::import_hf(tmp.path("lora_hf"), base2),
                      Contains("tensor 'base_model.model.transformer.h.0.attn.c_attn.lora_B.weight' holds -inf"));
    CHECK_NOTHROW(peft::load_adapter(tmp.path("lora"), base2, allow));
}
