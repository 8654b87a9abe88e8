// "No file outside a method's own names a PEFT method" (STYLE.md: extension
// by capability): the code of the library, the experiments, the tools and the
// fuzz targets is searched for every built-in method's name as a literal
// ("lora", 'lora', or an item of a comma list such as "full,lora" or an entry
// "prefix:reparam=true"). Comments are not searched (they may give examples).
//
// Allowed, each for a reason:
//   - the method's own file: the one in peft/ defining the factory its
//     registry line names (found from peft/registry.cpp, not listed here);
//   - peft/registry.cpp, the registry itself;
//   - a line carrying "method-names:" followed by its reason: a default a user
//     overrides by flag in an experiment whose question is about those methods
//     (sweep-length: prefix lengths), or a word that is not a method (--prompt);
//   - kAllowedFiles below;
//   - not searched: tests/ (they exercise specific methods) and docs (*.md).
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>

#include <catch2/catch.hpp>

#include "experiments/lib/flags.h"
#include "experiments/lib/harness.h"
#include "peft/registry.h"
#include "tests/testing.h"

namespace fs = std::filesystem;

namespace {

// File -> why it may name methods.
const std::map<std::string, std::string> kAllowedFiles = {
    {"tools/torch_bench.py", "an independent PyTorch implementation of the methods it names (bench's reference)"},
    {"tools/hf_gpt2_reference.py", "an independent implementation of HF PEFT's methods (the parity fixtures' reference)"},
    {"tools/write_fuzz_seeds.cpp", "writes the fuzzers' seed inputs, one per method's file format (test data)"},
};

std::string read_file(const fs::path& p) {
    std::ifstream in(p);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

// The line without its comment: from "//" (or '#' for Python and the
// Makefile) outside a string literal on.
std::string code_of(const std::string& line, bool hash_comments) {
    char quote = 0;
    for (size_t i = 0; i < line.size(); ++i) {
        const char c = line[i];
        if (quote) {
            if (c == '\\') ++i;
            else if (c == quote) quote = 0;
        } else if (c == '"' || (hash_comments && c == '\'')) {
            quote = c;
        } else if ((!hash_comments && c == '/' && i + 1 < line.size() && line[i + 1] == '/') || (hash_comments && c == '#')) {
            return line.substr(0, i);
        }
    }
    return line;
}

}  // namespace

TEST_CASE("method names: no file outside a method's own names a built-in method", "[method_names]") {
    const std::string registry = read_file("peft/registry.cpp");
    REQUIRE_FALSE(registry.empty());  // run from the repository root, as make test does
    // name -> factory, from the registry's lines X("name", factory, "description").
    std::map<std::string, std::string> factory;
    const std::regex line_re(R"re(X\("([^"]+)", (\w+),)re");
    for (std::sregex_iterator it(registry.begin(), registry.end(), line_re), end; it != end; ++it)
        factory[(*it)[1]] = (*it)[2];
    REQUIRE(factory.size() >= 9);
    REQUIRE(factory.count("ln-tuning"));

    std::vector<fs::path> files;
    for (const char* dir : {"autograd", "nn", "peft", "datasets", "experiments", "experiments/lib", "tools", "fuzz"})
        for (const auto& e : fs::directory_iterator(dir)) {
            const std::string ext = e.path().extension().string();
            if (e.is_regular_file() && (ext == ".cpp" || ext == ".h" || ext == ".py" || ext == ".sh")) files.push_back(e.path());
        }
    files.push_back("Makefile");
    std::sort(files.begin(), files.end());

    // A method's own files: those in peft/ defining its factory.
    std::map<std::string, std::set<std::string>> own;
    for (const fs::path& f : files) {
        if (f.parent_path() != "peft") continue;
        const std::string text = read_file(f);
        for (const auto& [name, fac] : factory)
            if (text.find("std::unique_ptr<Adapter> " + fac + "(const AdapterOptions&") != std::string::npos &&
                text.find(") { return std::make_unique<") != std::string::npos)
                own[name].insert(f.string());
    }
    for (const auto& [name, fac] : factory) {
        INFO(name << ": no file in peft/ defines its factory " << fac);
        CHECK(own.count(name));
    }

    std::vector<std::string> found;
    int searched = 0;
    for (const fs::path& f : files) {
        const std::string path = f.string();
        if (path == "peft/registry.cpp" || kAllowedFiles.count(path)) continue;
        const bool hash_comments = f.extension() == ".py" || f.extension() == ".sh" || path == "Makefile";
        std::ifstream in(f);
        std::string line;
        for (int n = 1; std::getline(in, line); ++n) {
            if (line.find("method-names:") != std::string::npos) continue;
            const std::string code = code_of(line, hash_comments);
            for (const auto& [name, fac] : factory) {
                if (own[name].count(path)) continue;
                static const std::string before = "\"',", after = "\"',:";
                for (size_t at = code.find(name); at != std::string::npos; at = code.find(name, at + 1)) {
                    const size_t end = at + name.size();
                    if (at > 0 && before.find(code[at - 1]) != std::string::npos && end < code.size() &&
                        after.find(code[end]) != std::string::npos) {
                        found.push_back(path + ":" + std::to_string(n) + ": names '" + name + "': " + line);
                        break;
                    }
                }
            }
        }
        ++searched;
    }
    CHECK(searched > 50);
    std::string report;
    for (const std::string& f : found) report += f + "\n";
    INFO("ask the adapter or the registry instead (peft/adapter.h), or mark a user-overridable default with "
         "'// method-names: <reason>':\n"
         << report);
    CHECK(found.empty());
}

TEST_CASE("method names: the search finds a literal and skips comments and marked lines", "[method_names]") {
    // The scanner itself, on lines it must and must not flag.
    CHECK(code_of(R"(x = f("lora");  // "prefix")", false) == R"(x = f("lora");  )");
    CHECK(code_of(R"(s = "a // b"; // c)", false) == R"(s = "a // b"; )");
    CHECK(code_of(R"(name == "full"  # "prompt")", true) == R"(name == "full"  )");
    CHECK(code_of(R"(u = "http://x")", false) == R"(u = "http://x")");
}

TEST_CASE("method entries: METHOD:KEY=VALUE sets the method's own options, checked by the method", "[method_names]") {
    using Catch::Contains;
    const peftlab::flags::MethodEntry e = peftlab::flags::method_entry("--methods", "lora:r=4:lora_alpha=8.5:init_lora_weights=true:x=q_proj");
    CHECK(e.method == "lora");
    CHECK(e.settings == nlohmann::json{{"r", 4}, {"lora_alpha", 8.5}, {"init_lora_weights", true}, {"x", "q_proj"}});
    CHECK(peftlab::flags::method_entry("--methods", "ia3").settings.empty());
    CHECK_THROWS_WITH(peftlab::flags::method_entry("--methods", ":r=4"), Contains("--methods") && Contains("names no method"));
    CHECK_THROWS_WITH(peftlab::flags::method_entry("--methods", "lora:r"), Contains("'r' in 'lora:r' is not KEY=VALUE"));
    CHECK_THROWS_WITH(peftlab::flags::method_entry("--methods", "lora:=4"), Contains("is not KEY=VALUE"));

    // A list of entries (bench, report): empty means every known method; unknown and repeated methods are refused.
    using peftlab::flags::method_entries;
    const std::vector<std::string> known = {"a", "b", "c"};
    const auto all = method_entries("--methods", "", known);
    REQUIRE(all.size() == 3);
    CHECK((all[0].method == "a" && all[2].method == "c" && all[1].settings.empty()));
    const auto two = method_entries("--methods", "c:k=2,a", known);
    REQUIRE(two.size() == 2);
    CHECK((two[0].method == "c" && two[0].settings == nlohmann::json{{"k", 2}} && two[1].method == "a"));
    CHECK_THROWS_WITH(method_entries("--methods", "a,d", known), Contains("unknown method 'd' (known: a, b, c)"));
    CHECK_THROWS_WITH(method_entries("--methods", "a,a:k=1", known), Contains("'a' is listed twice"));
    CHECK_THROWS_WITH(method_entries("--bench", ",", known), Contains("--bench: ',' names no method"));

    // Through the harness: the entry's settings reach the method, and its label is the entry.
    peftlab::harness::CommonArgs a;
    a.model = peftlab::testing::small_gpt(48, 32, 2);
    const peftlab::harness::MethodSpec s = peftlab::harness::make_spec(a, "prefix:reparam=true:reparam_hidden=8");
    CHECK(s.method == "prefix");
    CHECK(s.label == "prefix:reparam=true:reparam_hidden=8");
    const auto reparam = peftlab::peft::make_adapter(s.method, s.options);
    const auto plain = peftlab::peft::make_adapter("prefix", peftlab::harness::make_spec(a, "prefix").options);
    // The MLP trains on top of the n*d the prefix keeps at inference.
    CHECK(reparam->formula(a.model).count > reparam->inference_formula(a.model).count);
    CHECK(plain->formula(a.model).count == plain->inference_formula(a.model).count);
    // A key the method does not read is refused by the method, naming it.
    CHECK_THROWS_WITH(peftlab::peft::make_adapter("lora", peftlab::harness::make_spec(a, "lora:rank=4").options), Contains("rank"));
}
