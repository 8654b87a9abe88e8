#include "datasets/petrov.h"

#include <algorithm>
#include <set>
#include <stdexcept>

#include <fmt/format.h>

#include "autograd/rng.h"

namespace peftlab::data {

namespace {

// Independent stream per (seed, purpose), as tasks.cpp's derived_rng.
Rng stream(uint64_t seed, uint64_t tag) {
    Rng mix(seed ^ (tag * 0xD1B54A32D192ED03ull));
    return Rng(mix.next_u64());
}

uint64_t fnv1a(const std::string& s) {
    uint64_t h = 1469598103934665603ull;
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
    return h;
}

// One input as the paper draws it (data_tools.py CustomDataset.__getitem__):
// uniform digits; half of the draws must have at most length/2 distinct digits.
std::vector<int> draw_input(Rng& rng) {
    for (;;) {
        std::vector<int> in(kPetrovLength);
        for (int& d : in) d = 1 + int(rng.below(kPetrovDigits));
        const bool want_repeats = rng.below(2) == 0;
        if (want_repeats && std::set<int>(in.begin(), in.end()).size() > size_t(kPetrovLength / 2)) continue;
        return in;
    }
}

std::vector<int> sorted(std::vector<int> v, bool descending) {
    if (descending)
        std::sort(v.begin(), v.end(), std::greater<int>());
    else
        std::sort(v.begin(), v.end());
    return v;
}

std::vector<int> plus(std::vector<int> v, int k) {
    for (int& d : v) d += k;
    return v;
}

std::vector<std::string> split_words(const std::string& s) {
    std::vector<std::string> out;
    size_t i = 0;
    while (i < s.size()) {
        while (i < s.size() && s[i] == ' ') ++i;
        const size_t j = s.find(' ', i);
        if (i < s.size()) out.push_back(s.substr(i, j == std::string::npos ? std::string::npos : j - i));
        i = j == std::string::npos ? s.size() : j;
    }
    return out;
}

// Exact match (the paper's metric) as the headline; "digit_accuracy": the
// fraction of the kPetrovLength output positions whose word is right (a
// missing word is wrong, extra words are ignored), which shows progress
// long before whole outputs come out right.
class PetrovScorer final : public Scorer {
public:
    std::string metric_name() const override { return "exact_match"; }
    Score score(const std::vector<Example>& ex, const std::vector<std::string>& hyps) const override {
        Score s = exact_match_scorer()->score(ex, hyps);  // checks the sizes
        double right = 0;
        for (size_t i = 0; i < ex.size(); ++i) {
            const std::vector<std::string> want = split_words(ex[i].target), got = split_words(hyps[i]);
            for (size_t j = 0; j < want.size(); ++j) right += j < got.size() && got[j] == want[j];
        }
        s.extra["digit_accuracy"] = right / double(ex.size() * size_t(kPetrovLength));
        return s;
    }
};

// Example of `task` for `input`.
Example example(const std::string& task, const std::vector<int>& input) {
    const std::string src = petrov_text(input), tgt = petrov_text(petrov_output(task, input));
    return {src, tgt, {tgt}, {}, {}};
}

// Splits of `task`: test inputs from the held-out quarter, valid then train
// from the rest, every input distinct within the task. Test is drawn first,
// each split from its own stream, so a split does not depend on the sizes of
// those drawn after it (as tasks.cpp's fill_splits).
Task petrov_task(const std::string& task, const TaskRequest& req) {
    Task t;
    t.name = "petrov-" + task;
    t.scorer = std::make_shared<PetrovScorer>();
    std::set<std::vector<int>> seen;
    auto draw = [&](std::vector<Example>& out, size_t n, uint64_t tag, bool test, const char* split) {
        Rng rng = stream(req.seed, tag);
        const size_t max_draws = 50 * n + 1000;
        for (size_t d = 0; d < max_draws && out.size() < n; ++d) {
            std::vector<int> in = draw_input(rng);
            if (petrov_is_test_input(in) != test || !seen.insert(in).second) continue;
            out.push_back(example(task, in));
        }
        if (out.size() < n)
            throw std::invalid_argument(fmt::format("make_task(\"{}\"): only {} distinct {} inputs of the {} requested",
                                                    t.name, out.size(), split, n));
        DataReport::Split& r = t.report.splits[split];
        r.rows = r.examples = r.pairs = out.size();
    };
    draw(t.test, req.n_test, 1, true, "test");
    draw(t.valid, req.n_valid, 2, false, "valid");
    draw(t.train, req.n_train, 3, false, "train");
    t.corpus = [](uint64_t seed) { return petrov_corpus(kPetrovCorpusLines, seed); };
    t.corpus_id = fmt::format("petrov-mixture v1 lines {}", kPetrovCorpusLines);
    return t;
}

}  // namespace

const std::vector<std::string>& petrov_task_names() {
    static const std::vector<std::string> names = {"sort-asc", "sort-desc", "add1", "add2", "sort-asc-add1", "hist", "reverse"};
    return names;
}

std::vector<int> petrov_output(const std::string& task, const std::vector<int>& input) {
    if (input.size() != size_t(kPetrovLength))
        throw std::invalid_argument(
            fmt::format("petrov_output({}): input has {} digits, expected {}", task, input.size(), kPetrovLength));
    for (int d : input)
        if (d < 1 || d > kPetrovDigits)
            throw std::invalid_argument(fmt::format("petrov_output({}): digit {} outside 1..{}", task, d, kPetrovDigits));
    if (task == "sort-asc") return sorted(input, false);
    if (task == "sort-desc") return sorted(input, true);
    if (task == "add1") return plus(input, 1);
    if (task == "add2") return plus(input, 2);
    if (task == "sort-asc-add1") return plus(sorted(input, false), 1);
    if (task == "hist") {
        std::vector<int> out;
        for (int d : input) out.push_back(int(std::count(input.begin(), input.end(), d)));
        return out;
    }
    if (task == "reverse") return std::vector<int>(input.rbegin(), input.rend());
    std::string known;
    for (const std::string& n : petrov_task_names()) known += (known.empty() ? "" : ", ") + n;
    throw std::invalid_argument(fmt::format("petrov_output: unknown task \"{}\" (known: {})", task, known));
}

std::string petrov_text(const std::vector<int>& digits) {
    std::string out;
    for (int d : digits) {
        if (!out.empty()) out += ' ';
        out += std::to_string(d);
    }
    return out;
}

bool petrov_is_test_input(const std::vector<int>& input) { return fnv1a(petrov_text(input)) % 4 == 0; }

std::string petrov_corpus(size_t n_lines, uint64_t seed) {
    static const char* kMixture[] = {"sort-asc", "sort-desc", "add1", "add2"};
    Rng rng = stream(seed, 0xC0);
    std::string out;
    for (size_t i = 0; i < n_lines;) {
        const std::string task = kMixture[rng.below(4)];
        std::vector<int> in = draw_input(rng);
        if (petrov_is_test_input(in)) continue;
        out += format_example(example(task, in));
        out += '\n';
        ++i;
    }
    return out;
}

Task make_petrov_sort_asc_task(const TaskRequest& req) { return petrov_task("sort-asc", req); }
Task make_petrov_sort_desc_task(const TaskRequest& req) { return petrov_task("sort-desc", req); }
Task make_petrov_add1_task(const TaskRequest& req) { return petrov_task("add1", req); }
Task make_petrov_add2_task(const TaskRequest& req) { return petrov_task("add2", req); }
Task make_petrov_sort_asc_add1_task(const TaskRequest& req) { return petrov_task("sort-asc-add1", req); }
Task make_petrov_hist_task(const TaskRequest& req) { return petrov_task("hist", req); }
Task make_petrov_reverse_task(const TaskRequest& req) { return petrov_task("reverse", req); }

}  // namespace peftlab::data
