// serve-load: the multi-tenant server under a bounded load, in-process
// (experiments/lib/serve_load.h): thousands of requests from many tenants, a
// share of them bad, one tenant removed while its requests are queued. Prints
// the counts, RSS at start and end, and writes <out>/results.json. Exits 1 if
// any good request's tokens differ from serving it alone, any bad request lacks
// its own error, or the run does not finish within its budget.
//
//   make serve-load ARGS="--requests 5000 --tenants 24"
#include <cstdio>
#include <filesystem>

#include <fmt/format.h>

#include "autograd/threads.h"
#include "experiments/lib/flags.h"
#include "experiments/lib/serve_load.h"
#include "nn/safetensors.h"

using namespace peftlab;

int main(int argc, char** argv) {
    cxxopts::Options o("serve_load", "the multi-tenant server under a bounded load with bad requests");
    // clang-format off
    o.add_options()
        ("h,help", "print this help")
        ("requests", "requests in all", cxxopts::value<std::string>()->default_value("5000"))
        ("tenants", "adapters served", cxxopts::value<std::string>()->default_value("24"))
        ("bad-share", "share of bad requests, in [0, 1]", cxxopts::value<std::string>()->default_value("0.2"))
        ("max-batch", "rows decoding together", cxxopts::value<std::string>()->default_value("16"))
        ("seed", "random seed", cxxopts::value<std::string>()->default_value("1"))
        ("max-seconds", "time budget of the whole run", cxxopts::value<std::string>()->default_value("600"))
        ("threads", "threads (0 = all cores)", cxxopts::value<std::string>()->default_value("1"))
        ("out", "output directory", cxxopts::value<std::string>()->default_value("runs/serve-load"));
    // clang-format on
    harness::LoadSpec spec;
    std::string out;
    try {
        const cxxopts::ParseResult r = flags::parse(o, argc, argv);
        spec.requests = flags::int_flag(r, "requests", 1);
        spec.tenants = int(flags::int_flag(r, "tenants", 1, std::numeric_limits<int>::max()));
        spec.bad_share = flags::real_flag(r, "bad-share");
        spec.max_batch = flags::int_flag(r, "max-batch", 1);
        spec.seed = uint64_t(flags::int_flag(r, "seed", 0));
        spec.max_seconds = flags::real_flag(r, "max-seconds");
        flags::configure_threads(flags::int_flag(r, "threads", 0));  // capped at the cores, with a warning
        out = r["out"].as<std::string>();
        if (!(spec.bad_share >= 0 && spec.bad_share <= 1))
            throw std::invalid_argument(fmt::format("--bad-share: {} is outside [0, 1]", spec.bad_share));
    } catch (const std::exception& e) {
        fmt::print(stderr, "serve_load: {}\n(see --help)\n", e.what());
        return 2;
    }
    const int64_t rss_before = harness::rss_kb();
    const harness::LoadReport rep = harness::run_serve_load(spec);
    fmt::print("serve-load: {} requests ({} good, {} bad; {} of the removed tenant while queued), {} tenants, "
               "max_batch {}\n",
               rep.good + rep.bad, rep.good, rep.bad, rep.removed_while_queued, spec.tenants, spec.max_batch);
    fmt::print("  good requests with the tokens they get alone: {} / {}\n", rep.good_exact, rep.good);
    fmt::print("  bad requests refused with their own error:   {} / {}\n", rep.bad_own_error, rep.bad);
    fmt::print("  {} steps, {} tokens generated in {:.2f} s ({:.0f} tokens/s)\n", rep.steps, rep.generated_tokens,
               rep.serve_seconds, double(rep.generated_tokens) / std::max(rep.serve_seconds, 1e-9));
    fmt::print("  RSS: {} KB before setup, {} KB after the first wave, {} KB at the end ({:+} KB)\n", rss_before,
               rep.rss_start_kb, rep.rss_end_kb, rep.rss_end_kb - rep.rss_start_kb);
    for (const std::string& f : rep.failures) fmt::print("  FAIL {}\n", f);
    std::filesystem::create_directories(out);
    nlohmann::json j = rep.to_json();
    j["spec"] = {{"requests", spec.requests}, {"tenants", spec.tenants}, {"bad_share", spec.bad_share},
                 {"max_batch", spec.max_batch}, {"seed", spec.seed}};
    j["rss_before_setup_kb"] = rss_before;
    write_file_atomic(out + "/results.json", j.dump(2) + "\n");
    fmt::print("{}\n", rep.passed() ? "PASS" : "FAIL");
    return rep.passed() ? 0 : 1;
}
