#include "datasets/tokenizer.h"

#include "datasets/gpt2_tokenizer.h"

#include <algorithm>
#include <map>
#include <stdexcept>

#include <fmt/format.h>

namespace peftlab::data {

namespace {

const char* const kSpecialNames[] = {"<pad>", "<bos>", "<eos>", "<unk>"};

bool is_space(unsigned char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }
bool is_word_byte(unsigned char c) {
    return c >= 0x80 || (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

bool attaches_to_previous(const std::string& w) {
    static const std::string closers = ".,!?;:)]}%'-/";
    return w.size() == 1 && closers.find(w[0]) != std::string::npos;
}
bool attaches_to_next(const std::string& w) {
    static const std::string openers = "([{'-/";
    return w.size() == 1 && openers.find(w[0]) != std::string::npos;
}

[[noreturn]] void bad_id(const char* who, int32_t id, size_t pos, int32_t vocab) {
    throw std::out_of_range(
        fmt::format("{}::decode: id {} at position {} is outside the vocabulary [0, {})", who, id, pos, vocab));
}

}  // namespace

std::vector<std::string> split_words(std::string_view text) {
    std::vector<std::string> words;
    size_t i = 0;
    while (i < text.size()) {
        auto c = static_cast<unsigned char>(text[i]);
        if (is_space(c)) {
            ++i;
        } else if (is_word_byte(c)) {
            size_t j = i;
            while (j < text.size() && is_word_byte(static_cast<unsigned char>(text[j]))) ++j;
            words.emplace_back(text.substr(i, j - i));
            i = j;
        } else {
            words.emplace_back(1, text[i]);
            ++i;
        }
    }
    return words;
}

std::string join_words(const std::vector<std::string>& words) {
    std::string out;
    bool glue_next = true;  // no space before the first word
    for (const auto& w : words) {
        if (!glue_next && !attaches_to_previous(w)) out += ' ';
        out += w;
        glue_next = attaches_to_next(w);
    }
    return out;
}

// ---------------------------------------------------------------- ByteTokenizer

std::vector<int32_t> ByteTokenizer::encode(std::string_view text) const {
    std::vector<int32_t> ids(text.size());
    for (size_t i = 0; i < text.size(); ++i) {
        auto b = static_cast<unsigned char>(text[i]);
        if (b <= kEos)
            throw std::invalid_argument(fmt::format(
                "ByteTokenizer::encode: byte 0x{:02x} at position {} collides with a special id "
                "(0=PAD, 1=BOS, 2=EOS); text must not contain these control bytes",
                b, i));
        ids[i] = b;
    }
    return ids;
}

std::string ByteTokenizer::decode(const std::vector<int32_t>& ids) const {
    std::string out;
    out.reserve(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) {
        int32_t id = ids[i];
        if (id < 0 || id >= vocab_size()) bad_id("ByteTokenizer", id, i, vocab_size());
        if (id > kEos) out += static_cast<char>(id);
    }
    return out;
}

nlohmann::json ByteTokenizer::to_json() const { return {{"type", "byte"}}; }

// ---------------------------------------------------------------- WordTokenizer

WordTokenizer WordTokenizer::build(std::string_view corpus, int32_t max_vocab, int32_t min_count) {
    if (max_vocab < 4)
        throw std::invalid_argument(
            fmt::format("WordTokenizer::build: max_vocab {} leaves no room for the 4 special tokens", max_vocab));
    if (min_count < 1)
        throw std::invalid_argument(fmt::format("WordTokenizer::build: min_count {} must be >= 1", min_count));

    std::map<std::string, int64_t> counts;
    for (auto& w : split_words(corpus)) ++counts[std::move(w)];

    std::vector<std::pair<std::string, int64_t>> ranked(counts.begin(), counts.end());
    // counts is a std::map, so ranked starts in lexicographic order and a
    // stable sort by count keeps that order among equal counts.
    std::stable_sort(ranked.begin(), ranked.end(), [](const auto& a, const auto& b) { return a.second > b.second; });

    std::vector<std::string> tokens(std::begin(kSpecialNames), std::end(kSpecialNames));
    for (auto& [word, count] : ranked) {
        if (int32_t(tokens.size()) >= max_vocab || count < min_count) break;
        tokens.push_back(word);
    }
    return WordTokenizer(std::move(tokens));
}

WordTokenizer::WordTokenizer(std::vector<std::string> tokens) : tokens_(std::move(tokens)) {
    if (tokens_.size() < 4)
        throw std::invalid_argument(
            fmt::format("WordTokenizer: {} tokens given, need at least the 4 specials", tokens_.size()));
    for (int32_t i = 0; i < 4; ++i)
        if (tokens_[i] != kSpecialNames[i])
            throw std::invalid_argument(fmt::format("WordTokenizer: token {} must be \"{}\", got \"{}\"", i,
                                                    kSpecialNames[i], tokens_[i]));
    for (size_t i = 0; i < tokens_.size(); ++i) {
        if (tokens_[i].empty()) throw std::invalid_argument(fmt::format("WordTokenizer: token {} is empty", i));
        auto [it, inserted] = ids_.emplace(tokens_[i], int32_t(i));
        if (!inserted)
            throw std::invalid_argument(fmt::format("WordTokenizer: token {} (\"{}\") duplicates token {}", i,
                                                    tokens_[i], it->second));
    }
}

std::vector<int32_t> WordTokenizer::encode(std::string_view text) const {
    std::vector<int32_t> ids;
    for (const auto& w : split_words(text)) {
        auto it = ids_.find(w);
        // The specials' spellings contain '<' and '>', which split_words
        // always separates, so no text can encode to a special id.
        ids.push_back(it == ids_.end() ? kUnk : it->second);
    }
    return ids;
}

std::string WordTokenizer::decode(const std::vector<int32_t>& ids) const {
    std::vector<std::string> words;
    words.reserve(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) {
        int32_t id = ids[i];
        if (id < 0 || id >= vocab_size()) bad_id("WordTokenizer", id, i, vocab_size());
        if (id == kPad || id == kBos || id == kEos) continue;
        words.push_back(tokens_[id]);
    }
    return join_words(words);
}

nlohmann::json WordTokenizer::to_json() const { return {{"type", "word"}, {"tokens", tokens_}}; }

// ---------------------------------------------------------------- from json

std::unique_ptr<Tokenizer> tokenizer_from_json(const nlohmann::json& j) {
    if (!j.is_object()) throw std::runtime_error(fmt::format("tokenizer json: expected an object, got a {}", j.type_name()));
    auto type_it = j.find("type");
    if (type_it == j.end()) throw std::runtime_error("tokenizer json: missing key \"type\"");
    if (!type_it->is_string())
        throw std::runtime_error(fmt::format("tokenizer json: key \"type\" must be a string, got a {}", type_it->type_name()));
    const auto type = type_it->get<std::string>();

    if (type == "byte") return std::make_unique<ByteTokenizer>();
    if (type == "word") {
        auto tok_it = j.find("tokens");
        if (tok_it == j.end()) throw std::runtime_error("tokenizer json: type \"word\" needs key \"tokens\"");
        if (!tok_it->is_array())
            throw std::runtime_error("tokenizer json: key \"tokens\" must be an array of strings");
        std::vector<std::string> tokens;
        for (size_t i = 0; i < tok_it->size(); ++i) {
            const auto& t = (*tok_it)[i];
            if (!t.is_string())
                throw std::runtime_error(fmt::format("tokenizer json: \"tokens\"[{}] must be a string, got a {}", i, t.type_name()));
            tokens.push_back(t.get<std::string>());
        }
        try {
            return std::make_unique<WordTokenizer>(std::move(tokens));
        } catch (const std::invalid_argument& e) {
            throw std::runtime_error(fmt::format("tokenizer json: key \"tokens\": {}", e.what()));
        }
    }
    if (type == "gpt2") {
        // The vocabulary is reloaded from its directory (50k tokens and 50k
        // merges are too large to copy into every saved model) and must have
        // the fingerprint it had when saved.
        auto str = [&](const char* key) {
            auto it = j.find(key);
            if (it == j.end() || !it->is_string() || it->get<std::string>().empty())
                throw std::runtime_error(
                    fmt::format("tokenizer json: type \"gpt2\" needs a non-empty string \"{}\", got {}", key,
                                it == j.end() ? "nothing" : it->dump()));
            return it->get<std::string>();
        };
        const std::string dir = str("dir"), fingerprint = str("fingerprint");
        auto tok = std::make_unique<GPT2Tokenizer>(GPT2Tokenizer::from_dir(dir));
        if (tok->fingerprint() != fingerprint)
            throw std::runtime_error(fmt::format(
                "tokenizer json: the GPT-2 vocabulary in {} has fingerprint {}, but the saved tokenizer's was {} "
                "(its vocab or merges changed since the model was saved)",
                dir, tok->fingerprint(), fingerprint));
        return tok;
    }
    throw std::runtime_error(
        fmt::format("tokenizer json: unknown \"type\" \"{}\" (expected \"byte\", \"word\" or \"gpt2\")", type));
}

}  // namespace peftlab::data
