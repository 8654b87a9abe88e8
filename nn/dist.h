#pragma once
// The communicator data-parallel training talks to: a rank and a size, sums
// over all ranks, and a broadcast. nn/ knows only this interface; the single
// process below is the default, and dist/mpi_world.cpp (linked only into the
// binaries that train) implements it on MPI when the process was started by
// mpirun. Nothing below nn/ knows about ranks.
//
// Every call is collective: every rank must make the same calls in the same
// order with the same sizes (MPI's rule), or the job hangs or aborts.
#include <cstddef>
#include <cstdint>
#include <string>

namespace peftlab::dist {

class Communicator {
public:
    virtual ~Communicator() = default;
    virtual int rank() const = 0;  // 0 .. size()-1
    virtual int size() const = 0;
    // Ranks on this machine, sharing its cores (the default thread count
    // divides the cores among them).
    virtual int local_size() const { return 1; }
    // In place: data[i] = sum over ranks of data[i]. With two ranks the sum is
    // a + b on both, bitwise (IEEE addition commutes), which is what makes two
    // ranks equal one process accumulating two micro-batches; with more ranks
    // the order of the terms is MPI's.
    virtual void all_reduce_sum(float* data, size_t n) = 0;
    virtual void all_reduce_sum(double* data, size_t n) = 0;
    // In place: every rank gets root's n bytes.
    virtual void broadcast(void* data, size_t bytes, int root) = 0;
    virtual void barrier() = 0;
    // Seconds spent in the calls above since construction (what the training
    // log reports as communication time; includes waiting for slower ranks).
    double comm_seconds() const { return comm_s_; }
    // "MPI (Open MPI v4.1.4)", "single process".
    virtual std::string describe() const = 0;

protected:
    double comm_s_ = 0.0;
};

// One process: rank 0 of 1; sums and broadcasts leave the data as it is.
class SingleProcess final : public Communicator {
public:
    int rank() const override { return 0; }
    int size() const override { return 1; }
    void all_reduce_sum(float*, size_t) override {}
    void all_reduce_sum(double*, size_t) override {}
    void broadcast(void*, size_t, int) override {}
    void barrier() override {}
    std::string describe() const override { return "single process"; }
};

// The process-wide communicator: a SingleProcess unless set_world() installed
// another (dist/mpi_world.h does when started by mpirun). Not owned.
Communicator& world();
void set_world(Communicator* comm);  // nullptr: back to the single process
// Rank 0 of world(): the one that writes files and prints progress.
inline bool is_root() { return world().rank() == 0; }
// Sends a string from root to every rank (length, then bytes).
std::string broadcast_string(Communicator& comm, std::string s, int root);

// Rows [begin, end) of micro-batch `index` out of `count` in a global batch
// of `batch` rows: contiguous, sizes differing by at most one. Throws
// std::invalid_argument when batch < count (a micro-batch would be empty).
struct Shard {
    int index = 0;  // 0 .. count-1 (rank * grad_accum + micro-batch on that rank)
    int count = 1;  // micro-batches per update over all ranks
    int64_t begin(int64_t batch) const { return batch * index / count; }
    int64_t end(int64_t batch) const { return batch * (index + 1) / count; }
};
void check_shards(int64_t batch, int count, const char* what);

}  // namespace peftlab::dist
