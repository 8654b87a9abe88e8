#pragma once
// Shared by the harness and CLI tests: the common flags parsed from a command
// line, with the defaults of a small fine-tuning binary (lora, 2 steps, 2
// examples scored).
#include <string>
#include <vector>

#include "experiments/lib/flags.h"
#include "experiments/lib/harness.h"

namespace peftlab::testing {

inline harness::CommonArgs parse_common_args(std::vector<std::string> args) {
    harness::CommonArgs d;
    d.methods = {"lora"};
    d.steps = 2;
    d.eval_examples = 2;
    cxxopts::Options o("test", "");
    harness::add_common_flags(o, d);
    args.insert(args.begin(), "test");
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    return harness::parse_common(flags::parse(o, int(argv.size()), argv.data()), d);
}

}  // namespace peftlab::testing
