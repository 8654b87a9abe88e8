#include "nn/atomic_file.h"

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>

#include <fcntl.h>
#include <unistd.h>

#include <fmt/format.h>

namespace peftlab {

AtomicFile::AtomicFile(std::string_view caller, const std::string& path) : caller_(caller), path_(path) {
    namespace fs = std::filesystem;
    const fs::path target(path);
    if (!target.has_filename()) throw error("path does not name a file");
    // pid + per-process counter keeps concurrent writers (threads or processes) apart;
    // O_EXCL makes a stale leftover with the same name a retry rather than a clobber.
    // open() with 0666 (not mkstemp's 0600) gives the final file the usual umask mode.
    static std::atomic<unsigned> counter{0};
    remove_stale_temps(target);
    int fd = -1;
    for (int attempt = 0; attempt < 100 && fd < 0; ++attempt) {
        const std::string name = fmt::format(".{}.tmp.{}.{}", target.filename().string(), ::getpid(), counter++);
        tmp_ = (target.parent_path() / name).string();
        fd = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd < 0 && errno != EEXIST) break;
    }
    if (fd < 0) throw error(fmt::format("cannot create temp file '{}': {}", tmp_, std::strerror(errno)));
    file_ = ::fdopen(fd, "wb");
    if (!file_) {
        const int err = errno;
        ::close(fd);
        ::unlink(tmp_.c_str());
        throw error(fmt::format("fdopen of temp file '{}' failed: {}", tmp_, std::strerror(err)));
    }
}

AtomicFile::~AtomicFile() {
    if (committed_) return;
    if (file_) std::fclose(file_);
    ::unlink(tmp_.c_str());
}

void AtomicFile::write(const void* bytes, size_t n) {
    if (n == 0) return;
    if (std::fwrite(bytes, 1, n, file_) != n)
        throw error(fmt::format("writing temp file '{}' failed: {}", tmp_, std::strerror(errno)));
    size_ += n;
}

void AtomicFile::commit() {
    if (std::fflush(file_) != 0)
        throw error(fmt::format("flushing temp file '{}' failed: {}", tmp_, std::strerror(errno)));
    // Without fsync before rename, a crash can leave the new name pointing at an empty file.
    if (::fsync(::fileno(file_)) != 0)
        throw error(fmt::format("fsync of temp file '{}' failed: {}", tmp_, std::strerror(errno)));
    const int rc = std::fclose(file_);
    file_ = nullptr;
    if (rc != 0) throw error(fmt::format("closing temp file '{}' failed: {}", tmp_, std::strerror(errno)));
    if (std::rename(tmp_.c_str(), path_.c_str()) != 0)
        throw error(fmt::format("renaming temp file '{}' onto it failed: {}", tmp_, std::strerror(errno)));
    committed_ = true;
    // Makes the rename itself durable. The new contents are already complete and in place,
    // so a filesystem that refuses fsync on directories is not worth failing the save for.
    const std::filesystem::path dir = std::filesystem::path(path_).parent_path();
    const int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        ::fsync(dfd);
        ::close(dfd);
    }
}

void AtomicFile::remove_stale_temps(const std::filesystem::path& target) {
    namespace fs = std::filesystem;
    const std::string prefix = fmt::format(".{}.tmp.", target.filename().string());  // not "." + s: GCC 12 warns (-Wrestrict, a false positive)
    const fs::path dir = target.parent_path().empty() ? fs::path(".") : target.parent_path();
    std::error_code ec;
    for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
        const std::string name = it->path().filename().string();
        if (name.compare(0, prefix.size(), prefix) != 0) continue;
        const long pid = std::strtol(name.c_str() + prefix.size(), nullptr, 10);
        if (pid <= 0 || pid == long(::getpid())) continue;
        if (::kill(pid_t(pid), 0) != 0 && errno == ESRCH) ::unlink(it->path().c_str());
    }
}

std::runtime_error AtomicFile::error(std::string_view what) const {
    return std::runtime_error(fmt::format("{}: cannot write '{}': {}", caller_, path_, what));
}

}  // namespace peftlab
