#include "experiments/lib/flags.h"

#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <iostream>
#include <stdexcept>

#include <fmt/format.h>
#include <omp.h>

#include "autograd/threads.h"
#include "nn/dist.h"
#include "nn/json_limits.h"

namespace peftlab::flags {

namespace {

// libgomp's idle threads spin ~1 ms (300000 spins) before sleeping, which on
// cores shared with other processes made 2-thread steps 2.5-8x slower (the
// measurements are in autograd/threads.h). libgomp reads GOMP_SPINCOUNT and
// OMP_WAIT_POLICY once, in its own constructor, before anything of ours runs
// (setenv from an ELF .preinit_array function was tried: too late). So an
// experiment binary started without either variable sets GOMP_SPINCOUNT=3000
// and re-executes itself (same argv, same pid) before main: run directly, by
// make or by an MPI launcher, it then waits the same way. The caller's own
// setting, when present, is kept. glibc passes (argc, argv, envp) to ELF
// constructors. If the re-exec fails (no /proc), the run goes on unchanged.
constexpr const char* kSpinCount = "3000";

__attribute__((constructor)) void set_omp_wait_policy(int, char** argv, char**) {
    if (std::getenv("GOMP_SPINCOUNT") || std::getenv("OMP_WAIT_POLICY")) return;
    if (setenv("GOMP_SPINCOUNT", kSpinCount, 1) != 0) return;
    execv("/proc/self/exe", argv);
    unsetenv("GOMP_SPINCOUNT");  // exec failed: say nothing that is not true
}

}  // namespace

bool omp_wait_policy_set() { return std::getenv("GOMP_SPINCOUNT") || std::getenv("OMP_WAIT_POLICY"); }

namespace {
// cxxopts names only the value that failed to parse ("Argument 'abc' failed
// to parse"); the flag it was given to is found in argv: "--flag=value", or
// "--flag value".
std::string name_the_flag(const std::string& message, int argc, char** argv) {
    const std::string head = "Argument " + cxxopts::LQUOTE, tail = cxxopts::RQUOTE + " failed to parse";
    if (message.rfind(head, 0) != 0 || message.size() < head.size() + tail.size() ||
        message.compare(message.size() - tail.size(), tail.size(), tail) != 0)
        return message;
    const std::string value = message.substr(head.size(), message.size() - head.size() - tail.size());
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        const size_t eq = arg.find('=');
        std::string flag;
        if (arg.rfind("-", 0) == 0 && eq != std::string::npos && arg.substr(eq + 1) == value) flag = arg.substr(0, eq);
        else if (arg == value && i > 1 && argv[i - 1][0] == '-') flag = argv[i - 1];
        if (!flag.empty()) return fmt::format("{}: '{}' is not a valid value (see --help)", flag, value);
    }
    return message;
}
}  // namespace

cxxopts::ParseResult parse(cxxopts::Options& o, int argc, char** argv, const std::string& epilog) {
    cxxopts::ParseResult r = [&] {
        try {
            return o.parse(argc, argv);
        } catch (const cxxopts::exceptions::incorrect_argument_type& e) {
            throw std::invalid_argument(name_the_flag(e.what(), argc, argv));
        } catch (const cxxopts::exceptions::parsing& e) {  // an unknown flag, a missing value: usage errors too
            throw std::invalid_argument(e.what());
        }
    }();
    if (r.count("help")) {
        std::cout << o.help() << "\n";
        if (!epilog.empty()) std::cout << epilog << "\n";
        std::exit(0);
    }
    if (!r.unmatched().empty()) throw std::invalid_argument(fmt::format("unexpected argument '{}'", r.unmatched()[0]));
    return r;
}

std::vector<std::string> split_list(const std::string& s) {
    std::vector<std::string> out;
    std::string item;
    int depth = 0;  // inside [...] or {...}: a JSON value's commas are its own
    bool quoted = false;
    for (size_t i = 0; i < s.size(); ++i) {
        const char c = s[i];
        if (quoted) {
            if (c == '\\' && i + 1 < s.size()) item += s[i++];
            else if (c == '"') quoted = false;
        } else if (c == '"') {
            quoted = true;
        } else if (c == '[' || c == '{') {
            ++depth;
        } else if ((c == ']' || c == '}') && depth > 0) {
            --depth;
        } else if (c == ',' && depth == 0) {
            if (!item.empty()) out.push_back(item);
            item.clear();
            continue;
        }
        item += c;
    }
    if (!item.empty()) out.push_back(item);
    return out;
}

double memory_limit_bytes(const std::string& flag, double gb) {
    if (!(gb >= 0) || !std::isfinite(gb))
        throw std::invalid_argument(fmt::format("{}: {} must be a number of GB >= 0", flag, gb));
    return gb == 0 ? -1.0 : gb * 1e9;
}

int64_t whole_number(const std::string& flag, const std::string& text, int64_t min, int64_t max) {
    size_t used = 0;
    long long v = 0;
    try {
        v = std::stoll(text, &used);
    } catch (const std::exception&) {
        used = 0;
    }
    if (used == 0 || used != text.size())
        throw std::invalid_argument(fmt::format("{}: '{}' is not a whole number", flag, text));
    if (v < min) throw std::invalid_argument(fmt::format("{}: {} must be >= {}", flag, v, min));
    if (v > max) throw std::invalid_argument(fmt::format("{}: {} must be <= {}", flag, v, max));
    return v;
}

double real_number(const std::string& flag, const std::string& text) {
    double v = 0;
    const char* end = text.data() + text.size();
    const auto [ptr, ec] = std::from_chars(text.data(), end, v);  // decimal or exponent form, no hex, no spaces
    if (text.empty() || ec != std::errc() || ptr != end || !std::isfinite(v))
        throw std::invalid_argument(fmt::format("{}: '{}' is not a finite real number", flag, text));
    return v;
}

MethodEntry method_entry(const std::string& flag, const std::string& entry) {
    MethodEntry e;
    size_t colon = entry.find(':');
    e.method = entry.substr(0, colon);
    if (e.method.empty()) throw std::invalid_argument(fmt::format("{}: entry '{}' names no method", flag, entry));
    while (colon != std::string::npos) {
        const size_t start = colon + 1;
        colon = entry.find(':', start);
        const std::string item = entry.substr(start, colon == std::string::npos ? std::string::npos : colon - start);
        const size_t eq = item.find('=');
        if (eq == 0 || eq == std::string::npos)
            throw std::invalid_argument(
                fmt::format("{}: '{}' in '{}' is not KEY=VALUE (a setting of {}'s own options)", flag, item, entry, e.method));
        const std::string key = item.substr(0, eq), text = item.substr(eq + 1);
        nlohmann::json v;
        try {
            v = parse_json_limited(text, flag);  // depth-bounded: dump and destruction recurse
        } catch (const std::runtime_error&) {
            v = text;  // not JSON: a string
        }
        e.settings[key] = v;
    }
    return e;
}

std::vector<MethodEntry> method_entries(const std::string& flag, const std::string& list,
                                        const std::vector<std::string>& known) {
    std::vector<MethodEntry> out;
    if (list.empty()) {
        for (const std::string& k : known) out.push_back({k, nlohmann::json::object()});
        return out;
    }
    const std::vector<std::string> items = split_list(list);
    if (items.empty()) throw std::invalid_argument(fmt::format("{}: '{}' names no method", flag, list));
    for (const std::string& item : items) {
        MethodEntry e = method_entry(flag, item);
        if (std::find(known.begin(), known.end(), e.method) == known.end()) {
            std::string names;
            for (const std::string& k : known) names += (names.empty() ? "" : ", ") + k;
            throw std::invalid_argument(fmt::format("{}: unknown method '{}' (known: {})", flag, e.method, names));
        }
        for (const MethodEntry& seen : out)
            if (seen.method == e.method)
                throw std::invalid_argument(fmt::format("{}: '{}' is listed twice in '{}'", flag, e.method, list));
        out.push_back(std::move(e));
    }
    return out;
}

int64_t int_flag(const cxxopts::ParseResult& r, const std::string& name, int64_t min, int64_t max) {
    return whole_number("--" + name, r[name].as<std::string>(), min, max);
}

double real_flag(const cxxopts::ParseResult& r, const std::string& name) {
    return real_number("--" + name, r[name].as<std::string>());
}

int configure_threads(std::optional<int64_t> requested) {
    std::string source = "--threads";
    int64_t n = 0;
    if (requested) {
        n = *requested;
    } else if (const char* env = std::getenv("PEFTLAB_THREADS"); env && *env) {
        n = whole_number("PEFTLAB_THREADS", env, 0);
        source = "PEFTLAB_THREADS";
    }
    const int cores = omp_get_num_procs();
    // Several ranks on one machine (mpirun without core binding): all cores
    // by default means this rank's share of them.
    if (n == 0 && dist::world().local_size() > 1) n = std::max(1, cores / dist::world().local_size());
    if (n > cores) {
        fmt::print(stderr,
                   "warning: {} {} is more than the {} cores this process may use; running {} threads "
                   "(an oversubscribed OpenMP team runs several times slower)\n",
                   source, n, cores, cores);
        n = cores;
    }
    set_threads(int(n));
    return threads();
}

}  // namespace peftlab::flags
