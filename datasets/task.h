#pragma once
// A fine-tuning task as the harness sees it: its splits, its metric(s), its
// defaults and, optionally, its own pretraining text. The harness asks the task
// (Task::score, Task::defaults, Task::corpus) and never looks at its name.
//
// Conditioning format, shared by every task: a model reads
// `source + kSeparator` and is trained to continue with `target` followed by
// EOS; framed as token ids that is
//     BOS  encode(source)  encode(kSeparator)  encode(target)  EOS
// (datasets/batch.h builds exactly this). A task frames its prompts by what it
// puts in `source` (e2e: an MR, a file task: the input field as written).
// kSeparator starts and ends with a space, so encoding the three strings apart
// or together gives the same ids with both built-in tokenizers.
//
// Adding a task: one file with a factory `Task make_x(const TaskRequest&)` and
// one line in task.cpp's PEFTLAB_TASKS list (or register_task() at run time).
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "datasets/metrics.h"

namespace peftlab::data {

inline constexpr std::string_view kSeparator = " => ";

struct Example {
    std::string source;
    std::string target;
    std::vector<std::string> references;        // every accepted output; references[0] == target
    std::map<std::string, std::string> slots;   // table-to-text tasks: the meaning representation
    std::string origin;                         // where it came from, "FILE:LINE" ("" for generated data)
};

// `source + kSeparator + target`: the text a tokenizer should cover, e.g.
// when building a WordTokenizer vocabulary from a task's training split.
std::string format_example(const Example& ex);

// What a task's metric said about generated outputs.
struct Score {
    std::string name;                     // the headline metric: "bleu", "accuracy", "exact_match"
    double value = 0;
    std::map<std::string, double> extra;  // further metrics, e.g. "rouge_l", "macro_f1", "slot_error_rate"
    // Degenerate outcomes only the task can recognise, in words ("single class:
    // predicts \"positive\" for all 200 examples"); the harness adds the generic
    // ones (empty or constant generations).
    std::vector<std::string> flags;
    // A flag above already says every output is of one kind (a classifier's
    // single class), so the harness drops its own "constant output", which
    // would say the same less precisely. A flag about the metric (BLEU 0)
    // leaves it.
    bool flags_one_kind = false;
};

// A task's metric(s). generated[i] is the greedy continuation (decoded, EOS
// removed) of examples[i]'s prompt; sizes are equal (std::invalid_argument
// otherwise, and for an empty list).
class Scorer {
public:
    virtual ~Scorer() = default;
    virtual std::string metric_name() const = 0;
    virtual Score score(const std::vector<Example>& examples, const std::vector<std::string>& generated) const = 0;
};

// Generation: corpus BLEU-4 against every reference of an example (metrics.h
// corpus_bleu) as the headline, ROUGE-L F (corpus_rouge_l) as "rouge_l", and,
// with a lexicon, "slot_error_rate" against each example's slots.
std::shared_ptr<const Scorer> generation_scorer(const SlotLexicon* lexicon = nullptr);
// Classification by label words: a generation predicts the label whose word
// it starts with (after leading spaces; the word must end there or be
// followed by a character that is not a letter, digit or non-ASCII byte, the
// longest such word winning), else no label. Accuracy as the headline,
// scikit-learn's macro F1 as "macro_f1" (a generation with no label word is a
// class of its own there, as sklearn would see it). Flags "single class" when
// every prediction is the same.
std::shared_ptr<const Scorer> label_scorer(std::vector<std::string> label_words);
// Exact match after trimming surrounding whitespace (metrics.h exact_match).
std::shared_ptr<const Scorer> exact_match_scorer();

struct TaskDefaults {
    size_t n_train = 2000, n_valid = 200, n_test = 200;  // split sizes when the user gives none
    // Tokens generated per test prompt when scoring; 0: the task's longest
    // target in the run's tokenizer + 1 (EOS), found once the tokenizer is known.
    int max_new_tokens = 16;
    std::vector<double> lr_grid;  // learning rates to search; empty: each method's own grid
};

// Rows a loader read and what became of them: nothing is left out silently.
struct DataReport {
    struct Split {
        std::string path;              // the file it came from ("" for generated data or a split of --train)
        size_t rows = 0;               // data rows read (the header not counted)
        size_t examples = 0;           // examples made (inputs, for grouped generation splits); after
                                       // fit_to_context, those kept
        size_t pairs = 0;              // (input, output) pairs read for them
        size_t blank_rows = 0;         // empty lines or rows, left out
        size_t duplicate_rows = 0;     // the same (input, output) pair again, left out
        size_t truncated = 0;          // sources cut to fit --seq (--truncate left|right)
        size_t dropped_too_long = 0;   // left out: a target longer than --seq allows
    };
    std::map<std::string, Split> splits;  // "train", "valid", "test"
    std::vector<std::string> notes;       // e.g. how a single file was split
    size_t left_out() const;              // blank + duplicate + dropped rows, all splits
};

struct Task {
    std::string name;
    std::vector<Example> train, valid, test;
    // What messages call an example's source and target text after its origin:
    // a file task's fields ("data.csv:12: field 'input': ..."), else these.
    std::string source_name = "source", target_name = "target";
    std::vector<std::string> labels;  // classification: the label words (verbalizer); a target is one of them
    TaskDefaults defaults;
    std::shared_ptr<const Scorer> scorer;
    // The task's own pretraining text (one sentence or passage per line) for
    // a seed, or empty: the harness then pretrains on the built-in restaurant
    // corpus (restaurant_corpus, tasks.h) unless --corpus names a file.
    std::function<std::string(uint64_t seed)> corpus;
    // Names that text in the pretrained base's cache key (any string that
    // changes when the text does); "" for the built-in corpus.
    std::string corpus_id;
    DataReport report;
    // How the run named these data (the harness's data_recipe), kept with a
    // saved adapter so that it can be evaluated on them again; null when
    // nothing recorded it.
    nlohmann::json recipe;

    std::string metric_name() const;
    // scorer->score(); throws std::logic_error when the task has no scorer.
    Score score(const std::vector<Example>& examples, const std::vector<std::string>& generated) const;
};

// What a factory is asked for: split sizes (the caller resolves "default" to
// TaskInfo::defaults), the seed of the data, and whether the run's tokenizer
// encodes any text (byte-level or GPT-2 BPE) rather than a word vocabulary
// built from the data: a task may then drop filters that exist only to keep
// its text inside a small word vocabulary.
struct TaskRequest {
    size_t n_train = 0, n_valid = 0, n_test = 0;
    uint64_t seed = 0;
    bool open_vocabulary = false;
};

struct TaskInfo {
    std::string name;         // "e2e"
    std::string description;  // one line, for --help
    TaskDefaults defaults;    // sizes and generation budget; make_task copies them into Task::defaults
    std::function<Task(const TaskRequest&)> make;
};

// The built-in tasks (task.cpp's list), then those registered at run time.
const std::vector<TaskInfo>& tasks();
std::vector<std::string> task_names();
// Throws std::invalid_argument naming the unknown task and listing the known ones.
const TaskInfo& task_info(const std::string& name);
// task_info(name).make({n_train, n_valid, n_test, seed, open_vocabulary})
// with its name and defaults set from the TaskInfo.
Task make_task(const std::string& name, size_t n_train, size_t n_valid, size_t n_test, uint64_t seed,
               bool open_vocabulary = false);
// Adds a task defined outside datasets/ (a test, a user's program); from then
// on it is available by name (--task) like the built-in ones. Throws
// std::invalid_argument for an empty or taken name or a missing factory.
void register_task(TaskInfo info);

}  // namespace peftlab::data
