#pragma once
// A bounded load test of the multi-tenant server (peft/serve.h), in-process:
// many requests from many tenants, a share of them bad, submitted in waves
// while the server steps, one tenant removed while its requests are queued.
// Checks that every good request gets exactly the tokens it gets when served
// alone, that every bad one gets its own error, and that the run ends (no
// deadlock: a step budget and a wall-time budget); reports RSS at the start
// and end of the run. Used by `make serve-load` (experiments/serve_load.cpp)
// and, small, by tests/test_serve_load.cpp.
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace peftlab::harness {

struct LoadSpec {
    int tenants = 12;           // adapters served (methods cycled: lora, prompt, prefix-kv, prefix, bitfit)
    int64_t requests = 2000;    // in all, good and bad
    double bad_share = 0.2;     // of requests that are bad, in [0, 1]
    int64_t max_batch = 16;     // ServerOptions::max_batch
    int64_t wave = 64;          // requests submitted per wave; the server steps 4 times between waves
    uint64_t seed = 1;
    double max_seconds = 600;   // the whole run, references included; past it the run fails
};

struct LoadReport {
    int64_t good = 0, bad = 0;
    int64_t good_exact = 0;     // good requests whose tokens equal their served-alone tokens
    int64_t bad_own_error = 0;  // bad requests refused with the error of their kind
    int64_t removed_while_queued = 0;  // bad requests of the removed tenant
    int64_t steps = 0, generated_tokens = 0;
    double serve_seconds = 0;   // the load run alone (not the served-alone references)
    int64_t rss_start_kb = 0;   // after the first wave has finished
    int64_t rss_end_kb = 0;     // after the last request has finished
    std::vector<std::string> failures;  // the first few problems, readable
    bool passed() const { return failures.empty() && good_exact == good && bad_own_error == bad; }
    nlohmann::json to_json() const;
};

// Throws std::invalid_argument naming a bad field of `spec`.
LoadReport run_serve_load(const LoadSpec& spec);

// Resident set size of this process in KB (/proc/self/statm).
int64_t rss_kb();

}  // namespace peftlab::harness
