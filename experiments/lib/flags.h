#pragma once
// Command-line flags of the experiment binaries that parse their own options
// (harness::parse_or_exit, for the ones built on CommonArgs, uses parse too).
#include <cstdint>
#include <string>

#include <cxxopts.hpp>

namespace peftlab::flags {

// Parses argv: --help prints the options and exits 0; a positional argument
// throws std::invalid_argument naming it.
cxxopts::ParseResult parse(cxxopts::Options& o, int argc, char** argv);

// The whole number `text` given to `flag` ("--seq"), at least `min`; throws
// std::invalid_argument naming the flag and the value.
int64_t whole_number(const std::string& flag, const std::string& text, int64_t min);

// whole_number of flag `name`'s value (the flag is declared as a string).
int64_t int_flag(const cxxopts::ParseResult& r, const std::string& name, int64_t min);

}  // namespace peftlab::flags
