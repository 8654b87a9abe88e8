#pragma once
// JSON read from files (safetensors headers, checkpoint metadata, adapter and
// tokenizer configs): parsing with the nesting depth bounded, and values
// quoted in error messages with their length bounded.
//
// nlohmann::json parses iteratively, but dump(), comparison and the
// destructor's fallbacks recurse over the value: a file of a million '['
// would overflow the stack there. No file we read nests deeper than a few
// levels, so kMaxJsonDepth leaves ample room. Strings and arrays are bounded
// by the text itself, which every caller bounds by its file size.
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace peftlab {

inline constexpr int kMaxJsonDepth = 64;
// The most a JSON config beside a model or adapter may hold (a few KB in
// practice; a shard index of a large model, a few hundred).
inline constexpr size_t kMaxConfigFileBytes = size_t(16) << 20;

// Parses `text`; throws std::runtime_error "<what>: not valid JSON (...)",
// "<what>: JSON nested deeper than 64 levels" or "<what>: duplicate key 'k'"
// (RFC 8259 leaves duplicates to the reader; nlohmann keeps the last one, so a
// file could say two things and mean one without a word).
nlohmann::json parse_json_limited(std::string_view text, std::string_view what);

// The whole of a small side file (a JSON config, a tokenizer's files). Refuses
// a path that is not a regular file (a directory; a FIFO, whose open would
// block; /dev/zero) and a file of more than max_bytes, reading at most
// max_bytes + 1 bytes whatever its size said. Errors: std::runtime_error
// "<who>: '<path>': <why>".
std::string read_small_file(const std::string& path, size_t max_bytes, std::string_view who);

// v.dump(), cut to at most `max_chars` characters (with "..." appended when
// cut), for error messages that quote a value from a file.
std::string json_excerpt(const nlohmann::json& v, size_t max_chars = 80);

}  // namespace peftlab
