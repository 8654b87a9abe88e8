#include "datasets/metrics.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <set>
#include <stdexcept>
#include <string_view>

#include <fmt/format.h>

#include "datasets/tokenizer.h"

namespace peftlab::data {

namespace {

void check_sizes(const char* who, size_t a, const char* a_name, size_t b, const char* b_name) {
    if (a != b) throw std::invalid_argument(fmt::format("{}: {} {} but {} {}", who, a, a_name, b, b_name));
    if (a == 0) throw std::invalid_argument(fmt::format("{}: nothing to score (0 {})", who, a_name));
}

using Ngram = std::vector<std::string>;

std::map<Ngram, size_t> count_ngrams(const std::vector<std::string>& words, size_t n) {
    std::map<Ngram, size_t> counts;
    for (size_t i = 0; i + n <= words.size(); ++i) ++counts[Ngram(words.begin() + i, words.begin() + i + n)];
    return counts;
}

std::vector<std::string> lowercase_words(std::string_view text) {
    auto words = split_words(text);
    for (auto& w : words)
        for (auto& c : w)
            if (c >= 'A' && c <= 'Z') c = char(c - 'A' + 'a');
    return words;
}

std::string_view trim(std::string_view s) {
    const char* ws = " \t\n\r\v\f";
    size_t b = s.find_first_not_of(ws);
    if (b == std::string_view::npos) return {};
    return s.substr(b, s.find_last_not_of(ws) - b + 1);
}

// split_words() of every hypothesis and reference, after checking the sizes
// as corpus_bleu_tokens() does (so errors name the string-level caller).
std::pair<std::vector<std::vector<std::string>>, std::vector<std::vector<std::vector<std::string>>>> tokenize_corpus(
    const char* who, const std::vector<std::string>& hyps, const std::vector<std::vector<std::string>>& refs) {
    check_sizes(who, hyps.size(), "hypotheses", refs.size(), "reference lists");
    std::vector<std::vector<std::string>> hyp_words;
    std::vector<std::vector<std::vector<std::string>>> ref_words(refs.size());
    for (size_t s = 0; s < hyps.size(); ++s) {
        if (refs[s].empty()) throw std::invalid_argument(fmt::format("{}: hypothesis {} has no references", who, s));
        hyp_words.push_back(split_words(hyps[s]));
        for (const auto& ref : refs[s]) ref_words[s].push_back(split_words(ref));
    }
    return {std::move(hyp_words), std::move(ref_words)};
}

}  // namespace

BleuResult corpus_bleu(const std::vector<std::string>& hyps, const std::vector<std::vector<std::string>>& refs) {
    auto [hyp_words, ref_words] = tokenize_corpus("corpus_bleu", hyps, refs);
    return corpus_bleu_tokens(hyp_words, ref_words);
}

BleuResult corpus_bleu_tokens(const std::vector<std::vector<std::string>>& hyps,
                              const std::vector<std::vector<std::vector<std::string>>>& refs) {
    check_sizes("corpus_bleu_tokens", hyps.size(), "hypotheses", refs.size(), "reference lists");
    BleuResult r;
    for (size_t s = 0; s < hyps.size(); ++s) {
        if (refs[s].empty())
            throw std::invalid_argument(fmt::format("corpus_bleu_tokens: hypothesis {} has no references", s));
        const auto& hyp = hyps[s];
        const auto& ref_words = refs[s];

        size_t closest = ref_words[0].size();
        for (const auto& rw : ref_words) {
            auto dist = [&](size_t len) { return len > hyp.size() ? len - hyp.size() : hyp.size() - len; };
            if (dist(rw.size()) < dist(closest) || (dist(rw.size()) == dist(closest) && rw.size() < closest))
                closest = rw.size();
        }
        r.hyp_len += hyp.size();
        r.ref_len += closest;

        for (size_t n = 1; n <= 4; ++n) {
            std::map<Ngram, size_t> max_ref;
            for (const auto& rw : ref_words)
                for (const auto& [g, c] : count_ngrams(rw, n)) max_ref[g] = std::max(max_ref[g], c);
            for (const auto& [g, c] : count_ngrams(hyp, n)) {
                auto it = max_ref.find(g);
                r.matches[n - 1] += std::min(c, it == max_ref.end() ? size_t{0} : it->second);
                r.totals[n - 1] += c;
            }
        }
    }

    double log_sum = 0;
    bool any_zero = false;
    for (size_t n = 0; n < 4; ++n) {
        r.precisions[n] = r.totals[n] ? double(r.matches[n]) / double(r.totals[n]) : 0.0;
        if (r.matches[n] == 0) any_zero = true;
        else log_sum += std::log(r.precisions[n]);
    }
    if (r.hyp_len == 0) return r;  // BLEU and BP stay 0: nothing was generated
    r.brevity_penalty = r.hyp_len > r.ref_len ? 1.0 : std::exp(1.0 - double(r.ref_len) / double(r.hyp_len));
    r.bleu = any_zero ? 0.0 : r.brevity_penalty * std::exp(log_sum / 4.0);
    return r;
}

RougeScore rouge_l_tokens(const std::vector<std::string>& hyp, const std::vector<std::string>& ref) {
    RougeScore r;
    if (hyp.empty() || ref.empty()) return r;
    // Classic LCS dynamic programme over one row: prev[j] = LCS(hyp[0, i), ref[0, j)).
    std::vector<size_t> prev(ref.size() + 1, 0), cur(ref.size() + 1, 0);
    for (size_t i = 1; i <= hyp.size(); ++i) {
        for (size_t j = 1; j <= ref.size(); ++j)
            cur[j] = hyp[i - 1] == ref[j - 1] ? prev[j - 1] + 1 : std::max(prev[j], cur[j - 1]);
        std::swap(prev, cur);
    }
    r.lcs = prev[ref.size()];
    r.precision = double(r.lcs) / double(hyp.size());
    r.recall = double(r.lcs) / double(ref.size());
    if (r.precision + r.recall > 0) r.fmeasure = 2 * r.precision * r.recall / (r.precision + r.recall);
    return r;
}

double corpus_rouge_l(const std::vector<std::string>& hyps, const std::vector<std::vector<std::string>>& refs) {
    auto [hyp_words, ref_words] = tokenize_corpus("corpus_rouge_l", hyps, refs);
    double sum = 0;
    for (size_t s = 0; s < hyp_words.size(); ++s) {
        double best = 0;
        for (const auto& ref : ref_words[s]) best = std::max(best, rouge_l_tokens(hyp_words[s], ref).fmeasure);
        sum += best;
    }
    return sum / double(hyp_words.size());
}

SlotErrorResult slot_error_rate(const std::vector<std::string>& hyps,
                                const std::vector<std::map<std::string, std::string>>& mrs,
                                const SlotLexicon& lexicon) {
    check_sizes("slot_error_rate", hyps.size(), "hypotheses", mrs.size(), "MRs");
    using Pair = std::pair<std::string, std::string>;  // (slot, value)

    // Lowercased token sequence of a surface form -> the (slot, value) pairs
    // it realizes. The lexicon's map is built once; each MR adds a small map
    // of its own values, looked up alongside it.
    std::map<std::vector<std::string>, std::set<Pair>> lexicon_forms;
    for (const auto& [slot, values] : lexicon)
        for (const auto& [value, forms] : values) {
            lexicon_forms[lowercase_words(value)].insert({slot, value});
            for (const auto& f : forms) lexicon_forms[lowercase_words(f)].insert({slot, value});
        }

    size_t lexicon_longest = 0;
    for (const auto& [f, pairs] : lexicon_forms) lexicon_longest = std::max(lexicon_longest, f.size());

    SlotErrorResult r;
    for (size_t s = 0; s < hyps.size(); ++s) {
        const auto& mr = mrs[s];
        std::map<std::vector<std::string>, std::set<Pair>> mr_forms;
        size_t longest = lexicon_longest;
        for (const auto& [slot, value] : mr) {
            auto form = lowercase_words(value);
            longest = std::max(longest, form.size());
            mr_forms[std::move(form)].insert({slot, value});
        }
        // The (slot, value) pairs realized by words[i, i+len); empty if none.
        auto realized_by = [&](const std::vector<std::string>& words, size_t i, size_t len) {
            std::vector<std::string> form(words.begin() + i, words.begin() + i + len);
            std::set<Pair> pairs;
            if (auto it = lexicon_forms.find(form); it != lexicon_forms.end()) pairs = it->second;
            if (auto it = mr_forms.find(form); it != mr_forms.end()) pairs.insert(it->second.begin(), it->second.end());
            return pairs;
        };

        const auto words = lowercase_words(hyps[s]);
        std::set<Pair> realized, invented;
        for (size_t i = 0; i < words.size();) {
            std::set<Pair> match;
            size_t len = std::min(longest, words.size() - i);
            for (; len > 0; --len)
                if (!(match = realized_by(words, i, len)).empty()) break;
            if (match.empty()) {
                ++i;
                continue;
            }
            i += len;
            bool in_mr = false;
            for (const auto& p : match) {
                auto it = mr.find(p.first);
                if (it != mr.end() && it->second == p.second) {
                    realized.insert(p);
                    in_mr = true;
                }
            }
            if (!in_mr) invented.insert(*match.begin());
        }
        for (const auto& p : mr)
            if (!realized.count(p)) ++r.missing;
        r.invented += invented.size();
        r.total += mr.size();
    }
    r.rate = r.total ? double(r.missing + r.invented) / double(r.total) : 0.0;
    return r;
}

double accuracy(const std::vector<int>& predicted, const std::vector<int>& gold) {
    check_sizes("accuracy", predicted.size(), "predictions", gold.size(), "gold labels");
    size_t hits = 0;
    for (size_t i = 0; i < gold.size(); ++i) hits += predicted[i] == gold[i];
    return double(hits) / double(gold.size());
}

double macro_f1(const std::vector<int>& predicted, const std::vector<int>& gold) {
    check_sizes("macro_f1", predicted.size(), "predictions", gold.size(), "gold labels");
    struct Counts {
        size_t tp = 0, fp = 0, fn = 0;
    };
    std::map<int, Counts> per_class;  // every label seen in gold or predicted
    for (size_t i = 0; i < gold.size(); ++i) {
        if (predicted[i] == gold[i]) {
            ++per_class[gold[i]].tp;
        } else {
            ++per_class[predicted[i]].fp;
            ++per_class[gold[i]].fn;
        }
    }
    double sum = 0;
    for (const auto& [label, c] : per_class) sum += 2.0 * double(c.tp) / double(2 * c.tp + c.fp + c.fn);
    return sum / double(per_class.size());
}

double exact_match(const std::vector<std::string>& hyps, const std::vector<std::string>& refs) {
    check_sizes("exact_match", hyps.size(), "hypotheses", refs.size(), "references");
    size_t hits = 0;
    for (size_t i = 0; i < refs.size(); ++i) hits += trim(hyps[i]) == trim(refs[i]);
    return double(hits) / double(refs.size());
}

}  // namespace peftlab::data
