#pragma once
// GPT-2's byte-level BPE tokenizer (Radford et al. 2019; OpenAI's
// gpt-2/src/encoder.py, Hugging Face's GPT2Tokenizer), read from the files
// that ship with every GPT-2 checkpoint.
//
// encode(text):
//   1. "<|endoftext|>" anywhere in the text becomes the one id of that token
//      (50256 in GPT-2's files), as Hugging Face's GPT2Tokenizer and
//      tokenizers do; the text between occurrences is encoded on its own.
//   2. Each piece is split by GPT-2's pre-tokenizer pattern
//        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//      with PCRE2 in UTF + UCP mode (Unicode letters, numbers and the Unicode
//      White_Space property, from PCRE2's tables).
//   3. Each word's bytes map to GPT-2's printable byte symbols (bytes_to_unicode
//      in encoder.py), and adjacent symbols are merged by merge rank (lowest
//      first) until no listed merge applies; the symbols are then vocab ids.
//   Invalid UTF-8 is never rejected: PCRE2_MATCH_INVALID_UTF makes invalid
//   sequences unmatchable, and each maximal run of bytes that no match covers is
//   BPE-encoded as a word of its own, so every byte string has an encoding.
//   (OpenAI's and Hugging Face's encoders take Unicode strings and have no
//   such input; on valid UTF-8 the two rules never differ.)
// decode(ids): concatenates the ids' bytes. decode(encode(s)) == s for every
//   byte string s that does not contain "<|endoftext|>" (decode skips that id,
//   as the Tokenizer contract asks for PAD/BOS/EOS); decode(ids, true) writes
//   it back, so decode(encode(s), true) == s for every byte string s.
//
// Words up to kMaxCachedWordBytes are cached (word -> ids), so encoding prose
// costs about one regex match and one hash look-up per word. The cache is
// locked: encode() and decode() may run on several threads at once.
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "datasets/tokenizer.h"

namespace peftlab::data {

class GPT2Tokenizer final : public Tokenizer {
public:
    static constexpr std::string_view kEndOfText = "<|endoftext|>";
    static constexpr size_t kMaxCachedWordBytes = 64;

    // Loads a directory holding either Hugging Face's names, vocab.json +
    // merges.txt, or OpenAI's names for the same files, encoder.json +
    // vocab.bpe (vocab.json is tried first). Throws std::runtime_error naming
    // the file and the key or line for: a missing or unreadable file, JSON
    // that does not parse, a vocab that is not an object of string -> integer,
    // a duplicated key, an id outside [0, entries) or given twice, a token that
    // is not made of byte symbols, a byte with no token, no "<|endoftext|>"
    // token, a merges line that is not two symbols, a merge repeated, a merge
    // of a symbol that is not in the vocab or whose result is not, and a token
    // (besides the byte tokens and "<|endoftext|>") that no merge makes: a
    // truncated or foreign merges file.
    static GPT2Tokenizer from_dir(const std::string& dir);

    // The same from file contents; vocab_name / merges_name name the sources
    // in error messages.
    static GPT2Tokenizer from_strings(std::string_view vocab_json, std::string_view merges_txt,
                                      const std::string& vocab_name = "vocab.json",
                                      const std::string& merges_name = "merges.txt");

    std::vector<int32_t> encode(std::string_view text) const override;
    // Skips "<|endoftext|>" (the PAD/BOS/EOS id); an id outside
    // [0, vocab_size()) throws std::out_of_range naming the id and position.
    std::string decode(const std::vector<int32_t>& ids) const override;
    // keep_special = true writes "<|endoftext|>" for its id (HF's
    // skip_special_tokens=False): the exact inverse of encode().
    std::string decode(const std::vector<int32_t>& ids, bool keep_special) const;

    int32_t vocab_size() const override;
    // GPT-2 has one special token, "<|endoftext|>", used as PAD, BOS and EOS
    // (Hugging Face sets all three to it).
    int32_t pad_id() const override { return eot_id(); }
    int32_t bos_id() const override { return eot_id(); }
    int32_t eos_id() const override { return eot_id(); }
    int32_t eot_id() const;

    // The bytes of token `id` (not its byte-symbol spelling); throws
    // std::out_of_range outside [0, vocab_size()).
    const std::string& token_bytes(int32_t id) const;
    // Number of merges (50000 for GPT-2).
    size_t num_merges() const;
    // Token `id` spelled as its vocab.json key: its bytes as GPT-2's byte symbols
    // (bytes_to_unicode), UTF-8; " the" is "\u0120the". Throws std::out_of_range as token_bytes.
    std::string token_symbols(int32_t id) const;
    // The merge of rank `rank` as its merges.txt line: "left right" in byte symbols.
    // Throws std::out_of_range outside [0, num_merges()).
    std::string merge_symbols(size_t rank) const;

    // {"type": "gpt2", "dir": absolute directory (empty when built with
    // from_strings), "vocab_file", "merges_file": the names found,
    // "fingerprint": 16 hex digits of FNV-1a 64 over the parsed vocabulary
    // (id -> token) and merge list}. tokenizer_from_json reloads "dir" and
    // throws if the fingerprint differs, so a model trained with one
    // vocabulary never silently runs with another, while the same vocabulary
    // under OpenAI's or Hugging Face's file names (or reformatted JSON) is
    // accepted. A from_strings tokenizer has no directory and cannot be
    // rebuilt from JSON.
    nlohmann::json to_json() const override;
    bool open_vocabulary() const override { return true; }
    const std::string& fingerprint() const;

    struct Impl;

private:
    explicit GPT2Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
    std::shared_ptr<const Impl> impl_;  // immutable tables; copies share them and the word cache
};

}  // namespace peftlab::data
