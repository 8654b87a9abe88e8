#pragma once
// dist::Communicator on MPI (Debian's Open MPI), for the binaries that train.
// Compiled and linked only into those (Makefile: MPI_BINS) and into the MPI
// tests; the library and the main test binary never see MPI.
//
//   int main(int argc, char** argv) {
//       mpi::World world(&argc, &argv);      // MPI_Init only when started by mpirun
//       try { ... } catch (const std::exception& e) { return world.fail("compare", e.what()); }
//   }
//
// Started by mpirun (Open MPI's OMPI_COMM_WORLD_SIZE, or PMIx's PMIX_RANK, in
// the environment) it initialises MPI, installs itself as dist::world() and,
// on ranks other than 0, sends stdout and stderr to /dev/null (rank 0 alone
// prints; PEFTLAB_ALL_RANKS_PRINT=1 keeps every rank's output). Started
// directly it stays a single process and never calls MPI: no mpirun needed.
#include <string>

#include "nn/dist.h"

namespace peftlab::mpi {

class World final : public dist::Communicator {
public:
    World(int* argc, char*** argv);
    ~World() override;  // MPI_Finalize (collective: every rank must get here)
    World(const World&) = delete;
    World& operator=(const World&) = delete;

    bool active() const { return active_; }  // MPI initialised (started by mpirun)
    int rank() const override { return rank_; }
    int size() const override { return size_; }
    int local_size() const override { return local_size_; }
    void all_reduce_sum(float* data, size_t n) override;
    void all_reduce_sum(double* data, size_t n) override;
    void broadcast(void* data, size_t bytes, int root) override;
    void barrier() override;
    std::string describe() const override;

    // The error path of main(): prints "<program>: rank R of N (host): what"
    // on this rank's real stderr and, with several ranks, ends the whole job
    // (MPI_Abort: mpirun stops every rank within seconds, so a failure on one
    // rank never leaves the others waiting in a collective). Single process:
    // prints "<program>: what" and returns 1, the exit status.
    int fail(const std::string& program, const std::string& what);

private:
    bool active_ = false;
    int rank_ = 0, size_ = 1, local_size_ = 1;
    int stderr_fd_ = 2;  // the real stderr (rank > 0 sends fd 2 to /dev/null)
    std::string host_;
};

// True when this process was started by an MPI launcher.
bool launched_by_mpirun();

}  // namespace peftlab::mpi
