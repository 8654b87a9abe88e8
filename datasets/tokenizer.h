#pragma once
// Tokenizers map text to int32 ids and back. encode() never adds BOS/EOS: the
// callers that frame sequences (datasets/batch.h) add them, so that framing is
// decided in one place.
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

namespace peftlab::data {

class Tokenizer {
public:
    virtual ~Tokenizer() = default;

    virtual std::vector<int32_t> encode(std::string_view text) const = 0;
    // Special ids (PAD, BOS, EOS) are skipped; an id outside [0, vocab_size)
    // throws std::out_of_range naming the id and its position.
    virtual std::string decode(const std::vector<int32_t>& ids) const = 0;

    virtual int32_t vocab_size() const = 0;
    virtual int32_t pad_id() const = 0;
    virtual int32_t bos_id() const = 0;
    virtual int32_t eos_id() const = 0;

    // Everything needed to rebuild the tokenizer with tokenizer_from_json.
    virtual nlohmann::json to_json() const = 0;

    // True when every UTF-8 text encodes without an unknown token (byte-level,
    // GPT-2 BPE); false for a word vocabulary built from a corpus.
    virtual bool open_vocabulary() const = 0;
    // The id text outside a closed vocabulary encodes to; -1 for an open one.
    virtual int32_t unk_id() const { return -1; }
};

// Rebuilds a tokenizer saved with to_json(); a missing or malformed key
// throws std::runtime_error naming the key and the bad value.
std::unique_ptr<Tokenizer> tokenizer_from_json(const nlohmann::json& j);

// Vocabulary of exactly 256 ids where id == byte value. Bytes 0, 1, 2 are
// control characters that never occur in text, so they double as PAD, BOS
// and EOS; encoding text that contains them throws std::invalid_argument.
class ByteTokenizer final : public Tokenizer {
public:
    static constexpr int32_t kPad = 0, kBos = 1, kEos = 2;

    std::vector<int32_t> encode(std::string_view text) const override;
    std::string decode(const std::vector<int32_t>& ids) const override;
    int32_t vocab_size() const override { return 256; }
    int32_t pad_id() const override { return kPad; }
    int32_t bos_id() const override { return kBos; }
    int32_t eos_id() const override { return kEos; }
    nlohmann::json to_json() const override;
    bool open_vocabulary() const override { return true; }
};

// Splits text into words and punctuation: runs of ASCII letters/digits and
// non-ASCII bytes (so UTF-8 letters such as "é" or "£" stay inside words)
// form one token; every other non-space ASCII character is a token of its
// own. "a cheap, family-friendly café." -> a | cheap | , | family | - |
// friendly | café | .   Shared by WordTokenizer, BLEU and the slot matcher.
std::vector<std::string> split_words(std::string_view text);

// Joins split_words() tokens back with single spaces, except none before
// closing punctuation (. , ! ? ; : ) ] } %), none after opening brackets
// (( [ {) and none on either side of the joiners ' - /. decode() of encode()
// therefore restores text whose spacing follows these conventions exactly.
std::string join_words(const std::vector<std::string>& words);

// Word-level vocabulary built from a corpus. Ids 0..3 are <pad>, <bos>,
// <eos>, <unk>; the rest are the corpus tokens by count (descending), ties
// broken lexicographically, so the same corpus always gives the same ids.
// Case is kept. Line breaks are whitespace and do not survive encoding.
class WordTokenizer final : public Tokenizer {
public:
    static constexpr int32_t kPad = 0, kBos = 1, kEos = 2, kUnk = 3;

    // max_vocab counts the 4 specials; tokens seen fewer than min_count
    // times map to <unk>.
    static WordTokenizer build(std::string_view corpus, int32_t max_vocab, int32_t min_count = 1);
    // tokens[i] is the string of id i; tokens[0..3] must be the specials.
    explicit WordTokenizer(std::vector<std::string> tokens);

    std::vector<int32_t> encode(std::string_view text) const override;
    std::string decode(const std::vector<int32_t>& ids) const override;
    int32_t vocab_size() const override { return int32_t(tokens_.size()); }
    int32_t pad_id() const override { return kPad; }
    int32_t bos_id() const override { return kBos; }
    int32_t eos_id() const override { return kEos; }
    int32_t unk_id() const override { return kUnk; }
    nlohmann::json to_json() const override;
    bool open_vocabulary() const override { return false; }

    const std::vector<std::string>& tokens() const { return tokens_; }

private:
    std::vector<std::string> tokens_;
    std::unordered_map<std::string, int32_t> ids_;
};

}  // namespace peftlab::data
