// Reader and writer for the Hugging Face safetensors format, independent of our Tensor
// class so that checkpoint code (and tools) can wrap it without pulling in autograd.
//
// Layout: u64 little-endian N | N bytes of JSON header, space-padded to a multiple of 8 |
// data section. The header maps each tensor name to
// {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]} with offsets relative to the
// start of the data section, plus an optional "__metadata__" object of string -> string.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace peftlab {

// A tensor as loaded: row-major, data.size() == product(shape) (1 for a scalar, shape []).
struct StTensor {
    std::vector<int64_t> shape;
    std::vector<float> data;
};

struct StFile {
    std::map<std::string, StTensor> tensors;
    std::map<std::string, std::string> metadata;
};

// A tensor to save, borrowed so that saving does not copy parameter buffers: `data` points at
// product(shape) row-major floats (may be null only when that product is 0) and must stay
// valid for the duration of the save call.
// With `fill` set instead of `data`, the writer calls fill(buf) for a scratch buffer of
// product(shape) floats just before writing that tensor (e.g. to transpose a weight into
// another layout): the file is written with one tensor's worth of extra memory, not a copy
// of the model.
struct StTensorRef {
    std::string name;
    std::vector<int64_t> shape;
    const float* data = nullptr;
    std::function<void(float*)> fill = nullptr;
};

// Writes `bytes` to `path` so that readers see either the old file or the complete new one:
// temp file in the same directory, write, fflush, fsync, rename. On failure the temp file
// is removed, `path` is left as it was, and std::runtime_error names the path.
void write_file_atomic(const std::string& path, std::string_view bytes);

// Saves the tensors as F32 in name order, contiguously, atomically (as write_file_atomic).
// Throws std::runtime_error naming the path and tensor for duplicate or reserved names
// ("__metadata__"), negative dimensions, or null data for a non-empty tensor.
void save_safetensors(const std::string& path, const std::vector<StTensorRef>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// Loads every tensor as float; F32 is read as is, F16 and BF16 are widened exactly.
// Validates the whole header against the file size before reading any data: types of every
// field, dtype, shapes against byte ranges, and (as the reference implementation requires)
// tensors tiling the data section exactly, with no overlap, gap or trailing bytes. Throws
// std::runtime_error naming the path and the offending key on any inconsistency.
StFile load_safetensors(const std::string& path);

// A safetensors file memory-mapped read-only, for models too large to hold twice: the header
// is validated exactly as load_safetensors does (same errors) when the file is opened, and
// each tensor is converted to float on request, after which its pages are released from
// this process (madvise DONTNEED), so loading costs one tensor of extra resident memory.
class StMapped {
public:
    struct Info {
        std::string dtype;  // "F32", "F16" or "BF16"
        std::vector<int64_t> shape;
    };
    // Throws std::runtime_error naming the path (and key) as load_safetensors does.
    explicit StMapped(const std::string& path);
    ~StMapped();
    StMapped(const StMapped&) = delete;
    StMapped& operator=(const StMapped&) = delete;

    const std::string& path() const { return path_; }
    const std::map<std::string, Info>& tensors() const { return info_; }
    const std::map<std::string, std::string>& metadata() const { return metadata_; }
    // Writes tensor `name` widened to float into dst (product(shape) floats). Throws naming
    // the path for an unknown name.
    void read(const std::string& name, float* dst) const;

private:
    struct Range {
        uint64_t begin, end;
        size_t dtype_size;
        float (*widen)(uint16_t);
    };
    std::string path_;
    int fd_ = -1;
    const unsigned char* map_ = nullptr;
    uint64_t map_size_ = 0;
    uint64_t data_start_ = 0;
    std::map<std::string, Info> info_;
    std::map<std::string, Range> ranges_;
    std::map<std::string, std::string> metadata_;
};

}  // namespace peftlab
