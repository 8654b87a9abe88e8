// libFuzzer target: the CSV/TSV reader (data::parse_delimited, libcsv in
// strict mode). Input: one byte choosing the delimiter (odd: tab, even:
// comma), then the file's bytes. A table that parses must be rectangular
// (every row has the header's fields), its rows' lines must increase, and
// writing it back with every field quoted (RFC 4180: "" for a quote) must
// parse to the same columns and rows.
#include <string>
#include <string_view>

#include "datasets/files.h"

namespace {

std::string quoted(const std::vector<std::string>& fields, char delim) {
    std::string out;
    for (size_t i = 0; i < fields.size(); ++i) {
        if (i) out += delim;
        out += '"';
        for (char c : fields[i]) out += c == '"' ? std::string("\"\"") : std::string(1, c);
        out += '"';
    }
    return out + "\n";
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    using namespace peftlab;
    if (size == 0) return 0;
    const char delim = (data[0] & 1) ? '\t' : ',';
    const std::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);
    data::Table t;
    try {
        t = data::parse_delimited(text, "fuzz.csv", delim);
    } catch (const std::runtime_error&) {
        return 0;
    }
    size_t last_line = 0;
    for (const data::Row& r : t.rows) {
        if (r.fields.size() != t.columns.size() || r.line <= last_line) __builtin_trap();
        last_line = r.line;
    }
    std::string again = quoted(t.columns, delim);
    for (const data::Row& r : t.rows) {
        std::vector<std::string> fields;
        for (const std::string& c : t.columns) fields.push_back(r.fields.at(c));
        again += quoted(fields, delim);
    }
    data::Table u = data::parse_delimited(again, "again.csv", delim);  // must not throw
    if (u.columns != t.columns || u.rows.size() != t.rows.size()) __builtin_trap();
    for (size_t i = 0; i < t.rows.size(); ++i)
        if (u.rows[i].fields != t.rows[i].fields) __builtin_trap();
    return 0;
}
