#pragma once
// The built-in synthetic fine-tuning tasks (registered in task.cpp), all
// deterministic given a seed, and the restaurant corpus the base is
// pretrained on by default. Examples are short by design: every "e2e"
// example has source + kSeparator + target <= kE2EMaxBytes bytes, so framed
// with BOS and EOS it fits in 128 byte tokens.
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "datasets/metrics.h"
#include "datasets/task.h"

namespace peftlab::data {

inline constexpr size_t kE2EMaxBytes = 126;

// The factories of the built-in tasks (task.cpp lists them), each with the
// requested split sizes:
//   make_e2e_task      restaurant table-to-text. source: MR "name[Blue Spice], food[French], area[riverside]";
//                      target: a sentence realizing every slot value; up to 3 references. Metric BLEU
//                      (generation_scorer with e2e_lexicon(): ROUGE-L and slot_error_rate too). Venue names
//                      of train, valid and test are disjoint, so test MRs name venues never seen in training
//                      and must be copied. Pretrains on restaurant_corpus.
//   make_classify_task restaurant review sentiment; target is the label word "negative" or "positive"
//                      (the majority polarity of its 1 or 3 clauses, "not" flipping a clause). Metric accuracy.
//   make_reverse_task  "k 3 f 9" => "9 f 3 k" (3..10 letters/digits). Metric exact_match.
//   make_sort_task     "5 1 4 1" => "1 1 4 5" (3..10 digits). Metric exact_match.
//   make_add_task      "1234 + 56" => "1290" (operands 0..9999). Metric exact_match.
// Each split draws from its own stream, so the test set depends only on
// (seed, n_test) and valid on (seed, n_test, n_valid); sources are unique
// across all splits. Throws std::invalid_argument when a split cannot get
// that many distinct examples.
Task make_e2e_task(const TaskRequest& req);
Task make_classify_task(const TaskRequest& req);
Task make_reverse_task(const TaskRequest& req);
Task make_sort_task(const TaskRequest& req);
Task make_add_task(const TaskRequest& req);

// Lines of restaurant_corpus a base pretrains on when neither the task nor
// --corpus gives other text.
inline constexpr size_t kDefaultCorpusLines = 20000;

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
