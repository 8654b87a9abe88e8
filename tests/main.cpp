// Catch2 v2 entry point; threads follow PEFTLAB_THREADS (the Makefile sets 2).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include "autograd/threads.h"

int main(int argc, char* argv[]) {
    peftlab::init_threads_from_env();
    return Catch::Session().run(argc, argv);
}
