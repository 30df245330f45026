// parallel_for for the torch-free CPU kernels: torch's intra-op thread pool (at::parallel_for through the stable
// ABI, so the same threads and torch.set_num_threads), behind a plain function pointer so the kernels include no
// torch header. Implemented in parallel_torch.cpp.
#pragma once

#include <cstdint>

namespace linmix {

// Calls body(begin', end', ctx) on sub-ranges of [begin, end) of at least `grain` iterations, in parallel.
void parallel_for_impl(int64_t begin, int64_t end, int64_t grain, void (*body)(int64_t, int64_t, void*), void* ctx);

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  parallel_for_impl(begin, end, grain,
                    [](int64_t b, int64_t e, void* ctx) { (*static_cast<const F*>(ctx))(b, e); },
                    const_cast<void*>(static_cast<const void*>(&f)));
}

}  // namespace linmix
