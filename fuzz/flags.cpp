// libFuzzer target: the command-line flags every experiment takes
// (harness::add_common_flags, flags::parse, harness::parse_common) and
// flags::whole_number and real_number. Input: NUL-separated arguments (argv[1..]). Bad values
// must throw std::exception naming the flag; nothing else may happen.
#include <cstring>

#include "experiments/lib/flags.h"
#include "experiments/lib/harness.h"
#include "peft/registry.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    using namespace peftlab;
    std::vector<std::string> args = {"fuzz"};
    std::string cur;
    for (size_t i = 0; i < size; ++i) {
        if (data[i] == 0) {
            args.push_back(cur);
            cur.clear();
        } else {
            cur += char(data[i]);
        }
    }
    args.push_back(cur);
    // --help prints and exits by design (a clean exit, but it would end the fuzzing run).
    for (const std::string& a : args)
        if (a.rfind("--h", 0) == 0 || (a.size() > 1 && a[0] == '-' && a[1] != '-' && a.find('h') != std::string::npos))
            return 0;
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);

    cxxopts::Options opts("fuzz");
    harness::CommonArgs defaults;
    defaults.methods = {peft::method_names().front()};
    defaults.steps = 10;
    harness::add_common_flags(opts, defaults);
    try {
        const cxxopts::ParseResult r = flags::parse(opts, int(args.size()), argv.data());
        harness::parse_common(r, defaults);
    } catch (const std::exception&) {
    }
    try {
        flags::whole_number("--fuzz", args.back(), 0);
    } catch (const std::invalid_argument&) {
    }
    try {
        flags::real_number("--fuzz", args.back());
    } catch (const std::invalid_argument&) {
    }
    return 0;
}
