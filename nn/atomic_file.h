#pragma once
// A file written so that readers see either the old contents or the complete new ones:
// a temp file in the target's directory (so the final rename stays within one filesystem
// and is atomic), written in pieces, then fflush + fsync + rename on commit(). Until
// commit() succeeds, destruction closes and removes the temp file, leaving the target
// untouched whatever threw in between. Used by the safetensors and GGUF writers.
#include <cstddef>
#include <cstdio>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <string_view>

namespace peftlab {

class AtomicFile {
public:
    // Creates the temp file ".<name>.tmp.<pid>.<n>" beside `path`. Errors are
    // std::runtime_error "<caller>: cannot write '<path>': <why>" (no such directory,
    // no permission, a path that names no file).
    AtomicFile(std::string_view caller, const std::string& path);
    AtomicFile(const AtomicFile&) = delete;
    AtomicFile& operator=(const AtomicFile&) = delete;
    ~AtomicFile();

    // Appends n bytes; throws as the constructor does on a short write (disk full).
    void write(const void* bytes, size_t n);
    // Bytes written so far.
    size_t size() const { return size_; }
    // fflush, fsync, close, rename onto the target, then fsync of the directory (best effort).
    void commit();

private:
    // Temp files of writers killed (SIGKILL, power loss) before their rename: the next
    // writer of the same target removes those of processes that no longer exist.
    static void remove_stale_temps(const std::filesystem::path& target);
    std::runtime_error error(std::string_view what) const;

    std::string caller_;
    std::string path_;
    std::string tmp_;
    std::FILE* file_ = nullptr;
    size_t size_ = 0;
    bool committed_ = false;
};

}  // namespace peftlab
