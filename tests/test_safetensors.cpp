#include "nn/safetensors.h"

#include <cmath>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "tests/testing.h"

using namespace peftlab;
using peftlab::testing::TempDir;
using Catch::Contains;
namespace fs = std::filesystem;

namespace {

std::string read_bytes(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

std::string le64(uint64_t v) {
    std::string s(8, '\0');
    for (int i = 0; i < 8; ++i) s[i] = char((v >> (8 * i)) & 0xff);
    return s;
}

// A file laid out as the format says: u64 header length, header, data. The header is used as
// given (no padding), which readers must accept.
std::string st_bytes(std::string_view header, std::string_view data) {
    return le64(header.size()) + std::string(header) + std::string(data);
}

std::string float_bytes(const std::vector<float>& v) {
    return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
}

std::string u16_bytes(const std::vector<uint16_t>& v) {
    return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(uint16_t));
}

uint32_t bits(float f) { return std::bit_cast<uint32_t>(f); }

// A loadable one-tensor header, "w" of shape [2] F32, for corruption tests to start from.
const std::string kW = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
const std::string kWData = float_bytes({1.0f, 2.0f});

}  // namespace

TEST_CASE("safetensors round trip is bitwise", "[safetensors]") {
    TempDir d;
    const std::string p = d.path("model.safetensors");

    std::vector<float> w(3 * 5 * 7);
    for (size_t i = 0; i < w.size(); ++i) w[i] = std::sin(float(i)) * 1e3f;
    // Values a text or double round trip would mangle.
    w[0] = std::bit_cast<float>(0x7fc01234u);  // NaN with a payload
    w[1] = -0.0f;
    w[2] = std::numeric_limits<float>::infinity();
    w[3] = -std::numeric_limits<float>::infinity();
    w[4] = std::numeric_limits<float>::denorm_min();
    w[5] = std::numeric_limits<float>::max();
    const float bias = 0.25f, scale = -3.5f;
    const std::vector<float> ones(4, 1.0f);

    // Deliberately not in name order; null data is allowed for zero-size tensors.
    const std::vector<StTensorRef> refs = {
        {"scale", {}, &scale},
        {"blocks.0.attn.q_proj.weight", {3, 5, 7}, w.data()},
        {"empty", {0}, nullptr},
        {"bias", {1}, &bias},
        {"empty_middle", {2, 0, 3}, nullptr},
        {"unit_dims", {1, 1, 4, 1}, ones.data()},
    };
    const std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "ünïcode ✓"}, {"empty", ""}};
    save_safetensors(p, refs, meta);

    const StFile f = load_safetensors(p);
    CHECK(f.metadata == meta);
    REQUIRE(f.tensors.size() == refs.size());
    for (const StTensorRef& r : refs) {
        INFO("tensor " << r.name);
        const StTensor& t = f.tensors.at(r.name);
        CHECK(t.shape == r.shape);
        size_t numel = 1;
        for (int64_t dim : r.shape) numel *= size_t(dim);
        REQUIRE(t.data.size() == numel);
        if (numel > 0) CHECK(std::memcmp(t.data.data(), r.data, numel * sizeof(float)) == 0);
    }
    CHECK(bits(f.tensors.at("blocks.0.attn.q_proj.weight").data[0]) == 0x7fc01234u);
    CHECK(d.entries() == std::vector<std::string>{"model.safetensors"});
}

TEST_CASE("safetensors without metadata or tensors", "[safetensors]") {
    TempDir d;
    const std::string p = d.path("x.safetensors");
    const float v = 7.0f;

    SECTION("empty metadata is omitted from the header and loads as empty") {
        save_safetensors(p, {{"v", {1}, &v}});
        const std::string bytes = read_bytes(p);
        CHECK(bytes.find("__metadata__") == std::string::npos);
        const StFile f = load_safetensors(p);
        CHECK(f.metadata.empty());
        CHECK(f.tensors.at("v").data == std::vector<float>{7.0f});
    }
    SECTION("a file with no tensors has an empty data section") {
        save_safetensors(p, {}, {{"step", "0"}});
        const StFile f = load_safetensors(p);
        CHECK(f.tensors.empty());
        CHECK(f.metadata.at("step") == "0");
    }
}

TEST_CASE("safetensors file layout matches the spec", "[safetensors]") {
    TempDir d;
    const std::string p = d.path("layout.safetensors");
    const std::vector<float> a = {3, 4, 5}, b = {1, 2};
    save_safetensors(p, {{"b", {2}, b.data()}, {"a", {1, 3}, a.data()}}, {{"format", "pt"}});

    const std::string bytes = read_bytes(p);
    REQUIRE(bytes.size() >= 8);
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | uint8_t(bytes[i]);
    CHECK(n % 8 == 0);  // keeps the data section 8-byte aligned
    REQUIRE(bytes.size() == 8 + n + 5 * sizeof(float));

    const std::string header = bytes.substr(8, n);
    const size_t json_end = header.find_last_not_of(' ') + 1;
    CHECK(json_end > n - 8);  // padding is under 8 spaces
    CHECK(header.substr(0, json_end) ==
          R"({"__metadata__":{"format":"pt"},)"
          R"("a":{"data_offsets":[0,12],"dtype":"F32","shape":[1,3]},)"
          R"("b":{"data_offsets":[12,20],"dtype":"F32","shape":[2]}})");

    const auto j = nlohmann::json::parse(header);
    CHECK(j.size() == 3);
    CHECK(j["__metadata__"] == nlohmann::json{{"format", "pt"}});
    // Sorted name order, contiguous from offset 0, ending at the end of the file.
    CHECK(j["a"]["data_offsets"] == nlohmann::json::array({0, 12}));
    CHECK(j["b"]["data_offsets"] == nlohmann::json::array({12, 20}));
    CHECK(bytes.substr(8 + n) == float_bytes({3, 4, 5, 1, 2}));
}

TEST_CASE("safetensors loads F16 and BF16 in the reference writer's key order", "[safetensors]") {
    TempDir d;
    // Laid out as the Rust implementation writes it: metadata first, fields in struct order,
    // 16-bit tensors ahead of F32 ones.
    const std::string header =
        R"({"__metadata__":{"format":"pt"},)"
        R"("h":{"dtype":"F16","shape":[2,3],"data_offsets":[0,12]},)"
        R"("g":{"dtype":"BF16","shape":[2],"data_offsets":[12,16]},)"
        R"("f":{"dtype":"F32","shape":[],"data_offsets":[16,20]}})";
    // F16: 1, -2, 65504 (max), 2^-24 (smallest subnormal), -0, inf.  BF16: 1, -3.
    const std::string data = u16_bytes({0x3c00, 0xc000, 0x7bff, 0x0001, 0x8000, 0x7c00}) +
                             u16_bytes({0x3f80, 0xc040}) + float_bytes({0.5f});
    const std::string p = d.file("ref.safetensors", st_bytes(header, data));

    const StFile f = load_safetensors(p);
    const StTensor& h = f.tensors.at("h");
    CHECK(h.shape == std::vector<int64_t>{2, 3});
    REQUIRE(h.data.size() == 6);
    CHECK(h.data[0] == 1.0f);
    CHECK(h.data[1] == -2.0f);
    CHECK(h.data[2] == 65504.0f);
    CHECK(h.data[3] == std::ldexp(1.0f, -24));
    CHECK(bits(h.data[4]) == bits(-0.0f));
    CHECK(h.data[5] == std::numeric_limits<float>::infinity());
    CHECK(std::isnan(load_safetensors(d.file("nan.safetensors",
                                             st_bytes(R"({"n":{"dtype":"F16","shape":[1],"data_offsets":[0,2]}})",
                                                      u16_bytes({0x7e00}))))
                         .tensors.at("n")
                         .data[0]));
    CHECK(f.tensors.at("g").data == std::vector<float>{1.0f, -3.0f});
    CHECK(f.tensors.at("f").shape.empty());
    CHECK(f.tensors.at("f").data == std::vector<float>{0.5f});
    CHECK(f.metadata.at("format") == "pt");
}

// ---- corrupt files: each must throw naming the file and the offending key ----

TEST_CASE("safetensors load rejects a missing file", "[safetensors]") {
    TempDir d;
    const std::string p = d.path("missing.safetensors");
    REQUIRE_THROWS_WITH(load_safetensors(p), Contains(p) && Contains("cannot open"));
}

TEST_CASE("safetensors load rejects a directory", "[safetensors]") {
    TempDir d;
    REQUIRE_THROWS_WITH(load_safetensors(d.dir.string()), Contains(d.dir.string()) && Contains("not a regular file"));
}

// Once, open() of a FIFO without a writer blocked: every loader hung.
TEST_CASE("safetensors load rejects a FIFO without waiting for a writer", "[safetensors]") {
    TempDir d;
    const std::string p = d.path("fifo.safetensors");
    REQUIRE(::mkfifo(p.c_str(), 0600) == 0);
    REQUIRE_THROWS_WITH(load_safetensors(p), Contains(p) && Contains("not a regular file"));
    REQUIRE_THROWS_WITH(StMapped{p}, Contains(p) && Contains("not a regular file"));
}

TEST_CASE("safetensors load rejects a file shorter than the length prefix", "[safetensors]") {
    TempDir d;
    const std::string p = d.file("short.safetensors", std::string(7, '\0'));
    REQUIRE_THROWS_WITH(load_safetensors(p), Contains(p) && Contains("7 bytes"));
}

TEST_CASE("safetensors load rejects a header length past the end of the file", "[safetensors]") {
    TempDir d;
    const std::string p = d.file("long.safetensors", le64(1000) + kW);
    REQUIRE_THROWS_WITH(load_safetensors(p), Contains(p) && Contains("header length 1000"));
    const std::string q = d.file("huge.safetensors", le64(~0ull) + kW);
    REQUIRE_THROWS_WITH(load_safetensors(q), Contains(q) && Contains("header length 18446744073709551615"));
}

TEST_CASE("safetensors load rejects a header length over 100 MB", "[safetensors]") {
    TempDir d;
    // Sparse: the file is big enough that only the size limit can reject it, yet costs no disk.
    const std::string p = d.file("big.safetensors", le64(150ull << 20));
    fs::resize_file(p, 8 + (200ull << 20));
    REQUIRE_THROWS_WITH(load_safetensors(p), Contains(p) && Contains("header length 157286400") &&
                                                 Contains("104857600-byte limit"));
}

TEST_CASE("safetensors load rejects a header that is not JSON", "[safetensors]") {
    TempDir d;
    SECTION("cut off mid-object") {
        const std::string p = d.file("bad.safetensors", st_bytes(R"({"w":{"dtype":"F32",)", kWData));
        REQUIRE_THROWS_WITH(load_safetensors(p), Contains(p) && Contains("not valid JSON"));
    }
    SECTION("a number too large for a double") {  // nlohmann reports this as out_of_range, not parse_error
        const std::string p = d.file("bad.safetensors", st_bytes(R"({"w":1e400})", kWData));
        REQUIRE_THROWS_WITH(load_safetensors(p), Contains(p) && Contains("not valid JSON") && Contains("1e400"));
    }
}

TEST_CASE("safetensors load rejects a header that is not an object", "[safetensors]") {
    TempDir d;
    const std::string p = d.file("bad.safetensors", st_bytes("[1, 2]  ", ""));
    REQUIRE_THROWS_WITH(load_safetensors(p), Contains(p) && Contains("header is a JSON array"));
}

TEST_CASE("safetensors load rejects non-string metadata", "[safetensors]") {
    TempDir d;
    SECTION("metadata is not an object") {
        const std::string p = d.file("bad.safetensors", st_bytes(R"({"__metadata__":["pt"]})", ""));
        REQUIRE_THROWS_WITH(load_safetensors(p), Contains(p) && Contains("\"__metadata__\" is a array"));
    }
    SECTION("a metadata value is a number") {
        const std::string p =
            d.file("bad.safetensors", st_bytes(R"({"__metadata__":{"format":"pt","step":100}})", ""));
        REQUIRE_THROWS_WITH(load_safetensors(p), Contains(p) && Contains("key 'step' is a number"));
    }
}

TEST_CASE("safetensors load rejects an entry that is not an object", "[safetensors]") {
    TempDir d;
    const std::string p = d.file("bad.safetensors", st_bytes(R"({"w":"F32"})", ""));
    REQUIRE_THROWS_WITH(load_safetensors(p), Contains(p) && Contains("tensor 'w'") && Contains("is a string"));
}

TEST_CASE("safetensors load rejects an entry with a missing field", "[safetensors]") {
    TempDir d;
    const auto check = [&](const std::string& header, const std::string& field) {
        const std::string p = d.file("bad.safetensors", st_bytes(header, kWData));
        REQUIRE_THROWS_WITH(load_safetensors(p),
                            Contains(p) && Contains("tensor 'w'") && Contains("missing field \"" + field + "\""));
    };
    SECTION("dtype") { check(R"({"w":{"shape":[2],"data_offsets":[0,8]}})", "dtype"); }
    SECTION("shape") { check(R"({"w":{"dtype":"F32","data_offsets":[0,8]}})", "shape"); }
    SECTION("data_offsets") { check(R"({"w":{"dtype":"F32","shape":[2]}})", "data_offsets"); }
}

TEST_CASE("safetensors load rejects fields of the wrong JSON type", "[safetensors]") {
    TempDir d;
    const auto check = [&](const std::string& entry, const std::string& expected) {
        const std::string p = d.file("bad.safetensors", st_bytes(R"({"w":)" + entry + "}", kWData));
        REQUIRE_THROWS_WITH(load_safetensors(p), Contains(p) && Contains("tensor 'w'") && Contains(expected));
    };
    SECTION("dtype is a number") {
        check(R"({"dtype":0,"shape":[2],"data_offsets":[0,8]})", "\"dtype\" is a number");
    }
    SECTION("shape is a string") {
        check(R"({"dtype":"F32","shape":"2","data_offsets":[0,8]})", "\"shape\" is a string");
    }
    SECTION("shape has a float") {
        check(R"({"dtype":"F32","shape":[2.0],"data_offsets":[0,8]})", "non-integer element 2.0");
    }
    SECTION("shape has a bool") {
        check(R"({"dtype":"F32","shape":[true],"data_offsets":[0,8]})", "non-integer element true");
    }
    SECTION("data_offsets has one element") {
        check(R"({"dtype":"F32","shape":[2],"data_offsets":[8]})", "\"data_offsets\" [8]");
    }
    SECTION("data_offsets has a negative begin") {
        check(R"({"dtype":"F32","shape":[2],"data_offsets":[-8,0]})", "\"data_offsets\" [-8,0]");
    }
    SECTION("data_offsets has a string") {
        check(R"({"dtype":"F32","shape":[2],"data_offsets":["0",8]})", R"("data_offsets" ["0",8])");
    }
}

TEST_CASE("safetensors load rejects an unknown entry field", "[safetensors]") {
    TempDir d;
    const std::string p = d.file(
        "bad.safetensors", st_bytes(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"stride":[1]}})", kWData));
    REQUIRE_THROWS_WITH(load_safetensors(p), Contains(p) && Contains("tensor 'w'") && Contains("\"stride\""));
}

TEST_CASE("safetensors load rejects an unsupported dtype", "[safetensors]") {
    TempDir d;
    const std::string p =
        d.file("bad.safetensors", st_bytes(R"({"w":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})", kWData));
    REQUIRE_THROWS_WITH(load_safetensors(p),
                        Contains(p) && Contains("tensor 'w'") && Contains("unsupported dtype \"I64\""));
}

TEST_CASE("safetensors load rejects negative dimensions", "[safetensors]") {
    TempDir d;
    const std::string p =
        d.file("bad.safetensors", st_bytes(R"({"w":{"dtype":"F32","shape":[-2,-1],"data_offsets":[0,8]}})", kWData));
    REQUIRE_THROWS_WITH(load_safetensors(p), Contains(p) && Contains("tensor 'w'") && Contains("dimension -2"));
}

TEST_CASE("safetensors load rejects data_offsets whose end is before begin", "[safetensors]") {
    TempDir d;
    const std::string p =
        d.file("bad.safetensors", st_bytes(R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", kWData));
    REQUIRE_THROWS_WITH(load_safetensors(p),
                        Contains(p) && Contains("tensor 'w'") && Contains("[8, 0] end before begin"));
}

TEST_CASE("safetensors load rejects data_offsets past the data section", "[safetensors]") {
    TempDir d;
    const std::string p =
        d.file("bad.safetensors", st_bytes(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[1000,1008]}})", kWData));
    REQUIRE_THROWS_WITH(load_safetensors(p), Contains(p) && Contains("tensor 'w'") &&
                                                 Contains("[1000, 1008] extend past the 8-byte data section"));
}

TEST_CASE("safetensors load rejects overlapping tensors", "[safetensors]") {
    TempDir d;
    const std::string header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                               R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})";
    const std::string p = d.file("bad.safetensors", st_bytes(header, float_bytes({1, 2, 3})));
    REQUIRE_THROWS_WITH(load_safetensors(p), Contains(p) && Contains("'a' [0, 8]") && Contains("'b' [4, 12]") &&
                                                 Contains("overlap"));
}

TEST_CASE("safetensors load rejects data bytes that belong to no tensor", "[safetensors]") {
    TempDir d;
    SECTION("a gap between tensors") {
        const std::string header = R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                   R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})";
        const std::string p = d.file("bad.safetensors", st_bytes(header, float_bytes({1, 2, 3})));
        REQUIRE_THROWS_WITH(load_safetensors(p), Contains(p) && Contains("[4, 8) before tensor 'b'"));
    }
    SECTION("trailing bytes") {
        const std::string p = d.file("bad.safetensors", st_bytes(kW, kWData + "junk"));
        REQUIRE_THROWS_WITH(load_safetensors(p), Contains(p) && Contains("[8, 12) after the last tensor"));
    }
}

TEST_CASE("safetensors load rejects a byte size that does not match the shape", "[safetensors]") {
    TempDir d;
    const std::string p =
        d.file("bad.safetensors", st_bytes(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", kWData));
    REQUIRE_THROWS_WITH(load_safetensors(p), Contains(p) && Contains("tensor 'w'") &&
                                                 Contains("span 8 bytes but F32 shape [3] needs 12"));
    const std::string q = d.file(
        "overflow.safetensors",
        st_bytes(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", kWData));
    REQUIRE_THROWS_WITH(load_safetensors(q), Contains(q) && Contains("tensor 'w'") && Contains("too large"));
}

TEST_CASE("safetensors load rejects a truncated data section", "[safetensors]") {
    TempDir d;
    const std::string p = d.path("cut.safetensors");
    const std::vector<float> a(16, 1.0f), b(16, 2.0f);
    save_safetensors(p, {{"a", {16}, a.data()}, {"b", {4, 4}, b.data()}});
    fs::resize_file(p, fs::file_size(p) - 4);
    REQUIRE_THROWS_WITH(load_safetensors(p),
                        Contains(p) && Contains("tensor 'b'") && Contains("file truncated?"));
}

// ---- saving ----

TEST_CASE("safetensors save rejects bad tensors without touching the file", "[safetensors]") {
    TempDir d;
    const std::string p = d.file("keep.safetensors", "old contents");
    const float v[2] = {1, 2};
    const auto check = [&](const std::vector<StTensorRef>& refs, const std::string& expected) {
        REQUIRE_THROWS_WITH(save_safetensors(p, refs), Contains(p) && Contains(expected));
        CHECK(read_bytes(p) == "old contents");
        CHECK(d.entries() == std::vector<std::string>{"keep.safetensors"});
    };
    SECTION("duplicate name") { check({{"w", {2}, v}, {"b", {1}, v}, {"w", {1}, v}}, "duplicate tensor name 'w'"); }
    SECTION("reserved name") { check({{"__metadata__", {1}, v}}, "\"__metadata__\" is reserved"); }
    SECTION("negative dimension") { check({{"w", {2, -1}, v}}, "tensor 'w': negative dimension in shape [2, -1]"); }
    SECTION("null data") { check({{"w", {2}, nullptr}}, "tensor 'w': data is null"); }
    SECTION("name is not UTF-8") { check({{"w\xff", {2}, v}}, "cannot encode header"); }
}

// ---- atomic writes ----

TEST_CASE("write_file_atomic creates and replaces files without leftovers", "[safetensors]") {
    TempDir d;
    const std::string p = d.path("adapter_config.json");
    write_file_atomic(p, R"({"r": 8})");
    CHECK(read_bytes(p) == R"({"r": 8})");
    write_file_atomic(p, "");
    CHECK(read_bytes(p).empty());
    write_file_atomic(p, std::string_view("a\0b", 3));
    CHECK(read_bytes(p) == std::string("a\0b", 3));
    CHECK(d.entries() == std::vector<std::string>{"adapter_config.json"});
}

TEST_CASE("a failed atomic write leaves the old file and no temp files", "[safetensors]") {
    TempDir d;
    const std::string p = d.file("model.safetensors", "old checkpoint");
    const std::vector<float> big(1 << 18, 1.0f);  // 1 MiB

    SECTION("the parent directory does not exist") {
        const std::string q = d.path("no/such/dir/model.safetensors");
        REQUIRE_THROWS_WITH(write_file_atomic(q, "x"), Contains(q) && Contains("cannot create temp file"));
        REQUIRE_THROWS_WITH(save_safetensors(q, {{"w", {2}, big.data()}}), Contains(q));
    }
    SECTION("the path names a directory") {
        const std::string q = d.path("sub/");
        fs::create_directory(q);
        REQUIRE_THROWS_WITH(write_file_atomic(q, "x"), Contains(q) && Contains("does not name a file"));
    }
    SECTION("the rename fails because the target is a non-empty directory") {
        const std::string q = d.path("ckpt");
        fs::create_directory(q);
        d.file("ckpt/inside", "x");
        REQUIRE_THROWS_WITH(save_safetensors(q, {{"w", {2}, big.data()}}), Contains(q) && Contains("renaming"));
        CHECK(fs::is_directory(q));
        CHECK(read_bytes(d.path("ckpt/inside")) == "x");
        CHECK(d.entries() == std::vector<std::string>{"ckpt", "model.safetensors"});
    }
    SECTION("writing fails part way (file size limit)") {
        // RLIMIT_FSIZE makes writes past 64 KiB fail with EFBIG even for root; SIGXFSZ would
        // otherwise kill the process. Both are restored whatever the assertions do.
        struct Limit {
            rlimit old{};
            void (*old_handler)(int);
            Limit() {
                old_handler = std::signal(SIGXFSZ, SIG_IGN);
                ::getrlimit(RLIMIT_FSIZE, &old);
                rlimit lim = old;
                lim.rlim_cur = 64 << 10;
                ::setrlimit(RLIMIT_FSIZE, &lim);
            }
            ~Limit() {
                ::setrlimit(RLIMIT_FSIZE, &old);
                std::signal(SIGXFSZ, old_handler);
            }
        };
        {
            Limit limit;
            REQUIRE_THROWS_WITH(save_safetensors(p, {{"w", {int64_t(big.size())}, big.data()}}),
                                Contains(p) && Contains("File too large"));
        }
    }
    SECTION("the directory is not writable") {
        fs::permissions(d.dir, fs::perms::owner_write | fs::perms::group_write | fs::perms::others_write,
                        fs::perm_options::remove);
        // Root (as in CI containers) ignores directory permissions, so there is nothing to test there.
        if (::access(d.dir.c_str(), W_OK) == 0) {
            WARN("directory permissions are not enforced for this user; skipping");
        } else {
            REQUIRE_THROWS_WITH(write_file_atomic(p, "new"), Contains(p) && Contains("Permission denied"));
        }
    }
    CHECK(read_bytes(p) == "old checkpoint");
    // Sections' own directories aside, only the old file may remain.
    std::vector<std::string> left = d.entries();
    std::erase_if(left, [&](const std::string& name) { return fs::is_directory(d.dir / name); });
    CHECK(left == std::vector<std::string>{"model.safetensors"});
}
