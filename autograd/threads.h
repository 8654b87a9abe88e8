#pragma once
// One thread setting for OpenBLAS and our OpenMP loops. Debian's OpenMP build
// of OpenBLAS runs its kernels on the same OpenMP pool, so setting both to the
// same number never oversubscribes the cores.
namespace peftlab {

// n <= 0 means "all cores". Applies to OpenBLAS and OpenMP together.
void set_threads(int n);
int threads();
// Reads PEFTLAB_THREADS (if set and valid) and applies it; returns the count.
// Throws std::invalid_argument naming the variable and its value if invalid.
int init_threads_from_env();
// OpenBLAS's name for the kernel it runs (e.g. "Haswell") and its build config.
const char* blas_core_name();
const char* blas_config();

}  // namespace peftlab
