#include "experiments/lib/flags.h"

#include <cstdlib>
#include <iostream>
#include <stdexcept>

#include <fmt/format.h>

namespace peftlab::flags {

cxxopts::ParseResult parse(cxxopts::Options& o, int argc, char** argv) {
    cxxopts::ParseResult r = o.parse(argc, argv);
    if (r.count("help")) {
        std::cout << o.help() << "\n";
        std::exit(0);
    }
    if (!r.unmatched().empty()) throw std::invalid_argument(fmt::format("unexpected argument '{}'", r.unmatched()[0]));
    return r;
}

int64_t whole_number(const std::string& flag, const std::string& text, int64_t min) {
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
    return v;
}

int64_t int_flag(const cxxopts::ParseResult& r, const std::string& name, int64_t min) {
    return whole_number("--" + name, r[name].as<std::string>(), min);
}

}  // namespace peftlab::flags
