// Host-only exp2 for the CPU loops that evaluate one per element (the GLA CPU twin, gla/gla_cpu.cpp; the
// selective_state_update decay, selective_scan/selective_state_update_common.h): fp32 as straight-line
// arithmetic, so those loops vectorise instead of calling libm per element. Not for device code.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace linmix {

// Cephes' exp2f polynomial, relative error about 2e-7. Exponents below -126 (a decay across a harsh or
// infinite gate) give exactly 0 instead of a denormal, an absolute error under 2^-126 = 1.2e-38, so
// exp2(-inf) = 0; arguments above 126 are clamped to 126 (the callers' exponents are decays, <= 0).
// NaN propagates.
inline float exp2_cpu(float x) {
  const bool underflow = x < -126.f;
  x = underflow ? -126.f : x;
  x = x > 126.f ? 126.f : x;
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: x + kRound holds round(x) in its low mantissa bits
  const float t = x + kRound;
  const float n = t - kRound;
  const float f = x - n;  // in [-0.5, 0.5]
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.f;
  int32_t ti, ki;
  std::memcpy(&ti, &t, sizeof ti);
  std::memcpy(&ki, &kRound, sizeof ki);
  const int32_t e = (ti - ki + 127) << 23;  // the float 2^round(x)
  float two_n;
  std::memcpy(&two_n, &e, sizeof two_n);
  return underflow ? 0.f : p * two_n;
}
inline double exp2_cpu(double x) { return std::exp2(x); }

}  // namespace linmix
