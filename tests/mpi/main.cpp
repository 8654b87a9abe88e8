// The data-parallel tests' entry point: `make test-mpi` runs this binary as 2
// MPI ranks (mpirun -np 2). Every test runs on every rank (they make the same
// collective calls); rank 0 prints, the others' output goes to /dev/null
// (mpi::World), so the failed assertions of every rank (Catch's return value)
// are summed and rank 0 says how many happened elsewhere.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <fmt/format.h>

#include "autograd/threads.h"
#include "mpi/world.h"

int main(int argc, char* argv[]) {
    peftlab::mpi::World world(&argc, &argv);
    peftlab::init_threads_from_env();
    const int failed = Catch::Session().run(argc, argv);
    double all = failed;
    world.all_reduce_sum(&all, 1);
    if (world.rank() == 0 && all > failed)
        fmt::print("{} assertion(s) failed on other ranks (rerun with PEFTLAB_ALL_RANKS_PRINT=1 to see them)\n",
                   all - failed);
    return all > 0 ? 1 : 0;
}
