#pragma once

#include "common/dtype.h"
#include "fixed_point_rnn/params.h"

namespace linmix {

// p.work: none needed on the CPU (each thread allocates its own rows).
void fixed_point_rnn_fwd_cpu(const FixedPointRnnVarlenParams& p, DType dtype);
void fixed_point_rnn_bwd_cpu(const FixedPointRnnVarlenParams& p, DType dtype);

}  // namespace linmix
