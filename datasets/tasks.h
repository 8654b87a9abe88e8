#pragma once
// Synthetic fine-tuning tasks, all deterministic given a seed.
//
// Conditioning format: a model reads `source + kSeparator` and is trained to
// continue with `target` followed by EOS; framed as token ids that is
//     BOS  encode(source)  encode(kSeparator)  encode(target)  EOS
// (datasets/batch.h builds exactly this). kSeparator starts and ends with a
// space, so encoding the three strings apart or together gives the same ids
// with both tokenizers. Examples are short by design: every "e2e" example
// has source + kSeparator + target <= kE2EMaxBytes bytes, so framed with BOS
// and EOS it fits in 128 byte tokens.
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "datasets/metrics.h"

namespace peftlab::data {

inline constexpr std::string_view kSeparator = " => ";
inline constexpr size_t kE2EMaxBytes = 126;

struct Example {
    std::string source;
    std::string target;
    std::vector<std::string> references;        // for BLEU; references[0] == target
    std::map<std::string, std::string> slots;   // e2e only: the meaning representation
};

struct TaskData {
    std::string name;
    std::vector<Example> train, valid, test;
    std::string metric_name;          // "bleu" (e2e), "accuracy" (classify), "exact_match" (algorithmic)
    std::vector<std::string> labels;  // classify only: the verbalizer words; a target is one of them
};

// `source + kSeparator + target`: the text a tokenizer should cover, e.g.
// when building a WordTokenizer vocabulary from a task's training split.
std::string format_example(const Example& ex);

// Task names accepted by make_task.
const std::vector<std::string>& task_names();

// Builds task `name` with the given split sizes:
//   "e2e"      restaurant table-to-text. source: MR "name[Blue Spice], food[French], area[riverside]";
//              target: a sentence realizing every slot value; up to 3 references. Metric BLEU (and
//              slot_error_rate with e2e_lexicon()). Venue names of train, valid and test are
//              disjoint, so test MRs name venues never seen in training and must be copied.
//   "classify" restaurant review sentiment; target is the label word "negative" or "positive"
//              (the majority polarity of its 1 or 3 clauses, "not" flipping a clause). Metric accuracy.
//   "reverse"  "k 3 f 9" => "9 f 3 k" (3..10 letters/digits). Metric exact_match.
//   "sort"     "5 1 4 1" => "1 1 4 5" (3..10 digits). Metric exact_match.
//   "add"      "1234 + 56" => "1290" (operands 0..9999). Metric exact_match.
// Each split draws from its own stream, so the test set depends only on
// (seed, n_test) and valid on (seed, n_test, n_valid); sources are unique
// across all splits. Unknown names throw std::invalid_argument listing the
// valid ones.
TaskData make_task(const std::string& name, size_t n_train, size_t n_valid, size_t n_test, uint64_t seed);

// Lines of varied restaurant descriptions for LM pretraining, each realizing
// 1..5 slots of a random venue with the same phrasings as the e2e targets;
// half the lines add a second sentence about the same venue (copying pays);
// a quarter of the lines are MR listings (format_mr) followed by a sentence
// on some of their values, so the notation is known but not the e2e mapping.
// Only training-split venue names occur, so e2e valid/test names stay unseen.
std::string restaurant_corpus(size_t n_sentences, uint64_t seed);

// Every e2e slot with its values and their surface forms (venue names are
// values of both "name" and "near"), for slot_error_rate.
const SlotLexicon& e2e_lexicon();

// "name[Blue Spice], eatType[pub], ..." with slots in the E2E dataset order
// name, eatType, food, priceRange, customer rating, area, familyFriendly, near.
std::string format_mr(const std::map<std::string, std::string>& slots);

}  // namespace peftlab::data
