#include "datasets/task.h"

#include <algorithm>
#include <cctype>
#include <map>
#include <stdexcept>

#include <fmt/format.h>

namespace peftlab::data {

// ------------------------------------------------------------------ the list of tasks

// One line per built-in task: name, factory (defined in the task's own file),
// defaults {n_train, n_valid, n_test, max_new_tokens}, description.
// e2e: a low-data regime (as Li & Liang's 50-500 example E2E subsets), where
// what the base learned in pretraining shows; sweep-data goes larger.
#define PEFTLAB_TASKS(X)                                                                                         \
    X("e2e", make_e2e_task, (TaskDefaults{300, 200, 200, 40, {}}),                                               \
      "restaurant table-to-text (E2E-style MR -> sentence); BLEU, ROUGE-L, slot error rate")                    \
    X("classify", make_classify_task, (TaskDefaults{2000, 200, 200, 2, {}}),                                     \
      "restaurant review sentiment, label words negative/positive; accuracy, macro-F1")                         \
    X("reverse", make_reverse_task, (TaskDefaults{2000, 200, 200, 16, {}}), "reverse 3..10 symbols; exact match") \
    X("sort", make_sort_task, (TaskDefaults{2000, 200, 200, 16, {}}), "sort 3..10 digits; exact match")          \
    X("add", make_add_task, (TaskDefaults{2000, 200, 200, 16, {}}), "add two numbers 0..9999; exact match")       \
    X("wordnet-gloss", make_wordnet_gloss_task, (TaskDefaults{2000, 200, 200, 0, {}}),                           \
      "WordNet 3.0 (Debian wordnet-base): \"lemma (pos)\" -> its definition; BLEU, ROUGE-L")                     \
    X("wordnet-pos", make_wordnet_pos_task, (TaskDefaults{2000, 200, 200, 0, {}}),                               \
      "WordNet 3.0 (Debian wordnet-base): definition -> noun/verb/adjective/adverb; accuracy, macro-F1")        \
    X("petrov-sort-asc", make_petrov_sort_asc_task, (TaskDefaults{5000, 100, 200, 11, {}}),                    \
      "Petrov et al. 2024: 10 digits 1..8 sorted ascending; exact match (petrov.h)")                           \
    X("petrov-sort-desc", make_petrov_sort_desc_task, (TaskDefaults{5000, 100, 200, 11, {}}),                  \
      "Petrov et al. 2024: 10 digits 1..8 sorted descending; exact match")                                     \
    X("petrov-add1", make_petrov_add1_task, (TaskDefaults{5000, 100, 200, 11, {}}),                            \
      "Petrov et al. 2024: each of 10 digits 1..8 plus 1; exact match")                                        \
    X("petrov-add2", make_petrov_add2_task, (TaskDefaults{5000, 100, 200, 11, {}}),                            \
      "Petrov et al. 2024: each of 10 digits 1..8 plus 2; exact match")                                        \
    X("petrov-sort-asc-add1", make_petrov_sort_asc_add1_task, (TaskDefaults{5000, 100, 200, 11, {}}),          \
      "Petrov et al. 2024: sorted ascending, then plus 1 (a composition of pretrained tasks); exact match")    \
    X("petrov-hist", make_petrov_hist_task, (TaskDefaults{5000, 100, 200, 11, {}}),                            \
      "Petrov et al. 2024: double histogram, each digit's count in the input (not pretrained); exact match")    \
    X("petrov-reverse", make_petrov_reverse_task, (TaskDefaults{5000, 100, 200, 11, {}}),                      \
      "Petrov-style, ours: the 10 digits reversed, an attention pattern the mixture lacks; exact match")

#define PEFTLAB_DECLARE(name, factory, defaults, description) Task factory(const TaskRequest&);
PEFTLAB_TASKS(PEFTLAB_DECLARE)
#undef PEFTLAB_DECLARE

namespace {

std::vector<TaskInfo>& task_list() {
#define PEFTLAB_ENTRY(name, factory, defaults, description) TaskInfo{name, description, defaults, factory},
    static std::vector<TaskInfo> list{PEFTLAB_TASKS(PEFTLAB_ENTRY)};
#undef PEFTLAB_ENTRY
    return list;
}

std::string known_tasks() {
    std::string known;
    for (const TaskInfo& t : tasks()) known += (known.empty() ? "" : ", ") + t.name;
    return known;
}

void check_sizes(const char* who, const std::vector<Example>& examples, const std::vector<std::string>& generated) {
    if (examples.size() != generated.size())
        throw std::invalid_argument(
            fmt::format("{}: {} examples but {} generations", who, examples.size(), generated.size()));
    if (examples.empty()) throw std::invalid_argument(fmt::format("{}: nothing to score", who));
}

class GenerationScorer final : public Scorer {
public:
    explicit GenerationScorer(const SlotLexicon* lexicon) : lexicon_(lexicon) {}
    std::string metric_name() const override { return "bleu"; }
    Score score(const std::vector<Example>& ex, const std::vector<std::string>& hyps) const override {
        check_sizes("generation_scorer", ex, hyps);
        std::vector<std::vector<std::string>> refs;
        for (const Example& e : ex) refs.push_back(e.references.empty() ? std::vector<std::string>{e.target} : e.references);
        const BleuResult bleu = corpus_bleu(hyps, refs);
        Score s{"bleu", bleu.bleu, {}, {}};
        s.extra["rouge_l"] = corpus_rouge_l(hyps, refs);
        // Unsmoothed BLEU-4 is 0 whenever no 4-gram matches, as for answers of one to three words
        // however right they are: say so, beside the metric that does see them.
        if (bleu.bleu == 0 && bleu.matches[0] > 0 && bleu.matches[3] == 0)
            s.flags.push_back(fmt::format("bleu 0: no 4-gram matches ({} of {} 4-grams in {} hypotheses; short "
                                          "outputs have none), while {} of {} words match; see rouge_l = {:.4f}",
                                          bleu.matches[3], bleu.totals[3], hyps.size(), bleu.matches[0],
                                          bleu.totals[0], s.extra["rouge_l"]));
        if (lexicon_) {
            std::vector<std::map<std::string, std::string>> mrs;
            for (const Example& e : ex) mrs.push_back(e.slots);
            s.extra["slot_error_rate"] = slot_error_rate(hyps, mrs, *lexicon_).rate;
        }
        return s;
    }

private:
    const SlotLexicon* lexicon_;
};

bool word_byte(unsigned char c) { return std::isalnum(c) || c >= 0x80; }

class LabelScorer final : public Scorer {
public:
    explicit LabelScorer(std::vector<std::string> words) : words_(std::move(words)) {
        if (words_.empty()) throw std::invalid_argument("label_scorer: no label words");
    }
    std::string metric_name() const override { return "accuracy"; }

    // Index of the label word `text` starts with (see label_scorer), -1 if none.
    int predict(const std::string& text) const {
        size_t start = 0;
        while (start < text.size() && std::isspace(static_cast<unsigned char>(text[start]))) ++start;
        int best = -1;
        for (size_t k = 0; k < words_.size(); ++k) {
            const std::string& w = words_[k];
            if (w.empty() || text.compare(start, w.size(), w) != 0) continue;
            const size_t end = start + w.size();
            if (end < text.size() && word_byte(static_cast<unsigned char>(text[end])) &&
                word_byte(static_cast<unsigned char>(w.back())))
                continue;  // "positively" is not "positive"
            if (best < 0 || w.size() > words_[size_t(best)].size()) best = int(k);
        }
        return best;
    }

    // The answers of a flag: the one answer, or how many distinct ones and the
    // most frequent (the first of equals in example order), if one repeats.
    static std::string answers_in_words(const std::vector<std::string>& hyps) {
        std::map<std::string, size_t> count;
        for (const std::string& h : hyps) ++count[h];
        if (count.size() == 1) return fmt::format("all \"{}\"", hyps[0]);
        const std::string* most = &hyps[0];
        for (const std::string& h : hyps)
            if (count[h] > count[*most]) most = &h;
        if (count[*most] == 1) return fmt::format("{} distinct answers, none repeated", count.size());
        return fmt::format("{} distinct answers, most often \"{}\" ({} times)", count.size(), *most, count[*most]);
    }

    Score score(const std::vector<Example>& ex, const std::vector<std::string>& hyps) const override {
        check_sizes("label_scorer", ex, hyps);
        std::vector<int> pred, gold;
        for (size_t i = 0; i < ex.size(); ++i) {
            pred.push_back(predict(hyps[i]));
            auto it = std::find(words_.begin(), words_.end(), ex[i].target);
            if (it == words_.end())
                throw std::invalid_argument(fmt::format("label_scorer: example {}{}: target \"{}\" is not a label word", i,
                                                        ex[i].origin.empty() ? "" : " (" + ex[i].origin + ")",
                                                        ex[i].target));
            gold.push_back(int(it - words_.begin()));
        }
        Score s{"accuracy", accuracy(pred, gold), {}, {}};
        s.extra["macro_f1"] = macro_f1(pred, gold);
        // A classifier that answers one class for every example, said as such.
        if (pred.size() > 1 && std::all_of(pred.begin(), pred.end(), [&](int p) { return p == pred[0]; })) {
            s.flags.push_back(pred[0] >= 0 ? fmt::format("single class: predicts \"{}\" for all {} examples",
                                                         words_[size_t(pred[0])], pred.size())
                                           : fmt::format("single class: answers no label word for all {} "
                                                         "examples ({})",
                                                         pred.size(), answers_in_words(hyps)));
            s.flags_one_kind = true;
        }
        return s;
    }

private:
    std::vector<std::string> words_;
};

class ExactMatchScorer final : public Scorer {
public:
    std::string metric_name() const override { return "exact_match"; }
    Score score(const std::vector<Example>& ex, const std::vector<std::string>& hyps) const override {
        check_sizes("exact_match_scorer", ex, hyps);
        std::vector<std::string> refs;
        for (const Example& e : ex) refs.push_back(e.target);
        return {"exact_match", exact_match(hyps, refs), {}, {}};
    }
};

}  // namespace

std::string format_example(const Example& ex) { return ex.source + std::string(kSeparator) + ex.target; }

std::shared_ptr<const Scorer> generation_scorer(const SlotLexicon* lexicon) {
    return std::make_shared<GenerationScorer>(lexicon);
}
std::shared_ptr<const Scorer> label_scorer(std::vector<std::string> label_words) {
    return std::make_shared<LabelScorer>(std::move(label_words));
}
std::shared_ptr<const Scorer> exact_match_scorer() { return std::make_shared<ExactMatchScorer>(); }

size_t DataReport::left_out() const {
    size_t n = 0;
    for (const auto& [name, s] : splits) n += s.blank_rows + s.duplicate_rows + s.dropped_too_long;
    return n;
}

std::string Task::metric_name() const {
    if (!scorer) throw std::logic_error(fmt::format("task '{}' has no scorer", name));
    return scorer->metric_name();
}

Score Task::score(const std::vector<Example>& examples, const std::vector<std::string>& generated) const {
    if (!scorer) throw std::logic_error(fmt::format("task '{}' has no scorer", name));
    return scorer->score(examples, generated);
}

const std::vector<TaskInfo>& tasks() { return task_list(); }

std::vector<std::string> task_names() {
    std::vector<std::string> names;
    for (const TaskInfo& t : tasks()) names.push_back(t.name);
    return names;
}

const TaskInfo& task_info(const std::string& name) {
    for (const TaskInfo& t : tasks())
        if (t.name == name) return t;
    throw std::invalid_argument(fmt::format("unknown task \"{}\" (valid: {})", name, known_tasks()));
}

Task make_task(const std::string& name, size_t n_train, size_t n_valid, size_t n_test, uint64_t seed,
               bool open_vocabulary) {
    const TaskInfo& info = task_info(name);
    Task t = info.make(TaskRequest{n_train, n_valid, n_test, seed, open_vocabulary});
    t.name = name;
    t.defaults = info.defaults;
    return t;
}

void register_task(TaskInfo info) {
    if (info.name.empty()) throw std::invalid_argument("register_task: empty task name");
    if (!info.make) throw std::invalid_argument("register_task: task '" + info.name + "' has no factory");
    for (const TaskInfo& t : tasks())
        if (t.name == info.name) throw std::invalid_argument("register_task: task '" + info.name + "' is already registered");
    task_list().push_back(std::move(info));
}

}  // namespace peftlab::data
