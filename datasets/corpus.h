#pragma once
// Plain-text corpora for language-model pretraining.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace peftlab::data {

struct TextSplit {
    std::string train, valid;  // non-blank lines, each ending in '\n', in file order
};

// Reads a UTF-8 text file and splits it by lines: a seeded shuffle picks
// round(valid_fraction * lines) lines for `valid` (at least one line stays in
// `train`); both splits keep the file's line order. Blank lines are dropped
// and a trailing '\r' (CRLF files) is removed. valid_fraction must be in
// [0, 1) (std::invalid_argument otherwise). Throws std::runtime_error naming
// the path if the file is missing or unreadable, empty (no non-blank line),
// or not text (a NUL byte or invalid UTF-8, with the byte offset).
TextSplit load_text_corpus(const std::string& path, double valid_fraction, uint64_t seed);

// Byte offset where the first invalid UTF-8 sequence starts (a stray or
// impossible byte, a lead byte without its continuation bytes, an overlong
// form, a surrogate or a code point above U+10FFFF); std::nullopt if all of
// text is valid. Pointing at the lead byte makes Latin-1 text report its
// first accented letter ("caf\xE9" -> 3).
std::optional<size_t> find_invalid_utf8(std::string_view text);

}  // namespace peftlab::data
