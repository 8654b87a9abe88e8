// serve_bench: what each PEFT method costs at inference when one frozen base
// serves many tenants (peft/serve.h).
//
//   1. Throughput and per-token latency for K tenants: one mixed batch
//      (continuous batching, one forward per step for all tenants) against a
//      batch of one tenant only (same batch size, same requests) and against
//      serving the tenants one after another (each tenant's requests batched
//      together, the tenants in turn).
//   2. Cost against prefix length n, with and without the prefix cache (prompt
//      tuning against prefix tuning at inference).
//   3. Each mergeable method (Adapter::mergeable, e.g. LoRA) unmerged (mixable)
//      against merged into the base (one tenant at a time).
//
// Adapters are randomly initialised with every tensor non-zero (throughput
// does not depend on what they learned), saved as adapter files and loaded by
// the server from them. Timings are medians over interleaved repeats: the
// machine may be shared.
#include <algorithm>
#include <cmath>
#include <chrono>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <cxxopts.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "autograd/flops.h"
#include "autograd/threads.h"
#include "experiments/lib/flags.h"
#include "experiments/lib/harness.h"
#include "nn/hf_gpt2.h"
#include "nn/safetensors.h"
#include "peft/adapter_io.h"
#include "peft/registry.h"
#include "peft/serve.h"

using namespace peftlab;
using namespace peftlab::peft;
using peftlab::flags::int_flag;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

// Servable: every registered method that leaves the base unchanged, and "mix".
std::vector<std::string> known_methods() {
    std::vector<std::string> out;
    for (const std::string& m : peft::method_names())
        if (!peft::make_adapter(m)->changes_base()) out.push_back(m);
    out.push_back("mix");
    return out;
}

struct Args {
    GPTConfig cfg;
    std::string base_dir;  // a Hugging Face GPT-2 directory as the base; empty: random weights of cfg
    int64_t batch = 16, requests = 16, prompt_min = 8, prompt_max = 32, new_tokens = 32;
    std::vector<int64_t> tenants, prefix_lens;
    std::vector<std::string> methods, sweep_methods;
    std::vector<std::string> mix;  // tenant i of the "mix" workload uses mix[i % mix.size()]
    int64_t prefix_len = 16;
    int repeats = 5, threads = 1;
    double prefill_padding = ServerOptions{}.max_prefill_padding;
    bool cpu_clock = true;  // time by the process's CPU time instead of the wall clock
    uint64_t seed = 0;
    std::string out;
};

std::vector<std::string> method_list(const cxxopts::ParseResult& r, const std::string& name, bool allow_mix) {
    std::vector<std::string> out = flags::split_list(r[name].as<std::string>());
    if (out.empty()) throw std::invalid_argument(fmt::format("--{}: no methods given", name));
    std::vector<std::string> known = known_methods();
    if (!allow_mix) known.pop_back();
    for (const std::string& m : out)
        if (std::find(known.begin(), known.end(), m) == known.end()) {
            std::string list;
            for (const std::string& k : known) list += (list.empty() ? "" : ", ") + k;
            throw std::invalid_argument(fmt::format("--{}: unknown method '{}' (known: {})", name, m, list));
        }
    return out;
}

std::vector<int64_t> count_list(const cxxopts::ParseResult& r, const std::string& name, int64_t min) {
    std::vector<int64_t> out;
    for (const std::string& item : flags::split_list(r[name].as<std::string>()))
        out.push_back(flags::whole_number("--" + name, item, min));
    if (out.empty()) throw std::invalid_argument(fmt::format("--{}: no values given", name));
    return out;
}

Args parse_args(int argc, char** argv) {
    cxxopts::Options o("serve_bench", "Multi-tenant serving: throughput, latency and prefix cost per PEFT method");
    // clang-format off
    o.add_options()
        ("h,help", "print this help")
        ("base", "a Hugging Face GPT-2 directory (config.json, model.safetensors) as the base instead of random "
                 "weights (the dimension flags then come from its config.json; adapters use positions hf)",
            cxxopts::value<std::string>())
        ("vocab", "vocabulary size V", cxxopts::value<std::string>()->default_value("256"))
        ("d-model", "model width d", cxxopts::value<std::string>()->default_value("512"))
        ("layers", "number of layers L", cxxopts::value<std::string>()->default_value("8"))
        ("heads", "attention heads H", cxxopts::value<std::string>()->default_value("8"))
        ("d-ff", "MLP hidden width F", cxxopts::value<std::string>()->default_value("2048"))
        ("max-seq", "context length (soft prompt + prompt + continuation)", cxxopts::value<std::string>()->default_value("512"))
        ("batch", "rows decoding together (the server's max_batch)", cxxopts::value<std::string>()->default_value("16"))
        ("requests", "requests per workload (0 = --batch: one per batch row, so one per tenant at K = --batch)",
            cxxopts::value<std::string>()->default_value("0"))
        ("prompt-min", "shortest prompt (tokens)", cxxopts::value<std::string>()->default_value("8"))
        ("prompt-max", "longest prompt (tokens)", cxxopts::value<std::string>()->default_value("32"))
        ("new-tokens", "tokens generated per request (no stop token)", cxxopts::value<std::string>()->default_value("32"))
        ("tenants", "tenant counts K", cxxopts::value<std::string>()->default_value("1,4,16"))
        ("methods", "methods of the K sweep; mix = tenants cycling the --mix methods",
            cxxopts::value<std::string>()->default_value("prefix-kv,prompt,prefix,lora,mix"))  // method-names: the README's workload, --methods overrides
        ("mix", "methods the mix workload's tenants cycle (each with its default options)",
            cxxopts::value<std::string>()->default_value("prompt,prefix,prefix-kv,lora"))  // method-names: the README's workload, --mix overrides
        ("prefix-len", "n of the K sweep: soft-prompt tokens / prefix vectors per layer", cxxopts::value<std::string>()->default_value("16"))
        ("prefix-lens", "n values of the prefix-cost sweep", cxxopts::value<std::string>()->default_value("0,16,64,256"))
        ("sweep-methods", "methods of the prefix-cost sweep", cxxopts::value<std::string>()->default_value("prompt,prefix,prefix-kv"))  // method-names: the README's sweep, --sweep-methods overrides
        ("prefill-padding", "largest share of padding in one prefill forward before admitted requests are split by "
                            "prompt length (1 = never split)", cxxopts::value<std::string>()->default_value(fmt::format("{}", ServerOptions{}.max_prefill_padding)))
        ("repeats", "interleaved repeats of every measurement (medians are reported)", cxxopts::value<std::string>()->default_value("5"))
        ("threads", "threads for OpenBLAS and OpenMP (0 = all cores)", cxxopts::value<std::string>()->default_value("1"))
        ("clock", "cpu: time by the process's CPU time (not inflated by other processes on a shared machine; "
                  "meaningful with --threads 1), wall: by the wall clock", cxxopts::value<std::string>()->default_value("cpu"))
        ("seed", "seed of the base, the adapters and the prompts", cxxopts::value<std::string>()->default_value("0"))
        ("out", "output directory", cxxopts::value<std::string>()->default_value("runs/serve-bench"));
    // clang-format on
    const cxxopts::ParseResult r = flags::parse(o, argc, argv);
    Args a;
    a.cfg.vocab = int_flag(r, "vocab", 2);
    a.cfg.d_model = int_flag(r, "d-model", 1);
    a.cfg.n_layers = int(int_flag(r, "layers", 1, std::numeric_limits<int>::max()));
    a.cfg.n_heads = int(int_flag(r, "heads", 1, std::numeric_limits<int>::max()));
    a.cfg.d_ff = int_flag(r, "d-ff", 1);
    a.cfg.max_seq = int_flag(r, "max-seq", 2);
    if (r.count("base")) {
        for (const char* dim : {"vocab", "d-model", "layers", "heads", "d-ff", "max-seq"})
            if (r.count(dim))
                throw std::invalid_argument(fmt::format("--{}: the base of --base has its own dimensions", dim));
        a.base_dir = r["base"].as<std::string>();
        a.cfg = load_hf_gpt2_config(a.base_dir);  // errors name the file and key
    }
    try {
        a.cfg.validate();
    } catch (const std::invalid_argument& e) {
        throw std::invalid_argument(fmt::format("model flags: {}", e.what()));
    }
    a.batch = int_flag(r, "batch", 1);
    a.requests = int_flag(r, "requests", 0);
    if (a.requests == 0) a.requests = a.batch;
    a.prompt_min = int_flag(r, "prompt-min", 1);
    a.prompt_max = int_flag(r, "prompt-max", a.prompt_min);
    a.new_tokens = int_flag(r, "new-tokens", 1);
    a.tenants = count_list(r, "tenants", 1);
    a.methods = method_list(r, "methods", true);
    a.prefix_len = int_flag(r, "prefix-len", 0);
    a.prefix_lens = count_list(r, "prefix-lens", 0);
    a.sweep_methods = method_list(r, "sweep-methods", false);
    a.mix = method_list(r, "mix", false);
    a.prefill_padding = flags::real_flag(r, "prefill-padding");
    if (!(a.prefill_padding >= 0.0 && a.prefill_padding <= 1.0))
        throw std::invalid_argument(fmt::format("--prefill-padding: {} is outside [0, 1]", a.prefill_padding));
    a.repeats = int(int_flag(r, "repeats", 1, std::numeric_limits<int>::max()));
    a.threads = int(int_flag(r, "threads", 0, std::numeric_limits<int>::max()));
    a.seed = uint64_t(int_flag(r, "seed", 0));
    const std::string clock = r["clock"].as<std::string>();
    if (clock != "cpu" && clock != "wall")
        throw std::invalid_argument(fmt::format("--clock: '{}' is not cpu or wall", clock));
    a.cpu_clock = clock == "cpu";
    a.out = r["out"].as<std::string>();
    if (a.out.empty()) throw std::invalid_argument("--out: '' is not a directory name");
    const int64_t longest_n = std::max(a.prefix_len, *std::max_element(a.prefix_lens.begin(), a.prefix_lens.end()));
    if (a.prompt_max + longest_n + a.new_tokens > a.cfg.max_seq)
        throw std::invalid_argument(fmt::format(
            "--max-seq: {} is less than --prompt-max {} + the longest prefix {} + --new-tokens {} (prompt tuning "
            "puts its soft tokens in the sequence)",
            a.cfg.max_seq, a.prompt_max, longest_n, a.new_tokens));
    return a;
}

double wall_ms() {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
double cpu_ms() {
    timespec ts{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return double(ts.tv_sec) * 1e3 + double(ts.tv_nsec) / 1e6;
}

// Size of the largest cache level CPU 0 reports, in MB (0 where unknown).
// Read from sysfs: glibc's sysconf(_SC_LEVEL3_CACHE_SIZE) reported 336 MB for
// a 32 MB L3 on an AMD EPYC guest.
double last_level_cache_mb() {
    double best = 0.0;
    for (int i = 0; i < 16; ++i) {
        std::ifstream in(fmt::format("/sys/devices/system/cpu/cpu0/cache/index{}/size", i));
        std::string size;
        if (!(in >> size)) continue;
        const char unit = size.back();
        const double scale = unit == 'K' ? 1e3 * 1.024 : unit == 'M' ? 1e6 * 1.048576 : 1.0;
        const double value = std::atof(size.c_str()) * scale / 1e6;  // "32768K" -> 33.6 MB
        best = std::max(best, value);
    }
    return best;
}

double median(std::vector<double> v) {
    if (v.empty()) return 0.0;
    std::sort(v.begin(), v.end());
    const size_t m = v.size() / 2;
    return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}
double percentile(std::vector<double> v, double p) {
    if (v.empty()) return 0.0;
    std::sort(v.begin(), v.end());
    return v[std::min(v.size() - 1, size_t(p * double(v.size() - 1) + 0.5))];
}

// One served workload: what it produced and how long it took.
struct Run {
    int64_t tokens = 0;
    int64_t requests = 0;
    double seconds = 0.0;
    double prefill_s = 0.0;
    uint64_t flops = 0;  // forward FLOPs while serving (autograd counters)
    std::vector<double> token_ms;
    std::vector<double> request_ms;  // per request: from the workload's start (all requests there) to its last token
    double tokens_per_s() const { return seconds > 0 ? double(tokens) / seconds : 0.0; }
};

// Repeats of one measurement, summarised.
struct Summary {
    double tokens_per_s = 0, ms_per_token = 0, prefill_ms_per_request = 0, p50_ms = 0, p95_ms = 0;
    double request_p50_ms = 0, request_p95_ms = 0;
    double gflops_per_request = 0;
    json to_json() const {
        return {{"tokens_per_s", tokens_per_s},     {"ms_per_token", ms_per_token},
                {"prefill_ms_per_request", prefill_ms_per_request}, {"p50_ms", p50_ms},
                {"p95_ms", p95_ms},                 {"request_p50_ms", request_p50_ms},
                {"request_p95_ms", request_p95_ms}, {"gflops_per_request", gflops_per_request}};
    }
};
Summary summarise(const std::vector<Run>& runs) {
    Summary s;
    std::vector<double> tps, mspt, prefill, lat, req;
    for (const Run& r : runs) {
        tps.push_back(r.tokens_per_s());
        mspt.push_back(1e3 * r.seconds / double(std::max<int64_t>(1, r.tokens)));
        prefill.push_back(1e3 * r.prefill_s / double(std::max<int64_t>(1, r.requests)));
        lat.insert(lat.end(), r.token_ms.begin(), r.token_ms.end());
        req.insert(req.end(), r.request_ms.begin(), r.request_ms.end());
    }
    s.request_p50_ms = percentile(req, 0.5);
    s.request_p95_ms = percentile(req, 0.95);
    s.tokens_per_s = median(tps);
    s.ms_per_token = median(mspt);
    s.prefill_ms_per_request = median(prefill);
    s.p50_ms = percentile(lat, 0.5);
    s.p95_ms = percentile(lat, 0.95);
    s.gflops_per_request = runs.empty() ? 0.0 : double(runs[0].flops) / 1e9 / double(std::max<int64_t>(1, runs[0].requests));
    return s;
}

class Bench {
public:
    Bench(const Args& a)
        : a_(a), base_(a.base_dir.empty() ? std::make_unique<GPT>(a.cfg, a.seed) : load_hf_gpt2(a.base_dir)) {
        Rng rng(a.seed + 1);
        for (int64_t i = 0; i < a.requests; ++i) {
            const int64_t len = a.prompt_min + int64_t(rng.below(uint32_t(a.prompt_max - a.prompt_min + 1)));
            std::vector<int32_t> p;
            for (int64_t j = 0; j < len; ++j) p.push_back(int32_t(rng.below(uint32_t(a.cfg.vocab))));
            prompts_.push_back(p);
        }
        base_->freeze();
    }

    GPT& base() { return *base_; }
    ServerOptions options() const {
        ServerOptions o;
        o.max_batch = a_.batch;
        o.max_prefill_padding = a_.prefill_padding;
        o.clock_ms = a_.cpu_clock ? cpu_ms : wall_ms;
        return o;
    }

    // Method of tenant i in workload `method` ("mix" cycles the --mix methods).
    static std::string tenant_method(const std::vector<std::string>& mix, const std::string& method, int64_t i) {
        return method == "mix" ? mix[size_t(i) % mix.size()] : method;
    }

    // The adapter file of tenant i of `method` with prefix length n: made on
    // first use (random init, every tensor non-zero) and saved.
    std::string adapter_dir(const std::string& method, int64_t n, int64_t i) {
        const std::string dir = fmt::format("{}/adapters/{}-n{}-{}", a_.out, method, n, i);
        if (made_.count(dir)) return dir;
        AdapterOptions o;
        o.n = n;
        o.init = "random";
        o.seed = a_.seed * 1000 + uint64_t(i) + 7;
        if (!a_.base_dir.empty()) o.positions = "hf";  // HF PEFT's convention on a Hugging Face base
        auto adapter = make_adapter(method, o);
        adapter->attach(*base_);
        Rng rng(o.seed + 13);
        for (auto& [name, t] : adapter->parameters()) {
            const std::vector<float> v = t.to_vector();
            if (std::all_of(v.begin(), v.end(), [](float x) { return x == 0.f; }))
                Tensor(t).copy_from(Tensor::normal(t.shape(), rng, 0.f, 0.02f));
        }
        save_adapter(dir, *adapter);
        made_.insert(dir);
        return dir;
    }

    // Requests of the workload; request r goes to tenant tenant_of(r) ("" = base).
    std::vector<Request> requests(const std::function<std::string(int64_t)>& tenant_of) const {
        std::vector<Request> rs;
        for (int64_t r = 0; r < a_.requests; ++r)
            rs.push_back(Request{fmt::format("r{}", r), tenant_of(r), prompts_[size_t(r)], int(a_.new_tokens), -1});
        return rs;
    }

    // A server over tenants t0..t{K-1} of `method` (prefix length n), loaded from their files.
    std::unique_ptr<Server> server(const std::string& method, int64_t n, int64_t K, bool cache) {
        ServerOptions o = options();
        o.prefix_cache = cache;
        auto s = std::make_unique<Server>(*base_, o);
        for (int64_t i = 0; i < K; ++i) s->load_adapter(fmt::format("t{}", i), adapter_dir(tenant_method(a_.mix, method, i), n, i));
        return s;
    }

    // Serves each group of requests in turn (one group: everything at once) and
    // times the whole; every request counts as arrived at the start.
    Run serve(Server& s, const std::vector<std::vector<Request>>& groups,
              const std::function<void(size_t)>& before = {}, const std::function<void(size_t)>& after = {}) {
        Run run;
        s.reset_stats();
        flops::reset();
        auto now = [this] { return a_.cpu_clock ? cpu_ms() : wall_ms(); };
        const double start = now();
        for (size_t g = 0; g < groups.size(); ++g) {
            if (before) before(g);
            for (const Request& r : groups[g]) s.submit(r);
            while (!s.idle())
                for (const Result& r : s.step()) {
                    if (!r.ok()) throw std::runtime_error("serve_bench: " + r.error);
                    run.token_ms.insert(run.token_ms.end(), r.token_ms.begin(), r.token_ms.end());
                    run.request_ms.push_back(now() - start);
                    ++run.requests;
                }
            if (after) after(g);
        }
        run.seconds = (now() - start) / 1e3;
        run.tokens = s.stats().generated_tokens;
        run.prefill_s = s.stats().prefill_s;
        run.flops = flops::totals()[0];
        return run;
    }

private:
    const Args& a_;
    std::unique_ptr<GPT> base_;
    std::vector<std::vector<int32_t>> prompts_;
    std::set<std::string> made_;
};

// A measurement: built (servers, adapters) outside the timing, then run.
struct Measurement {
    std::string key;
    std::function<Run()> run;
};

std::string fmt_rate(double v) { return fmt::format("{:.0f}", v); }
std::string fmt_ms(double v) { return fmt::format("{:.2f}", v); }
std::string fmt_x(double v) { return fmt::format("{:.2f}x", v); }


// Builds every measurement, runs them, writes the run directory.
void run_bench(const Args& a) {
    flags::configure_threads(int64_t(a.threads));  // capped at the cores, with a warning
    fs::create_directories(a.out);
    const auto wall_start = std::chrono::steady_clock::now();
    Bench bench(a);
    const int64_t R = a.requests;

    // ---- the measurements, each a closure; servers are built once, outside the timing ----
    std::vector<Measurement> ms;
    std::vector<std::unique_ptr<Server>> servers;
    auto hold = [&](std::unique_ptr<Server> s) {
        servers.push_back(std::move(s));
        return servers.back().get();
    };
    // The mergeable methods of --methods, each with tenant i's adapter for merging into the base.
    std::vector<std::string> mergeable;
    for (const std::string& m : a.methods)
        if (m != "mix" && make_adapter(m)->mergeable()) mergeable.push_back(m);
    std::map<std::string, std::vector<std::unique_ptr<Adapter>>> merged_adapters;
    // Per method: a batch of one tenant only (the same requests, all for tenant 0; it does not depend on K),
    // then per K the mixed and the sequential workloads, next to each other so that ratios can be taken
    // between runs made close in time.
    for (const std::string& method : a.methods) {
        Server* single = hold(bench.server(method, a.prefix_len, 1, true));
        std::vector<Request> single_reqs = bench.requests([](int64_t) { return std::string("t0"); });
        ms.push_back({fmt::format("k/{}/single", method), [=, &bench] { return bench.serve(*single, {single_reqs}); }});
        for (int64_t K : a.tenants) {
            Server* mixed = hold(bench.server(method, a.prefix_len, K, true));
            std::vector<Request> mixed_reqs = bench.requests([K](int64_t r) { return fmt::format("t{}", r % K); });
            ms.push_back({fmt::format("k/{}/{}/mixed", method, K), [=, &bench] { return bench.serve(*mixed, {mixed_reqs}); }});
            std::vector<std::vector<Request>> per_tenant(static_cast<size_t>(K));
            for (int64_t r = 0; r < R; ++r) per_tenant[size_t(r % K)].push_back(mixed_reqs[size_t(r)]);
            ms.push_back({fmt::format("k/{}/{}/sequential", method, K), [=, &bench] { return bench.serve(*mixed, per_tenant); }});
        }
    }
    // Merged: the base alone, with tenant i's adapter merged in while its requests are served.
    const int64_t K_max = *std::max_element(a.tenants.begin(), a.tenants.end());
    Server* plain = hold(std::make_unique<Server>(bench.base(), bench.options()));
    const std::vector<Request> base_reqs = bench.requests([](int64_t) { return std::string(); });
    for (const std::string& m : mergeable) {
        std::vector<std::unique_ptr<Adapter>>& tenants = merged_adapters[m];
        for (int64_t i = 0; i < K_max; ++i) tenants.push_back(load_adapter(bench.adapter_dir(m, a.prefix_len, i), bench.base()));
        for (int64_t K : a.tenants) {
            std::vector<std::vector<Request>> per_tenant(static_cast<size_t>(K));
            for (int64_t r = 0; r < R; ++r) per_tenant[size_t(r % K)].push_back(base_reqs[size_t(r)]);
            ms.push_back({fmt::format("merged/{}/{}/sequential", m, K), [=, &bench, &tenants] {
                              return bench.serve(
                                  *plain, per_tenant, [&](size_t t) { tenants[t]->merge(); },
                                  [&](size_t t) { tenants[t]->unmerge(); });
                          }});
        }
        ms.push_back({fmt::format("merged/{}/single", m), [=, &bench, &tenants] {
                          return bench.serve(
                              *plain, {base_reqs}, [&](size_t) { tenants[0]->merge(); },
                              [&](size_t) { tenants[0]->unmerge(); });
                      }});
    }
    // How much batching itself buys on this machine: one tenant, batch sizes up to --batch.
    std::vector<int64_t> batch_sizes;
    for (int64_t b = 1; b < a.batch; b *= 2) batch_sizes.push_back(b);
    batch_sizes.push_back(a.batch);
    for (int64_t b : batch_sizes) {
        ServerOptions o = bench.options();
        o.max_batch = b;
        Server* s = hold(std::make_unique<Server>(bench.base(), o));
        s->load_adapter("t0", bench.adapter_dir(Bench::tenant_method(a.mix, a.methods.front(), 0), a.prefix_len, 0));
        std::vector<Request> reqs = bench.requests([](int64_t) { return std::string("t0"); });
        ms.push_back({fmt::format("batch/{}", b), [=, &bench] { return bench.serve(*s, {reqs}); }});
    }
    // Prefix cost: 4 tenants of one method, mixed.
    const int64_t sweep_K = 4;
    for (const std::string& method : a.sweep_methods)
        for (int64_t n : a.prefix_lens)
            for (bool cache : {true, false}) {
                Server* s = hold(bench.server(method, n, sweep_K, cache));
                std::vector<Request> reqs = bench.requests([](int64_t r) { return fmt::format("t{}", r % sweep_K); });
                ms.push_back({fmt::format("n/{}/{}/{}", method, n, cache ? "cache" : "no-cache"),
                              [=, &bench] { return bench.serve(*s, {reqs}); }});
            }

    // ---- run: interleaved repeats, the order rotated each time ----
    std::map<std::string, std::vector<Run>> runs;
    fmt::print("serve_bench: {} measurements x {} repeats, {} threads\n", ms.size(), a.repeats, threads());
    for (int rep = 0; rep < a.repeats; ++rep) {
        const auto t0 = std::chrono::steady_clock::now();
        for (size_t i = 0; i < ms.size(); ++i) {
            const Measurement& m = ms[(i + size_t(rep) * ms.size() / size_t(a.repeats)) % ms.size()];
            runs[m.key].push_back(m.run());
        }
        fmt::print("  repeat {} of {}: {:.1f} s\n", rep + 1, a.repeats,
                   std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::map<std::string, Summary> sum;
    for (auto& [key, rs] : runs) sum[key] = summarise(rs);
    // Median over repeats of the ratio of two measurements' tokens/s within each repeat.
    auto paired_ratio = [&](const std::string& a_key, const std::string& b_key) {
        std::vector<double> ratios;
        for (size_t rep = 0; rep < runs[a_key].size(); ++rep)
            ratios.push_back(runs[a_key][rep].tokens_per_s() / runs[b_key][rep].tokens_per_s());
        return median(ratios);
    };

    // ---- results ----
    json k_sweep = json::array(), per_k = json::array();
    std::string k_table =
        "| method | K | mixed tok/s | single-tenant tok/s | sequential tok/s | mixed / single | mixed / sequential | "
        "token p50 / p95 ms | request p50 / p95 ms | sequential: token p50 / p95 ms | sequential: request p50 / p95 "
        "ms |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    std::vector<harness::Series> k_series;
    for (const std::string& method : a.methods) {
        harness::Series mixed_s{method + " mixed", {}}, seq_s{method + " sequential", {}};
        const std::string single_key = fmt::format("k/{}/single", method);
        const Summary& sg = sum[single_key];
        for (int64_t K : a.tenants) {
            const std::string mixed_key = fmt::format("k/{}/{}/mixed", method, K),
                              seq_key = fmt::format("k/{}/{}/sequential", method, K);
            const Summary &mx = sum[mixed_key], &sq = sum[seq_key];
            const double vs_single = paired_ratio(mixed_key, single_key), vs_seq = paired_ratio(mixed_key, seq_key);
            json e = {{"method", method},
                      {"k", K},
                      {"mixed_tokens_per_s", mx.tokens_per_s},
                      {"single_tenant_tokens_per_s", sg.tokens_per_s},
                      {"sequential_tokens_per_s", sq.tokens_per_s},
                      {"p50_ms", mx.p50_ms},
                      {"p95_ms", mx.p95_ms},
                      {"request_p50_ms", mx.request_p50_ms},
                      {"request_p95_ms", mx.request_p95_ms},
                      {"single_tenant_p50_ms", sg.p50_ms},
                      {"single_tenant_p95_ms", sg.p95_ms},
                      {"sequential_p50_ms", sq.p50_ms},
                      {"sequential_p95_ms", sq.p95_ms},
                      {"sequential_request_p50_ms", sq.request_p50_ms},
                      {"sequential_request_p95_ms", sq.request_p95_ms},
                      {"mixed_over_single", vs_single},
                      {"mixed_over_sequential", vs_seq}};
            k_sweep.push_back(e);
            if (method == a.methods.front()) per_k.push_back(e);
            k_table += fmt::format("| {} | {} | {} | {} | {} | {} | {} | {} / {} | {:.0f} / {:.0f} | {} / {} | {:.0f} / {:.0f} |\n",
                                   method, K, fmt_rate(mx.tokens_per_s), fmt_rate(sg.tokens_per_s),
                                   fmt_rate(sq.tokens_per_s), fmt_x(vs_single), fmt_x(vs_seq), fmt_ms(mx.p50_ms),
                                   fmt_ms(mx.p95_ms), mx.request_p50_ms, mx.request_p95_ms, fmt_ms(sq.p50_ms),
                                   fmt_ms(sq.p95_ms), sq.request_p50_ms, sq.request_p95_ms);
            mixed_s.points.emplace_back(double(K), mx.tokens_per_s);
            seq_s.points.emplace_back(double(K), sq.tokens_per_s);
        }
        k_series.push_back(mixed_s);
        k_series.push_back(seq_s);
    }

    json prefix_sweep = json::array();
    std::string n_table =
        "| method | n | cache: ms/token | cache: prefill ms/request | cache: GFLOP/request | no cache: ms/token | "
        "no cache: prefill ms/request | no cache: GFLOP/request |\n|---|---:|---:|---:|---:|---:|---:|---:|\n";
    std::vector<harness::Series> n_series;
    for (const std::string& method : a.sweep_methods) {
        harness::Series on{method + " cached", {}}, off{method + " uncached", {}};
        for (int64_t n : a.prefix_lens) {
            const Summary& c = sum[fmt::format("n/{}/{}/cache", method, n)];
            const Summary& u = sum[fmt::format("n/{}/{}/no-cache", method, n)];
            prefix_sweep.push_back({{"method", method}, {"n", n}, {"cache", c.to_json()}, {"no_cache", u.to_json()}});
            n_table += fmt::format("| {} | {} | {} | {} | {:.3f} | {} | {} | {:.3f} |\n", method, n, fmt_ms(c.ms_per_token),
                                   fmt_ms(c.prefill_ms_per_request), c.gflops_per_request, fmt_ms(u.ms_per_token),
                                   fmt_ms(u.prefill_ms_per_request), u.gflops_per_request);
            on.points.emplace_back(double(std::max<int64_t>(n, 1)), c.ms_per_token);
            off.points.emplace_back(double(std::max<int64_t>(n, 1)), u.ms_per_token);
        }
        n_series.push_back(on);
        n_series.push_back(off);
    }

    // Per mergeable method: unmerged (mixed and sequential) against merged, one tenant at a time.
    json merged = json::array();
    std::string merged_tables;
    for (const std::string& m : mergeable) {
        json per_k = json::array();
        std::string table = fmt::format("| K | {0} unmerged mixed tok/s | {0} unmerged sequential tok/s | {0} merged "
                                        "sequential tok/s (merge, serve, unmerge per tenant) |\n|---:|---:|---:|---:|\n",
                                        m);
        for (int64_t K : a.tenants) {
            const Summary& mg = sum[fmt::format("merged/{}/{}/sequential", m, K)];
            const double mixed = sum[fmt::format("k/{}/{}/mixed", m, K)].tokens_per_s,
                         seq = sum[fmt::format("k/{}/{}/sequential", m, K)].tokens_per_s;
            per_k.push_back({{"k", K},
                             {"merged_sequential_tokens_per_s", mg.tokens_per_s},
                             {"unmerged_mixed_tokens_per_s", mixed},
                             {"unmerged_sequential_tokens_per_s", seq}});
            table += fmt::format("| {} | {} | {} | {} |\n", K, fmt_rate(mixed), fmt_rate(seq), fmt_rate(mg.tokens_per_s));
        }
        const Summary &ms1 = sum[fmt::format("merged/{}/single", m)], &us1 = sum[fmt::format("k/{}/single", m)];
        merged.push_back({{"method", m}, {"per_k", per_k}, {"merged_single_tokens_per_s", ms1.tokens_per_s},
                          {"unmerged_single_tokens_per_s", us1.tokens_per_s}});
        merged_tables += fmt::format("### {}\n\n{}\nOne tenant, all {} requests: merged {} tok/s (p50 {} ms), unmerged "
                                     "{} tok/s (p50 {} ms).\n\n",
                                     m, table, R, fmt_rate(ms1.tokens_per_s), fmt_ms(ms1.p50_ms),
                                     fmt_rate(us1.tokens_per_s), fmt_ms(us1.p50_ms));
    }
    if (mergeable.empty()) merged_tables = "No method of --methods can be merged into the base.\n\n";

    // ---- targets and conclusion ----
    json targets = json::array();
    std::string target_lines;
    for (const std::string& method : a.methods) {
        const std::string mixed_key = fmt::format("k/{}/{}/mixed", method, K_max);
        const double vs_single = paired_ratio(mixed_key, fmt::format("k/{}/single", method));
        const double vs_seq = paired_ratio(mixed_key, fmt::format("k/{}/{}/sequential", method, K_max));
        const bool ok_single = vs_single >= 0.9, ok_seq = vs_seq >= 4.0;
        targets.push_back({{"method", method}, {"k", K_max}, {"mixed_over_single", vs_single},
                           {"mixed_over_sequential", vs_seq}, {"holds_0_9x_single", ok_single},
                           {"holds_4x_sequential", ok_seq}});
        target_lines += fmt::format("- {}: K = {} mixed is {} of single-tenant ({}: >= 0.9x) and {} of sequential ({}: >= 4x)\n",
                                    method, K_max, fmt_x(vs_single), ok_single ? "holds" : "MISSED", fmt_x(vs_seq),
                                    ok_seq ? "holds" : "MISSED");
    }
    // Batching curve.
    json batch_curve = json::array();
    std::string batch_table = "| batch | tok/s | ms/token |\n|---:|---:|---:|\n";
    for (int64_t b : batch_sizes) {
        const Summary& bs = sum[fmt::format("batch/{}", b)];
        batch_curve.push_back({{"batch", b}, {"tokens_per_s", bs.tokens_per_s}, {"ms_per_token", bs.ms_per_token}});
        batch_table += fmt::format("| {} | {} | {} |\n", b, fmt_rate(bs.tokens_per_s), fmt_ms(bs.ms_per_token));
    }
    const double batching_gain =
        sum[fmt::format("batch/{}", a.batch)].tokens_per_s / sum["batch/1"].tokens_per_s;

    // Conclusion, from the numbers: the mixable method with the lowest p95 at the largest K, and the
    // costs that qualify it.
    auto has = [](const std::vector<std::string>& list, const std::string& m) {
        return std::find(list.begin(), list.end(), m) != list.end();
    };
    std::string best, others;
    double best_p95 = 1e30;
    for (const std::string& method : a.methods) {
        if (method == "mix") continue;
        const double p95 = sum[fmt::format("k/{}/{}/mixed", method, K_max)].p95_ms;
        if (p95 < best_p95) best_p95 = p95, best = method;
    }
    for (const std::string& method : a.methods)
        if (method != "mix" && method != best)
            others += fmt::format("{}{} {} ms", others.empty() ? "" : ", ", method,
                                  fmt_ms(sum[fmt::format("k/{}/{}/mixed", method, K_max)].p95_ms));
    std::string conclusion;
    if (!best.empty()) {
        const Summary& b = sum[fmt::format("k/{}/{}/mixed", best, K_max)];
        conclusion += fmt::format(
            "- **{}** has the lowest per-token latency with {} tenants in one batch: p50 {} ms, p95 {} ms (others, "
            "p95: {}), at {} the throughput of a single-tenant batch.\n",
            best, K_max, fmt_ms(b.p50_ms), fmt_ms(b.p95_ms), others.empty() ? "none measured" : others,
            fmt_x(paired_ratio(fmt::format("k/{}/{}/mixed", best, K_max), fmt::format("k/{}/single", best))));
    }
    auto n_cost = [&](const std::string& method, int64_t n, bool cache) -> const Summary& {
        return sum[fmt::format("n/{}/{}/{}", method, n, cache ? "cache" : "no-cache")];
    };
    const int64_t n_max = *std::max_element(a.prefix_lens.begin(), a.prefix_lens.end());
    const int64_t n_min = *std::min_element(a.prefix_lens.begin(), a.prefix_lens.end());
    {
        // Cached, every method of the sweep is n keys and values per layer; uncached, a method whose virtual
        // tokens enter at the input runs them through every layer in every prefill.
        std::string cached, uncached;
        for (const std::string& m : a.sweep_methods) {
            const Summary &c = n_cost(m, n_max, true), &u = n_cost(m, n_max, false);
            cached += fmt::format("{}{} {} ms/token, {:.3f} GFLOP/request", cached.empty() ? "" : "; ", m,
                                  fmt_ms(c.ms_per_token), c.gflops_per_request);
            uncached += fmt::format("{}{} {:.3f} GFLOP and {} ms of prefill per request against {} ms cached",
                                    uncached.empty() ? "" : "; ", m, u.gflops_per_request,
                                    fmt_ms(u.prefill_ms_per_request), fmt_ms(c.prefill_ms_per_request));
        }
        conclusion += fmt::format(
            "- At inference with the prefix cache (n = {}): {}. Without it: {}. A method whose uncached prefill "
            "costs more recomputes its virtual tokens per request and is only competitive when served with the "
            "cache.\n",
            n_max, cached, uncached);
        const std::string& m = a.sweep_methods.front();
        const Summary &c0 = n_cost(m, n_min, true), &c1 = n_cost(m, n_max, true);
        conclusion += fmt::format(
            "- Even cached, a prefix is paid by every decoded token: from n = {} to n = {} {} goes from {} to {} "
            "ms/token ({:.2f}x) while its FLOPs per request grow only {:.0f}%: the keys and values are read (and the "
            "KV cache copied) at every step. For a latency-critical service keep n small.\n",
            n_min, n_max, m, fmt_ms(c0.ms_per_token), fmt_ms(c1.ms_per_token), c1.ms_per_token / c0.ms_per_token,
            100.0 * (c1.gflops_per_request / c0.gflops_per_request - 1.0));
    }
    for (const std::string& m : mergeable) {
        const double unmerged = sum[fmt::format("k/{}/single", m)].tokens_per_s,
                     merged_rate = sum[fmt::format("merged/{}/single", m)].tokens_per_s;
        conclusion += fmt::format(
            "- {0} merged serves one tenant at {1} tok/s against {2} unmerged ({3:+.0f}%: no extra path), but cannot "
            "mix tenants: {4} tenants served by merging each in turn give {5} tok/s against {6} for unmerged {0} in "
            "one mixed batch.\n",
            m, fmt_rate(merged_rate), fmt_rate(unmerged), 100.0 * (merged_rate / unmerged - 1.0), K_max,
            fmt_rate(sum[fmt::format("merged/{}/{}/sequential", m, K_max)].tokens_per_s),
            fmt_rate(sum[fmt::format("k/{}/{}/mixed", m, K_max)].tokens_per_s));
    }
    {
        const std::string& m = a.methods.front();
        const Summary &mx = sum[fmt::format("k/{}/{}/mixed", m, K_max)], &sq = sum[fmt::format("k/{}/{}/sequential", m, K_max)];
        conclusion += fmt::format(
            "- Mixing against serving tenants one after another ({}, K = {}): a mixed step decodes {} rows, so each "
            "token waits longer (p50 {} ms against {} ms in a tenant's own small batch), but no tenant waits for the "
            "others: requests complete at p50 {:.0f} ms / p95 {:.0f} ms against {:.0f} / {:.0f} ms served tenant by "
            "tenant. The throughput gain is bounded by what batching buys on this machine: one tenant's batch of {} "
            "rows gives {} the tokens/s of one row at a time (table above): a step reads the weights once for all "
            "its rows, until their arithmetic bounds it instead (on a GPU, only at hundreds of rows).\n",
            m, K_max, a.batch, fmt_ms(mx.p50_ms), fmt_ms(sq.p50_ms), mx.request_p50_ms, mx.request_p95_ms,
            sq.request_p50_ms, sq.request_p95_ms, a.batch, fmt_x(batching_gain));
    }
    if (!best.empty()) {
        // Once cached, the methods that add keys to the attention (virtual tokens, prefixes) are one
        // computation (n keys and values per layer): their differences here are noise, so they are named together.
        std::vector<std::string> prefix_family;
        for (const std::string& m : a.methods) {
            if (m == "mix") continue;
            const std::unique_ptr<Adapter> ad = make_adapter(m);
            int64_t keys = 0;
            for (int l = 0; l < a.cfg.n_layers; ++l) keys += ad->cost_decode_keys(l, a.cfg);
            if (keys > 0) prefix_family.push_back(m);
        }
        std::string name = fmt::format("**{}**", best), family_p95;
        if (has(prefix_family, best)) {
            std::vector<std::string> members;
            for (const std::string& m : prefix_family)
                if (has(a.methods, m)) {
                    members.push_back(m);
                    family_p95 += fmt::format("{}{} {}", family_p95.empty() ? "" : ", ", m,
                                              fmt_ms(sum[fmt::format("k/{}/{}/mixed", m, K_max)].p95_ms));
                }
            if (members.size() > 1)
                name = fmt::format("**a prefix method ({})**: served from the prefix cache they are the same "
                                   "computation (p95 at K = {}: {} ms)",
                                   fmt::join(members, ", "), K_max, family_p95);
        }
        conclusion += fmt::format(
            "\n**Answer.** For a latency-critical multi-task service: {}, with a short prefix, in mixed batches. All "
            "tenants share every decoding step at {} of single-tenant throughput, a request pays for its adapter only "
            "in attention over n cached keys, and nothing adapter-specific is recomputed per request or per step.",
            name, fmt_x(paired_ratio(fmt::format("k/{}/{}/mixed", best, K_max), fmt::format("k/{}/single", best))));
        for (const std::string& m : mergeable)
            if (m != best)
                conclusion += fmt::format(
                    " {} mixes as well but runs its extra path per tenant group on every token ({} of single-tenant "
                    "throughput, p95 {} ms at K = {}); merged it is the fastest single tenant but serves tenants one "
                    "at a time.",
                    m, fmt_x(paired_ratio(fmt::format("k/{}/{}/mixed", m, K_max), fmt::format("k/{}/single", m))),
                    fmt_ms(sum[fmt::format("k/{}/{}/mixed", m, K_max)].p95_ms), K_max);
        conclusion += " Long prefixes erode the advantage: every decoded token attends to all n.\n";
    }

    // Where the weights live while decoding: in the last-level cache or in memory.
    const int64_t n_params = bench.base().num_params();
    const double weights_mb = double(n_params) * double(sizeof(float)) / 1e6;
    const double llc_mb = last_level_cache_mb();

    // Every measurement's tokens/s in each repeat, to judge the noise behind the medians.
    json repeats_tps = json::object();
    for (auto& [key, rs] : runs)
        for (const Run& r : rs) repeats_tps[key].push_back(r.tokens_per_s());
    json results = {
        {"experiment", "serve-bench"},
        {"model", a.cfg.to_json()},
        {"parameters", n_params},
        {"weights_mb", weights_mb},
        {"last_level_cache_mb", llc_mb},
        {"adapters", "randomly initialised, every tensor non-zero; saved as adapter files and loaded by the server"},
        {"settings",
         {{"batch", a.batch}, {"requests", R}, {"prompt_tokens", {a.prompt_min, a.prompt_max}},
          {"new_tokens", a.new_tokens}, {"prefix_len", a.prefix_len}, {"mix", a.mix},
          {"repeats", a.repeats}, {"threads", threads()}, {"clock", a.cpu_clock ? "cpu" : "wall"}, {"seed", a.seed}, {"prefix_sweep_tenants", sweep_K}}},
        {"per_k", per_k},
        {"per_k_method", a.methods.front()},
        {"k_sweep", k_sweep},
        {"prefix_sweep", prefix_sweep},
        {"merged", merged},
        {"batch_curve", batch_curve},
        {"repeats_tokens_per_s", repeats_tps},
        {"targets", targets},
    };
    write_file_atomic(a.out + "/results.json", results.dump(2) + "\n");
    harness::plot_png(a.out + "/throughput.png", "serve-bench: tokens/s against tenants K", "K (tenants)", "tokens/s",
                      k_series, true);
    harness::plot_png(a.out + "/prefix_cost.png", "serve-bench: ms per generated token against prefix length",
                      "n (prefix vectors; 0 drawn at 1)", "ms/token", n_series, true);

    const double minutes = std::chrono::duration<double>(std::chrono::steady_clock::now() - wall_start).count() / 60.0;
    const std::string regime = fmt::format(
        "The base has {:.1f}M parameters, {:.1f} MB of float32 weights, against {} of last-level cache here: {}. "
        "Workload: request r goes to tenant r mod K, so with K = {} (the batch size) and {} requests each tenant has "
        "{} request{} (--requests sets it).\n\n",
        double(n_params) / 1e6, weights_mb, llc_mb > 0 ? fmt::format("{:.0f} MB", llc_mb) : std::string("an unknown size"),
        llc_mb > 0 && weights_mb < llc_mb
            ? "the weights fit in the cache, so a decoding step is bound by arithmetic from a few rows on and batching "
              "(mixing tenants included) buys less than it does for a served language model, whose weights stream "
              "from memory"
            : "a decoding step streams the weights from memory, as it does for any served language model: one row "
              "reads them all for one token, a batch of rows for one token each",
        a.batch, R, std::max<int64_t>(1, R / a.batch), R > a.batch ? "s" : "");
    std::string md = fmt::format(
        "# serve-bench\n\nOne frozen base (d {}, {} layers, {} heads, F {}, V {}, max_seq {}), adapters randomly "
        "initialised with every tensor non-zero (throughput does not depend on what they learned), saved as adapter "
        "files and loaded by the server. {} requests per workload, prompts of {}-{} tokens, {} new tokens each (no stop "
        "token), greedy, batch of {} rows with continuous batching; n = {} for the K sweep (every method with its default options; mix: {}). Threads: "
        "{}. {}. Every number is the median of {} interleaved repeats (ratios: the median of per-repeat ratios; "
        "latency percentiles pool all repeats; results.json keeps every repeat). Run took {:.1f} min.\n\n"
        "Mixed: one server with K tenants, request r going to tenant r mod K, all tenants in every forward. "
        "Single-tenant: the same requests all for one tenant. Sequential: the same requests, tenant by tenant "
        "(each tenant's requests batched together), as a server holding one adapter at a time must. Per-token "
        "latency: time from a request's previous token (first token: from admission, its prefill).\n\n{}"
        "## Throughput and latency against K\n\n{}\n![throughput](throughput.png)\n\n## Targets (K = {})\n\n{}\n"
        "## Cost against prefix length ({} tenants mixed)\n\n{}\n![prefix cost](prefix_cost.png)\n\n"
        "## Mergeable methods: unmerged against merged\n\n{}## Batching on this machine (one tenant)\n\n{}\n"
        "## Conclusion\n\n{}",
        a.cfg.d_model, a.cfg.n_layers, a.cfg.n_heads, a.cfg.d_ff, a.cfg.vocab, a.cfg.max_seq, R, a.prompt_min,
        a.prompt_max, a.new_tokens, a.batch, a.prefix_len, fmt::join(a.mix, ", "), threads(),
        a.cpu_clock ? "Times are the serving process's CPU time (--clock cpu), which other processes on a shared "
                      "machine do not inflate (their cache and memory traffic still can)"
                    : "Times are wall-clock (--clock wall)",
        a.repeats, minutes, regime, k_table, K_max,
        target_lines, sweep_K, n_table, merged_tables, batch_table, conclusion);
    write_file_atomic(a.out + "/report.md", md);
    fmt::print("\n{}\n{}\n{}\nwrote {}/report.md, results.json, throughput.png, prefix_cost.png ({:.1f} min)\n", k_table,
               target_lines, n_table, a.out, minutes);
}

}  // namespace

int main(int argc, char** argv) {
    Args a;
    try {
        a = parse_args(argc, argv);
    } catch (const std::exception& e) {
        fmt::print(stderr, "serve_bench: {}\n", e.what());
        return 2;
    }
    try {
        run_bench(a);
    } catch (const std::exception& e) {
        fmt::print(stderr, "serve_bench: {}\n", e.what());
        return 1;
    }
    return 0;
}
