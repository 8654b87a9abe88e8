#include "autograd/threads.h"

#include <cstdlib>
#include <stdexcept>
#include <string>

#include <cblas.h>
#include <omp.h>

namespace peftlab {

void set_threads(int n) {
    if (n <= 0) n = omp_get_num_procs();
    omp_set_num_threads(n);
    openblas_set_num_threads(n);
}

int threads() { return omp_get_max_threads(); }

int init_threads_from_env() {
    const char* v = std::getenv("PEFTLAB_THREADS");
    int n = 0;
    if (v && *v) {
        char* end = nullptr;
        long parsed = std::strtol(v, &end, 10);
        if (*end != '\0' || parsed < 0 || parsed > 4096)
            throw std::invalid_argument(std::string("PEFTLAB_THREADS: invalid value '") + v +
                                        "' (expected a thread count, 0 = all cores)");
        n = int(parsed);
    }
    set_threads(n);
    return threads();
}

const char* blas_core_name() { return openblas_get_corename(); }
const char* blas_config() { return openblas_get_config(); }

}  // namespace peftlab
