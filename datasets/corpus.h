#pragma once
// Plain-text corpora for language-model pretraining.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace peftlab::data {

// The largest corpus file read. A run holds the text several times over (the
// file, its two splits, the harness's concatenation of them) and, under the
// byte tokenizer, 4 bytes of token id per byte; 1 GiB keeps that to a few GiB,
// and a byte-level stream under the 2^32 window offsets make_lm_batch draws.
inline constexpr size_t kMaxCorpusBytes = size_t(1) << 30;

struct TextSplit {
    std::string train, valid;  // non-blank lines, each ending in '\n', in file order
};

// Reads a UTF-8 text file and splits it by lines: a seeded shuffle picks
// round(valid_fraction * lines) lines for `valid` (at least one line stays in
// `train`); both splits keep the file's line order. A leading byte-order mark
// is skipped, blank lines are dropped and a trailing '\r' (CRLF files) is
// removed. valid_fraction must be in [0, 1) (std::invalid_argument otherwise).
// Throws std::runtime_error naming the path if the file is missing, not a
// regular file (a directory, a FIFO, a device), unreadable, larger than
// kMaxCorpusBytes (refused by its size, and while reading whatever the size
// said), empty (no non-blank line), or not text (a NUL byte or invalid UTF-8,
// with the byte offset from the file's start).
TextSplit load_text_corpus(const std::string& path, double valid_fraction, uint64_t seed);

// Byte offset where the first invalid UTF-8 sequence starts (a stray or
// impossible byte, a lead byte without its continuation bytes, an overlong
// form, a surrogate or a code point above U+10FFFF); std::nullopt if all of
// text is valid. Pointing at the lead byte makes Latin-1 text report its
// first accented letter ("caf\xE9" -> 3).
std::optional<size_t> find_invalid_utf8(std::string_view text);

}  // namespace peftlab::data
