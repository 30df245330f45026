#pragma once

#include "common/dtype.h"
#include "fixed_point/params.h"

namespace linmix {

// p.work: none needed on the CPU (each thread allocates its own rows).
void fixed_point_fwd_cpu(const FixedPointParams& p, DType dtype);
void fixed_point_bwd_cpu(const FixedPointParams& p, DType dtype);

}  // namespace linmix
