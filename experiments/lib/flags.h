#pragma once
// Command-line flags of the experiment binaries that parse their own options
// (harness::parse_or_exit, for the ones built on CommonArgs, uses parse too),
// and the process set-up every experiment binary shares (threads, OpenMP's
// wait policy).
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

namespace peftlab::flags {

// Parses argv: --help prints the options (then `epilog`, when given) and
// exits 0; a positional argument throws std::invalid_argument naming it.
cxxopts::ParseResult parse(cxxopts::Options& o, int argc, char** argv, const std::string& epilog = "");

// The items of a comma-separated list ("a,b,,c" -> a, b, c: empty items are
// skipped). Commas inside a JSON array, object or string are part of the
// item: "lora:target_modules=[\"fc\",\"proj\"],full" -> 2 items. An unclosed
// bracket or quote runs to the end. The one list parser of the experiment binaries.
std::vector<std::string> split_list(const std::string& s);

// The whole number `text` given to `flag` ("--seq"), in [min, max]; throws
// std::invalid_argument naming the flag and the value. A value kept in an int
// passes max = INT32_MAX, so that 4294967297 is refused rather than wrapped to 1.
int64_t whole_number(const std::string& flag, const std::string& text, int64_t min,
                     int64_t max = std::numeric_limits<int64_t>::max());

// The real number `text` given to `flag` ("--lr"): the whole text in decimal or
// exponent form (strtod's hexadecimal, "7x" and " 7" are refused), finite.
// Throws std::invalid_argument naming the flag and the value.
double real_number(const std::string& flag, const std::string& text);

// The --max-memory of every experiment binary: `gb` GB (10^9 bytes) as bytes,
// or -1 for 0 (no limit); throws std::invalid_argument naming `flag` for a
// negative or non-finite value.
double memory_limit_bytes(const std::string& flag, double gb);

// whole_number and real_number of flag `name`'s value (the flag is declared as a string).
int64_t int_flag(const cxxopts::ParseResult& r, const std::string& name, int64_t min,
                 int64_t max = std::numeric_limits<int64_t>::max());
double real_flag(const cxxopts::ParseResult& r, const std::string& name);

// A --methods entry: a registered method's name, then optionally settings of
// that method's own options (its section of peft::AdapterOptions) as
// ":KEY=VALUE" pairs, e.g. "prefix:reparam=true", "lora:r=4:lora_alpha=8".
// VALUE is read as JSON (true, 4, 0.5, ["fc","proj"]) or else taken as a
// string; outside a JSON array, object or string it cannot hold ',' (the
// list separator). The method checks keys and values when the
// adapter is made. Throws std::invalid_argument naming `flag` and the entry
// for an empty name or a setting without KEY=.
struct MethodEntry {
    std::string method;
    nlohmann::json settings = nlohmann::json::object();
};
MethodEntry method_entry(const std::string& flag, const std::string& entry);

// The entries of a comma-separated --methods list, each a method_entry whose
// method is one of `known` (in the list's order); an empty list means every
// known method, without settings. Throws std::invalid_argument naming `flag`
// for an unknown method (listing the known ones) or a method listed twice
// (for binaries that key their rows by method).
std::vector<MethodEntry> method_entries(const std::string& flag, const std::string& list,
                                        const std::vector<std::string>& known);

// The thread count a run uses: `requested` (--threads; 0 = all cores) when
// given, else PEFTLAB_THREADS when set, else all cores. More threads than
// cores (omp_get_num_procs: the CPUs this process may run on) are capped to
// the cores with a warning on stderr, because an oversubscribed OpenMP team
// waits on its descheduled threads at every barrier (a 2-step run with 64
// threads on 2 cores did not finish in 120 s). Applies the count to OpenBLAS
// and OpenMP (set_threads) and returns it. Throws std::invalid_argument naming
// PEFTLAB_THREADS and its value when that is not a whole number >= 0.
int configure_threads(std::optional<int64_t> requested);

// True when this process was started with GOMP_SPINCOUNT set by the
// experiment binaries' start-up re-exec (see flags.cpp), or by the caller.
bool omp_wait_policy_set();

}  // namespace peftlab::flags
