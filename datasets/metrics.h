#pragma once
// Evaluation metrics for generation and classification tasks (datasets/tasks.h):
// corpus BLEU-4 with several references, ROUGE-L, slot error rate, accuracy,
// macro-F1 and exact match. tests/test_datasets_metrics.cpp pins BLEU against
// nltk's corpus_bleu (tests/fixtures/bleu_nltk.json) and the rest against
// hand-computed cases.
#include <array>
#include <cstddef>
#include <map>
#include <string>
#include <vector>

namespace peftlab::data {

struct BleuResult {
    double bleu = 0;                        // BP * exp(mean_n log p_n); 0 if any p_n is 0
    double brevity_penalty = 0;             // 1 if hyp_len > ref_len, else exp(1 - ref_len / hyp_len)
    std::array<double, 4> precisions{};     // p_n = matches[n-1] / totals[n-1]
    std::array<size_t, 4> matches{};        // clipped n-gram matches, summed over the corpus
    std::array<size_t, 4> totals{};         // hypothesis n-grams, summed over the corpus
    size_t hyp_len = 0, ref_len = 0;        // tokens; ref_len sums each sentence's closest reference length
};

// Corpus BLEU-4 (Papineni et al. 2002), no smoothing, on pre-tokenized text:
// hyps[i] is a token list and refs[i] its references (one or more token
// lists). Clipped n-gram matches and hypothesis n-gram counts are summed over
// the corpus before dividing (micro-average); an n-gram's count in a
// hypothesis is clipped by its largest count in any one reference of that
// sentence. For the brevity penalty each sentence contributes the reference
// length closest to its hypothesis length, the shorter one on a tie (as
// nltk's closest_ref_length); BP = 1 if c > r, else exp(1 - r / c).
// BLEU is 0 when any order has no match or nothing was generated.
// Equals nltk.translate.bleu_score.corpus_bleu (default weights, no smoothing)
// whenever every hypothesis has >= 4 tokens. Two documented differences:
// nltk counts at least 1 hypothesis n-gram per sentence and order (its
// max(1, ...) guard), so a hypothesis shorter than n adds 1 to nltk's totals
// and 0 to ours (the Papineni count); and where a higher order has no match
// nltk substitutes sys.float_info.min and returns ~1e-77 where we return 0.
// Throws std::invalid_argument if the sizes differ, the corpus is empty or a
// hypothesis has no references.
BleuResult corpus_bleu_tokens(const std::vector<std::vector<std::string>>& hyps,
                              const std::vector<std::vector<std::vector<std::string>>>& refs);

// corpus_bleu_tokens() on text tokenized by split_words() (runs of ASCII
// letters/digits and non-ASCII bytes are words; every other non-space ASCII
// character is a token of its own), case-sensitive. refs[i] lists the
// references of hyps[i].
BleuResult corpus_bleu(const std::vector<std::string>& hyps, const std::vector<std::vector<std::string>>& refs);

struct RougeScore {
    double precision = 0;  // LCS / hypothesis tokens
    double recall = 0;     // LCS / reference tokens
    double fmeasure = 0;   // 2 P R / (P + R), 0 if P + R = 0
    size_t lcs = 0;        // longest common subsequence, tokens
};

// Sentence-level ROUGE-L (Lin 2004, "ROUGE: A Package for Automatic
// Evaluation of Summaries", sec. 3.1) on token lists, as Google's
// `rouge-score` package computes it: P = LCS(hyp, ref) / |hyp|,
// R = LCS / |ref|, F = 2PR / (P + R), i.e. beta = 1 (Lin's F_lcs with
// beta = 1, not the summary-level ROUGE-Lsum). All three are 0 when either
// side is empty. Tokens compare exactly (case-sensitive, no stemming).
RougeScore rouge_l_tokens(const std::vector<std::string>& hyp, const std::vector<std::string>& ref);

// Corpus ROUGE-L F-measure: for each hypothesis the best F over its
// references (rouge-score's score_multi keeps the reference with the highest
// F), then the plain mean over hypotheses (rouge-score's BootstrapAggregator
// reports a bootstrap-resampled estimate of this mean instead). Text is tokenized by split_words(), case-sensitive
// with punctuation kept; rouge-score's default tokenizer instead lowercases
// and drops everything but [a-z0-9], so scores on punctuated or cased text
// differ. Throws std::invalid_argument as corpus_bleu().
double corpus_rouge_l(const std::vector<std::string>& hyps, const std::vector<std::vector<std::string>>& refs);

// For each slot, the values it can take and the surface forms that realize
// them, e.g. forms["familyFriendly"]["no"] = {"not family friendly", ...}.
using SlotLexicon = std::map<std::string, std::map<std::string, std::vector<std::string>>>;

struct SlotErrorResult {
    double rate = 0;       // (missing + invented) / total
    size_t missing = 0;    // MR values not realized in the hypothesis
    size_t invented = 0;   // other lexicon values the hypothesis mentions
    size_t total = 0;      // slots in all MRs
};

// Slot error rate for table-to-text. Each hypothesis is tokenized with
// split_words(), lowercased (ASCII), and scanned left to right for the
// longest surface form of any lexicon value or MR value (an MR value is
// always one of its own forms); matched tokens are consumed, so "not family
// friendly" is read as familyFriendly[no], never also as [yes]. A matched
// form that realizes any (slot, value) of the MR counts for that pair (a
// venue name realizes both name[X] and near[X]); one that realizes none is
// invented, counted once per distinct value. MR pairs never matched are missing.
SlotErrorResult slot_error_rate(const std::vector<std::string>& hyps,
                                const std::vector<std::map<std::string, std::string>>& mrs,
                                const SlotLexicon& lexicon);

// Fraction of positions where predicted[i] == gold[i] (e.g. label indices
// chosen by scoring each verbalizer word).
double accuracy(const std::vector<int>& predicted, const std::vector<int>& gold);

// Macro-averaged F1 as scikit-learn's f1_score(gold, predicted,
// average="macro") with its default labels and zero_division: the classes
// are the sorted union of the labels in gold and predicted; each class's
// F1 = 2 TP / (2 TP + FP + FN), which equals 2PR / (P + R) with an undefined
// P or R taken as 0, so a gold class never predicted (or a predicted class
// absent from gold) scores 0 and still counts in the unweighted mean.
// Throws std::invalid_argument if the sizes differ or are 0.
double macro_f1(const std::vector<int>& predicted, const std::vector<int>& gold);

// Fraction of hypotheses equal to their reference after trimming leading and
// trailing whitespace.
double exact_match(const std::vector<std::string>& hyps, const std::vector<std::string>& refs);

}  // namespace peftlab::data
