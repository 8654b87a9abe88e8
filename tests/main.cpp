// Catch2 v2 entry point; threads follow PEFTLAB_THREADS (the Makefile sets 2).
// With PEFTLAB_TEST_CHILD=<mode> set, the binary is a child process a test
// started (tests/test_faults.cpp: training to be killed mid-checkpoint) and
// runs that mode instead of the suite.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdlib>
#include <string>

#include "autograd/threads.h"

int run_test_child(const std::string& mode);  // tests/test_faults.cpp

int main(int argc, char* argv[]) {
    peftlab::init_threads_from_env();
    if (const char* mode = std::getenv("PEFTLAB_TEST_CHILD")) return run_test_child(mode);
    return Catch::Session().run(argc, argv);
}
