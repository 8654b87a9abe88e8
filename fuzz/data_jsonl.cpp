// libFuzzer target: the JSON Lines reader (data::parse_jsonl) and the field
// lookup the task loaders use. Input: the file's bytes. A table that parses
// must have rows on increasing lines, each naming only columns of the table;
// every lookup of a column returns text or throws std::runtime_error naming
// the file (never anything else).
#include <string>
#include <string_view>

#include "datasets/files.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    using namespace peftlab;
    const std::string_view text(reinterpret_cast<const char*>(data), size);
    data::Table t;
    try {
        t = data::parse_jsonl(text, "fuzz.jsonl");
    } catch (const std::runtime_error&) {
        return 0;
    }
    if (t.rows.empty()) __builtin_trap();
    size_t last_line = 0;
    for (const data::Row& r : t.rows) {
        if (r.line <= last_line) __builtin_trap();
        last_line = r.line;
        for (const std::string& c : t.columns) {
            try {
                const std::string& v = t.field(r, c);
                if (v.empty()) __builtin_trap();
            } catch (const std::runtime_error& e) {
                if (std::string_view(e.what()).rfind("fuzz.jsonl:", 0) != 0) __builtin_trap();
            }
        }
    }
    return 0;
}
