#include "experiments/lib/serve_load.h"

#include <chrono>
#include <cstdio>
#include <memory>
#include <stdexcept>

#include <fmt/format.h>
#include <unistd.h>

#include "autograd/rng.h"
#include "nn/gpt.h"
#include "peft/registry.h"
#include "peft/serve.h"

namespace peftlab::harness {

namespace {

// What makes a request bad, and the words its error must contain.
struct BadKind {
    const char* what;
    const char* error;
};
constexpr BadKind kBad[] = {
    {"unknown tenant", "unknown adapter 'nobody'"},
    {"empty prompt", "empty prompt"},
    {"over-long prompt", "exceeds max_seq"},
    {"out-of-range token id", "is outside the vocabulary"},
    {"negative max_new_tokens", "max_new_tokens = -3 must be >= 0"},
    {"out-of-range stop token", "stop_token = "},
    {"removed tenant", "adapter 'doomed' was removed"},
};
constexpr int kRemovedKind = 6;

struct Planned {
    peft::Request request;
    int bad = -1;  // index into kBad, -1: good
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int64_t rss_kb() {
    long pages = 0, resident = 0;
    if (std::FILE* f = std::fopen("/proc/self/statm", "r")) {
        if (std::fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
        std::fclose(f);
    }
    return int64_t(resident) * ::sysconf(_SC_PAGESIZE) / 1024;
}

nlohmann::json LoadReport::to_json() const {
    return {{"good", good},
            {"bad", bad},
            {"good_exact", good_exact},
            {"bad_own_error", bad_own_error},
            {"removed_while_queued", removed_while_queued},
            {"steps", steps},
            {"generated_tokens", generated_tokens},
            {"serve_seconds", serve_seconds},
            {"rss_start_kb", rss_start_kb},
            {"rss_end_kb", rss_end_kb},
            {"failures", failures},
            {"passed", passed()}};
}

LoadReport run_serve_load(const LoadSpec& spec) {
    if (spec.tenants < 1) throw std::invalid_argument(fmt::format("LoadSpec: tenants = {} must be >= 1", spec.tenants));
    if (spec.requests < 1)
        throw std::invalid_argument(fmt::format("LoadSpec: requests = {} must be >= 1", spec.requests));
    if (!(spec.bad_share >= 0 && spec.bad_share <= 1))
        throw std::invalid_argument(fmt::format("LoadSpec: bad_share = {} is outside [0, 1]", spec.bad_share));
    if (spec.wave < 1) throw std::invalid_argument(fmt::format("LoadSpec: wave = {} must be >= 1", spec.wave));
    const auto t_start = std::chrono::steady_clock::now();

    GPTConfig cfg;
    cfg.vocab = 64, cfg.d_model = 32, cfg.n_layers = 2, cfg.n_heads = 4, cfg.d_ff = 64, cfg.max_seq = 32;
    GPT base(cfg, spec.seed);
    Rng rng(spec.seed * 7919 + 1);

    // Tenants, each moved away from its initialisation so that they differ,
    // plus "doomed", removed while its requests are queued.
    // Every registered method a Server with its default prefix cache can mix:
    // not one that trains the base, nor one whose prefix sits inside the prompt.
    std::vector<std::string> methods;
    for (const std::string& m : peft::method_names()) {
        auto probe = peft::make_adapter(m);
        if (probe->changes_base()) continue;
        probe->attach(base);
        if (!peft::places_prefix_inside_prompt(*probe)) methods.push_back(m);
    }
    std::vector<std::unique_ptr<peft::Adapter>> adapters;
    std::vector<std::string> names;
    for (int i = 0; i <= spec.tenants; ++i) {
        peft::AdapterOptions o;
        o.n = 2 + i % 4, o.seed = uint64_t(i), o.init = "random";
        auto a = peft::make_adapter(methods[size_t(i) % methods.size()], o);
        a->attach(base);
        for (auto& [name, t] : a->parameters()) {
            Tensor w = t;
            for (int64_t k = 0; k < w.numel(); ++k) w.data()[k] += 0.2f * (rng.uniform() - 0.5f);
        }
        adapters.push_back(std::move(a));
        names.push_back(i == spec.tenants ? "doomed" : fmt::format("t{}", i));
    }
    peft::ServerOptions so;
    so.max_batch = spec.max_batch;
    peft::Server server(base, so), alone(base, so);
    for (size_t i = 0; i < adapters.size(); ++i) {
        server.add_adapter(names[i], *adapters[i]);
        alone.add_adapter(names[i], *adapters[i]);
    }

    // The plan: 4 good requests of "doomed" first (admitted before it is removed:
    // they must finish), then the rest; a request of "doomed" after those is bad.
    auto good_request = [&](const std::string& tenant) {
        peft::Request r;
        r.adapter = tenant;
        const int64_t len = 1 + int64_t(rng.below(10));
        for (int64_t k = 0; k < len; ++k) r.prompt.push_back(int32_t(rng.below(uint32_t(cfg.vocab))));
        r.max_new_tokens = 1 + int(rng.below(8));
        r.stop_token = rng.below(4) == 0 ? int32_t(rng.below(uint32_t(cfg.vocab))) : -1;
        return r;
    };
    std::vector<Planned> plan;
    for (int k = 0; k < 4; ++k) plan.push_back({good_request("doomed"), -1});
    while (int64_t(plan.size()) < spec.requests) {
        const uint32_t pick = rng.below(uint32_t(spec.tenants) + 1);
        Planned p{good_request(pick == uint32_t(spec.tenants) ? std::string() : names[pick]), -1};
        if (rng.uniform() < spec.bad_share) {
            p.bad = int(rng.below(uint32_t(std::size(kBad))));
            peft::Request& r = p.request;
            switch (p.bad) {
                case 0: r.adapter = "nobody"; break;
                case 1: r.prompt.clear(); break;
                case 2: r.prompt.assign(size_t(cfg.max_seq), 1); break;
                case 3: r.prompt[rng.below(uint32_t(r.prompt.size()))] = rng.below(2) ? -1 : int32_t(cfg.vocab); break;
                case 4: r.max_new_tokens = -3; break;
                case 5: r.stop_token = int32_t(cfg.vocab) + 5; break;
                case kRemovedKind: r.adapter = "doomed"; break;
            }
        }
        plan.push_back(std::move(p));
    }
    for (size_t i = 0; i < plan.size(); ++i) plan[i].request.id = fmt::format("r{}", i);

    LoadReport rep;
    // Each result is checked as it arrives (its served-alone reference run
    // then), so that nothing accumulates but the plan, allocated up front:
    // RSS growth over the run is the server's.
    std::vector<bool> done(plan.size(), false);
    size_t submitted = 0;
    int64_t finished = 0;
    double alone_seconds = 0;
    auto fail = [&](const std::string& what) {
        if (rep.failures.size() < 10) rep.failures.push_back(what);
    };
    auto check = [&](const peft::Result& r) {
        if (r.seq >= plan.size() || done[r.seq]) {  // seq is the submission order, i.e. the plan index
            fail(fmt::format("request {}: unexpected or repeated result", r.id));
            return;
        }
        done[r.seq] = true;
        ++finished;
        const Planned& p = plan[r.seq];
        if (p.bad < 0) {
            ++rep.good;
            if (!r.ok()) return fail(fmt::format("request {}: good request refused: {}", r.id, r.error));
            const auto t0 = std::chrono::steady_clock::now();
            const peft::Result ref = alone.run({p.request}).at(0);
            alone_seconds += seconds_since(t0);
            if (ref.tokens == r.tokens) ++rep.good_exact;
            else fail(fmt::format("request {}: tokens differ from the request served alone ({} vs {} tokens)", r.id,
                                  r.tokens.size(), ref.tokens.size()));
        } else {
            ++rep.bad;
            if (p.bad == kRemovedKind) ++rep.removed_while_queued;
            if (!r.ok() && r.tokens.empty() && r.error.find(kBad[p.bad].error) != std::string::npos &&
                r.error.find("'" + p.request.id + "'") != std::string::npos)
                ++rep.bad_own_error;
            else fail(fmt::format("request {} ({}): expected an error with \"{}\", got \"{}\"", r.id,
                                  kBad[p.bad].what, kBad[p.bad].error, r.error));
        }
    };
    auto submit = [&](size_t n) {
        for (size_t k = 0; k < n && submitted < plan.size(); ++k, ++submitted) server.submit(plan[submitted].request);
    };
    auto step = [&] {
        for (const peft::Result& r : server.step()) check(r);
        ++rep.steps;
    };

    const auto t_serve = std::chrono::steady_clock::now();
    submit(4);
    step();  // admits the 4 requests of "doomed"
    submit(size_t(spec.wave));
    server.remove_adapter("doomed");
    // Bounded: every step emits a token for every running row or refuses or
    // admits something, so idle comes within (requests * (max_new + 1)) steps.
    const int64_t max_steps = spec.requests * 10 + 100;
    bool rss_taken = false;
    while (!(submitted == plan.size() && server.idle())) {
        for (int k = 0; k < 4 && !server.idle(); ++k) step();
        if (!rss_taken && finished >= int64_t(std::min<size_t>(plan.size(), size_t(spec.wave) + 4))) {
            rep.rss_start_kb = rss_kb();
            rss_taken = true;
        }
        submit(size_t(spec.wave));
        if (rep.steps > max_steps || seconds_since(t_start) > spec.max_seconds) {
            fail(fmt::format("no progress: {} steps, {:.0f} s, {} of {} requests finished", rep.steps,
                             seconds_since(t_start), finished, plan.size()));
            return rep;
        }
    }
    rep.serve_seconds = seconds_since(t_serve) - alone_seconds;
    rep.rss_end_kb = rss_kb();
    if (!rss_taken) rep.rss_start_kb = rep.rss_end_kb;
    rep.generated_tokens = server.stats().generated_tokens;
    for (size_t i = 0; i < plan.size(); ++i)
        if (!done[i]) fail(fmt::format("request {}: never answered", plan[i].request.id));
    return rep;
}

}  // namespace peftlab::harness
