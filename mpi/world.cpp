#include "mpi/world.h"

#include <fcntl.h>
#include <mpi.h>
#include <unistd.h>

#include <chrono>
#include <climits>
#include <cstdlib>
#include <stdexcept>

#include <fmt/format.h>

namespace peftlab::mpi {

namespace {

using Clock = std::chrono::steady_clock;

// MPI counts are int: a large buffer goes in chunks of at most 1 GiB.
constexpr size_t kChunk = size_t(1) << 30;

void check(int rc, const char* call) {
    if (rc == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, text, &len);
    throw std::runtime_error(fmt::format("{} failed: {}", call, std::string(text, size_t(len))));
}

template <class T>
void all_reduce(T* data, size_t n, MPI_Datatype type) {
    const size_t per = kChunk / sizeof(T);
    for (size_t done = 0; done < n; done += per)
        check(MPI_Allreduce(MPI_IN_PLACE, data + done, int(std::min(per, n - done)), type, MPI_SUM, MPI_COMM_WORLD),
              "MPI_Allreduce");
}

}  // namespace

bool launched_by_mpirun() {
    return std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMIX_RANK") || std::getenv("PMI_SIZE");
}

World::World(int* argc, char*** argv) {
    if (!launched_by_mpirun()) return;
    int provided = 0;
    check(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
    active_ = true;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
    MPI_Comm local;
    check(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &local),
          "MPI_Comm_split_type");
    MPI_Comm_size(local, &local_size_);
    MPI_Comm_free(&local);
    char host[MPI_MAX_PROCESSOR_NAME];
    int len = 0;
    MPI_Get_processor_name(host, &len);
    host_.assign(host, size_t(len));
    if (rank_ > 0 && !std::getenv("PEFTLAB_ALL_RANKS_PRINT")) {
        stderr_fd_ = ::dup(2);
        const int null = ::open("/dev/null", O_WRONLY);
        if (null >= 0) {
            ::dup2(null, 1);
            ::dup2(null, 2);
            ::close(null);
        }
    }
    // Every rank says where it runs, on its real stderr (who watches the job sees every pid).
    const std::string line = fmt::format("mpi: rank {} of {} on {} (pid {}, {} ranks on this machine)\n", rank_, size_,
                                         host_, ::getpid(), local_size_);
    (void)!::write(stderr_fd_, line.data(), line.size());
    dist::set_world(this);
}

World::~World() {
    if (!active_) return;
    dist::set_world(nullptr);
    MPI_Finalize();
}

void World::all_reduce_sum(float* data, size_t n) {
    const auto t0 = Clock::now();
    if (size_ > 1) all_reduce(data, n, MPI_FLOAT);
    comm_s_ += std::chrono::duration<double>(Clock::now() - t0).count();
}

void World::all_reduce_sum(double* data, size_t n) {
    const auto t0 = Clock::now();
    if (size_ > 1) all_reduce(data, n, MPI_DOUBLE);
    comm_s_ += std::chrono::duration<double>(Clock::now() - t0).count();
}

void World::broadcast(void* data, size_t bytes, int root) {
    const auto t0 = Clock::now();
    if (size_ > 1)
        for (size_t done = 0; done < bytes; done += kChunk)
            check(MPI_Bcast(static_cast<char*>(data) + done, int(std::min(kChunk, bytes - done)), MPI_BYTE, root,
                            MPI_COMM_WORLD),
                  "MPI_Bcast");
    comm_s_ += std::chrono::duration<double>(Clock::now() - t0).count();
}

void World::barrier() {
    const auto t0 = Clock::now();
    if (size_ > 1) check(MPI_Barrier(MPI_COMM_WORLD), "MPI_Barrier");
    comm_s_ += std::chrono::duration<double>(Clock::now() - t0).count();
}

std::string World::describe() const {
    if (!active_) return "single process";
    char version[MPI_MAX_LIBRARY_VERSION_STRING];
    int len = 0;
    MPI_Get_library_version(version, &len);
    std::string v(version, size_t(len));
    if (auto nl = v.find_first_of(",\n"); nl != std::string::npos) v.resize(nl);
    return fmt::format("MPI, {} ranks ({})", size_, v);
}

int World::fail(const std::string& program, const std::string& what) {
    if (!active_) {
        fmt::print(stderr, "{}: {}\n", program, what);
        return 1;
    }
    const std::string line = fmt::format("{}: rank {} of {} ({}): {}\n", program, rank_, size_, host_, what);
    (void)!::write(stderr_fd_, line.data(), line.size());
    if (size_ > 1) MPI_Abort(MPI_COMM_WORLD, 1);  // ends every rank; does not return
    return 1;
}

}  // namespace peftlab::mpi
