#pragma once

#include "common/dtype.h"
#include "gla/params.h"

namespace linmix {

void chunk_gla_fwd_cpu(const GlaParams& p, DType dtype);
void chunk_gla_bwd_cpu(const GlaParams& p, DType dtype);
void fused_recurrent_gla_fwd_cpu(const GlaParams& p, DType dtype);
void fused_recurrent_gla_bwd_cpu(const GlaParams& p, DType dtype);

}  // namespace linmix
