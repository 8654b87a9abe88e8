#pragma once
// Evaluation metrics for the synthetic tasks (datasets/tasks.h).
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

// Corpus BLEU-4 (Papineni et al. 2002), no smoothing. Text is tokenized by
// split_words() (whitespace, and each ASCII punctuation mark is a token),
// case-sensitive. An n-gram's count in a hypothesis is clipped by its largest
// count in any one reference of that sentence. For the brevity penalty each
// sentence contributes the reference length closest to its hypothesis length
// (the shorter one on a tie). refs[i] lists the references of hyps[i].
BleuResult corpus_bleu(const std::vector<std::string>& hyps, const std::vector<std::vector<std::string>>& refs);

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

// Fraction of hypotheses equal to their reference after trimming leading and
// trailing whitespace.
double exact_match(const std::vector<std::string>& hyps, const std::vector<std::string>& refs);

}  // namespace peftlab::data
