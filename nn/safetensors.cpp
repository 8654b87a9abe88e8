#include "nn/safetensors.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>
#include <stdexcept>
#include <tuple>

#include <csignal>
#include <cstdlib>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "autograd/half.h"
#include "nn/atomic_file.h"
#include "nn/json_limits.h"

namespace peftlab {
namespace {

using nlohmann::json;

// The format is little-endian on disk and we read/write float buffers directly.
static_assert(std::endian::native == std::endian::little, "safetensors I/O assumes a little-endian host");

// A corrupt length prefix must not make us allocate gigabytes; real headers are kilobytes.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

// bfloat16 is the top half of a float32.
float bf16_to_float(uint16_t h) { return std::bit_cast<float>(uint32_t(h) << 16); }

// The dtypes we load. 16-bit ones are widened to float on load; F32 (widen == nullptr) is
// read straight into the output buffer.
struct Dtype {
    std::string_view name;
    size_t size;
    float (*widen)(uint16_t);
};
constexpr Dtype kDtypes[] = {{"F32", 4, nullptr}, {"F16", 2, half_to_float}, {"BF16", 2, bf16_to_float}};

// Element count of `shape`, or nullopt when it does not fit in 64 bits.
std::optional<uint64_t> element_count(const std::vector<int64_t>& shape) {
    if (std::find(shape.begin(), shape.end(), 0) != shape.end()) return 0;
    uint64_t n = 1;
    for (int64_t d : shape)
        if (__builtin_mul_overflow(n, uint64_t(d), &n)) return std::nullopt;
    return n;
}

struct Entry {
    std::string name;
    const Dtype* dtype;
    std::vector<int64_t> shape;
    uint64_t begin, end;  // byte range within the data section
};

// Parses and checks one header entry against the data section size (data_size bytes).
// `fail` builds the exception; messages here name the tensor and field.
template <class Fail>
Entry parse_entry(const std::string& name, const json& v, uint64_t data_size, const Fail& fail) {
    const auto bad = [&](std::string_view what) { return fail(fmt::format("tensor '{}': {}", name, what)); };
    if (!v.is_object()) throw bad(fmt::format("entry is a {}, not an object", v.type_name()));
    for (const auto& [field, _] : v.items())
        if (field != "dtype" && field != "shape" && field != "data_offsets")
            throw bad(fmt::format("unknown field \"{}\"", field));
    for (const char* field : {"dtype", "shape", "data_offsets"})
        if (!v.contains(field)) throw bad(fmt::format("missing field \"{}\"", field));

    Entry e{name, nullptr, {}, 0, 0};

    const json& dt = v["dtype"];
    if (!dt.is_string()) throw bad(fmt::format("\"dtype\" is a {}, not a string", dt.type_name()));
    const std::string& dts = dt.get_ref<const std::string&>();
    for (const Dtype& d : kDtypes)
        if (d.name == dts) e.dtype = &d;
    if (!e.dtype) {
        std::string supported;
        for (const Dtype& d : kDtypes) supported += fmt::format("{}{}", supported.empty() ? "" : ", ", d.name);
        throw bad(fmt::format("unsupported dtype \"{}\" (supported: {})", dts, supported));
    }

    const json& sh = v["shape"];
    if (!sh.is_array()) throw bad(fmt::format("\"shape\" is a {}, not an array of integers", sh.type_name()));
    for (const json& d : sh) {
        if (!d.is_number_integer())
            throw bad(fmt::format("\"shape\" {} has a non-integer element {}", json_excerpt(sh), json_excerpt(d)));
        if (d.is_number_unsigned() ? d.get<uint64_t>() > uint64_t(INT64_MAX) : d.get<int64_t>() < 0)
            throw bad(fmt::format("\"shape\" {} has a negative or out-of-range dimension {}", json_excerpt(sh), json_excerpt(d)));
        e.shape.push_back(d.get<int64_t>());
    }

    const json& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
        throw bad(fmt::format("\"data_offsets\" {} is not [begin, end] with non-negative integers", json_excerpt(off)));
    e.begin = off[0].get<uint64_t>();
    e.end = off[1].get<uint64_t>();
    if (e.end < e.begin) throw bad(fmt::format("\"data_offsets\" [{}, {}] end before begin", e.begin, e.end));
    if (e.end > data_size)
        throw bad(fmt::format("\"data_offsets\" [{}, {}] extend past the {}-byte data section (file truncated?)",
                              e.begin, e.end, data_size));

    const std::optional<uint64_t> numel = element_count(e.shape);
    uint64_t need = 0;
    if (!numel || __builtin_mul_overflow(*numel, uint64_t(e.dtype->size), &need))
        throw bad(fmt::format("shape {} is too large to address", json_excerpt(sh)));
    if (e.end - e.begin != need)
        throw bad(fmt::format("\"data_offsets\" [{}, {}] span {} bytes but {} shape {} needs {}", e.begin, e.end,
                              e.end - e.begin, e.dtype->name, json_excerpt(sh), need));
    return e;
}

// Parses and checks the whole header (header_len bytes of `text`) against a data section of
// data_size bytes: every entry, the metadata, and the tiling rule. Returns the entries sorted
// by offset (file order).
template <class Fail>
std::vector<Entry> parse_header(const std::string& text, uint64_t data_size,
                                std::map<std::string, std::string>& metadata, const Fail& fail) {
    json header;
    try {
        header = parse_json_limited(text, "header");
    } catch (const std::runtime_error& e) {  // syntax errors, numbers too large for a double, nesting
        throw fail(e.what());
    }
    if (!header.is_object()) throw fail(fmt::format("header is a JSON {}, not an object", header.type_name()));

    std::vector<Entry> entries;
    for (const auto& [key, value] : header.items()) {
        if (key != "__metadata__") {
            entries.push_back(parse_entry(key, value, data_size, fail));
            continue;
        }
        if (!value.is_object())
            throw fail(fmt::format("\"__metadata__\" is a {}, not an object", value.type_name()));
        for (const auto& [mk, mv] : value.items()) {
            if (!mv.is_string())
                throw fail(fmt::format("\"__metadata__\" key '{}' is a {}, not a string", mk, mv.type_name()));
            metadata[mk] = mv.template get<std::string>();
        }
    }

    // As in the reference implementation, tensors must tile the data section exactly: sorted by
    // offset, each starts where the previous ends and the last ends at the end of the file.
    std::sort(entries.begin(), entries.end(),
              [](const Entry& a, const Entry& b) { return std::tie(a.begin, a.end) < std::tie(b.begin, b.end); });
    uint64_t pos = 0;
    const Entry* prev = nullptr;
    for (const Entry& e : entries) {
        if (e.begin < pos)
            throw fail(fmt::format("tensors '{}' [{}, {}] and '{}' [{}, {}] overlap", prev->name, prev->begin,
                                   prev->end, e.name, e.begin, e.end));
        if (e.begin > pos)
            throw fail(fmt::format("data bytes [{}, {}) before tensor '{}' belong to no tensor", pos, e.begin, e.name));
        pos = e.end;
        prev = &e;
    }
    if (pos != data_size)
        throw fail(fmt::format("data bytes [{}, {}) after the last tensor belong to no tensor", pos, data_size));

    return entries;
}

}  // namespace

void write_file_atomic(const std::string& path, std::string_view bytes) {
    AtomicFile f("write_file_atomic", path);
    f.write(bytes.data(), bytes.size());
    f.commit();
}

void save_safetensors(const std::string& path, const std::vector<StTensorRef>& tensors,
                      const std::map<std::string, std::string>& metadata) {
    const auto fail = [&](std::string_view what) {
        return std::runtime_error(fmt::format("save_safetensors: '{}': {}", path, what));
    };

    std::vector<const StTensorRef*> order;
    for (const StTensorRef& t : tensors) order.push_back(&t);
    std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->name < b->name; });

    json header = json::object();
    if (!metadata.empty()) header["__metadata__"] = metadata;
    std::vector<uint64_t> bytes;  // per tensor in `order`
    uint64_t offset = 0;
    for (size_t i = 0; i < order.size(); ++i) {
        const StTensorRef& t = *order[i];
        if (t.name == "__metadata__") throw fail("tensor name \"__metadata__\" is reserved for metadata");
        if (i > 0 && order[i - 1]->name == t.name) throw fail(fmt::format("duplicate tensor name '{}'", t.name));
        if (std::any_of(t.shape.begin(), t.shape.end(), [](int64_t d) { return d < 0; }))
            throw fail(fmt::format("tensor '{}': negative dimension in shape {}", t.name, shape_str(t.shape)));
        const std::optional<uint64_t> numel = element_count(t.shape);
        uint64_t n = 0;
        if (!numel || __builtin_mul_overflow(*numel, uint64_t(sizeof(float)), &n))
            throw fail(fmt::format("tensor '{}': shape {} is too large", t.name, shape_str(t.shape)));
        if (n > 0 && t.data == nullptr && !t.fill)
            throw fail(fmt::format("tensor '{}': data is null but shape {} has {} elements", t.name,
                                   shape_str(t.shape), *numel));
        json entry = json::object();
        entry["dtype"] = "F32";
        entry["shape"] = t.shape;
        entry["data_offsets"] = json::array({offset, offset + n});
        header[t.name] = std::move(entry);
        bytes.push_back(n);
        offset += n;
    }

    std::string text;
    try {
        text = header.dump();
    } catch (const json::type_error& e) {  // names or metadata that are not valid UTF-8
        throw fail(fmt::format("cannot encode header: {}", e.what()));
    }
    // Padding keeps the data section 8-byte aligned, so readers can map floats in place.
    text.append((8 - text.size() % 8) % 8, ' ');
    const uint64_t n = text.size();

    AtomicFile f("save_safetensors", path);
    f.write(&n, sizeof n);
    f.write(text.data(), text.size());
    for (size_t i = 0; i < order.size(); ++i) {
        if (!order[i]->fill) {
            f.write(order[i]->data, bytes[i]);
            continue;
        }
        std::vector<float> scratch(bytes[i] / sizeof(float));
        order[i]->fill(scratch.data());
        f.write(scratch.data(), bytes[i]);
    }
    f.commit();
}

namespace {

// Opens `path` read-only and returns the descriptor and the size of the file
// opened (every offset is checked against it). Refuses anything but a regular
// file, and opens without blocking: open() of a FIFO with no writer would
// wait forever. O_NONBLOCK does not change reads of a regular file.
template <class Fail>
int open_regular(const std::string& path, uint64_t& file_size, const Fail& fail) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) throw fail(fmt::format("cannot open: {}", std::strerror(errno)));
    struct stat st {};
    const bool stat_ok = ::fstat(fd, &st) == 0;
    const int err = errno;
    if (!stat_ok || !S_ISREG(st.st_mode)) {
        ::close(fd);
        throw fail(stat_ok ? std::string("not a regular file") : fmt::format("cannot stat: {}", std::strerror(err)));
    }
    file_size = uint64_t(st.st_size);
    return fd;
}

}  // namespace

StFile load_safetensors(const std::string& path) {
    const auto fail = [&](std::string_view what) {
        return std::runtime_error(fmt::format("load_safetensors: '{}': {}", path, what));
    };

    uint64_t file_size = 0;
    const int fd = open_regular(path, file_size, fail);
    std::unique_ptr<std::FILE, int (*)(std::FILE*)> file(::fdopen(fd, "rb"), &std::fclose);
    if (!file) {
        const int err = errno;
        ::close(fd);
        throw fail(fmt::format("cannot open: {}", std::strerror(err)));
    }
    std::FILE* f = file.get();

    const auto read_exact = [&](void* dst, size_t n, std::string_view what) {
        if (n > 0 && std::fread(dst, 1, n, f) != n)
            throw fail(fmt::format("reading {} failed (file changed while loading?)", what));
    };

    if (file_size < 8)
        throw fail(fmt::format("file is {} bytes, too short for the 8-byte header length", file_size));
    uint64_t header_len = 0;
    read_exact(&header_len, sizeof header_len, "header length");
    if (header_len > file_size - 8)
        throw fail(fmt::format("header length {} exceeds the {} bytes after the length prefix", header_len,
                               file_size - 8));
    if (header_len > kMaxHeaderBytes)
        throw fail(fmt::format("header length {} exceeds the {}-byte limit", header_len, kMaxHeaderBytes));
    const uint64_t data_size = file_size - 8 - header_len;

    std::string text(header_len, '\0');
    read_exact(text.data(), text.size(), "header");
    StFile out;
    std::vector<Entry> entries = parse_header(text, data_size, out.metadata, fail);

    // Entries are in file order now, so this reads the data section front to back.
    for (const Entry& e : entries) {
        const size_t numel = (e.end - e.begin) / e.dtype->size;
        StTensor t{e.shape, std::vector<float>(numel)};
        const std::string what = fmt::format("tensor '{}'", e.name);
        if (!e.dtype->widen) {
            read_exact(t.data.data(), e.end - e.begin, what);
        } else {
            std::vector<uint16_t> half(numel);
            read_exact(half.data(), e.end - e.begin, what);
            std::transform(half.begin(), half.end(), t.data.begin(), e.dtype->widen);
        }
        out.tensors.emplace(e.name, std::move(t));
    }
    return out;
}

StMapped::StMapped(const std::string& path) : path_(path) {
    const auto fail = [&](std::string_view what) {
        return std::runtime_error(fmt::format("load_safetensors: '{}': {}", path, what));
    };
    uint64_t file_size = 0;
    fd_ = open_regular(path, file_size, fail);
    try {
        if (file_size < 8)
            throw fail(fmt::format("file is {} bytes, too short for the 8-byte header length", file_size));
        void* m = ::mmap(nullptr, file_size, PROT_READ, MAP_SHARED, fd_, 0);
        if (m == MAP_FAILED) throw fail(fmt::format("cannot mmap: {}", std::strerror(errno)));
        map_ = static_cast<const unsigned char*>(m);
        map_size_ = file_size;
        uint64_t header_len = 0;
        std::memcpy(&header_len, map_, sizeof header_len);
        if (header_len > file_size - 8)
            throw fail(fmt::format("header length {} exceeds the {} bytes after the length prefix", header_len,
                                   file_size - 8));
        if (header_len > kMaxHeaderBytes)
            throw fail(fmt::format("header length {} exceeds the {}-byte limit", header_len, kMaxHeaderBytes));
        data_start_ = 8 + header_len;
        const std::string text(reinterpret_cast<const char*>(map_ + 8), header_len);
        for (const Entry& e : parse_header(text, file_size - data_start_, metadata_, fail)) {
            info_[e.name] = Info{std::string(e.dtype->name), e.shape};
            ranges_[e.name] = Range{e.begin, e.end, e.dtype->size, e.dtype->widen};
        }
    } catch (...) {  // the destructor does not run for a constructor that throws
        if (map_) ::munmap(const_cast<unsigned char*>(map_), map_size_);
        ::close(fd_);
        throw;
    }
}

StMapped::~StMapped() {
    if (map_) ::munmap(const_cast<unsigned char*>(map_), map_size_);
    ::close(fd_);
}

void StMapped::read(const std::string& name, float* dst) const {
    const auto it = ranges_.find(name);
    if (it == ranges_.end())
        throw std::runtime_error(fmt::format("load_safetensors: '{}': no tensor '{}'", path_, name));
    const Range& r = it->second;
    const unsigned char* src = map_ + data_start_ + r.begin;
    const size_t numel = (r.end - r.begin) / r.dtype_size;
    if (!r.widen) {
        std::memcpy(dst, src, numel * sizeof(float));
    } else {
        for (size_t i = 0; i < numel; ++i) {
            uint16_t h;
            std::memcpy(&h, src + 2 * i, 2);  // the data section need not be 2-byte aligned
            dst[i] = r.widen(h);
        }
    }
    // Page-aligned range covering the tensor; neighbours' pages are re-read if needed.
    const uint64_t page = uint64_t(::sysconf(_SC_PAGESIZE));
    const uint64_t lo = (data_start_ + r.begin) / page * page, hi = data_start_ + r.end;
    if (hi > lo) ::madvise(const_cast<unsigned char*>(map_) + lo, hi - lo, MADV_DONTNEED);
}

}  // namespace peftlab
