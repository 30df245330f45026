// parallel.h on torch's stable ABI.
#include "common/parallel.h"

#include <torch/csrc/stable/ops.h>

namespace linmix {

void parallel_for_impl(int64_t begin, int64_t end, int64_t grain, void (*body)(int64_t, int64_t, void*), void* ctx) {
  if (begin >= end) return;
  torch::stable::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { body(b, e, ctx); });
}

}  // namespace linmix
