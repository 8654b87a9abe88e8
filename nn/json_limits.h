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

// Parses `text`; throws std::runtime_error "<what>: not valid JSON (...)" or
// "<what>: JSON nested deeper than 64 levels".
nlohmann::json parse_json_limited(std::string_view text, std::string_view what);

// v.dump(), cut to at most `max_chars` characters (with "..." appended when
// cut), for error messages that quote a value from a file.
std::string json_excerpt(const nlohmann::json& v, size_t max_chars = 80);

}  // namespace peftlab
