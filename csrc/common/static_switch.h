// Runtime value -> compile-time constant dispatch, in one place (the FlashAttention pattern).
#pragma once

#include <stdexcept>

#include "common/dtype.h"

// Calls __VA_ARGS__ (a lambda-like block) with `constexpr DType NAME` bound to the runtime dtype; a value
// outside the enum throws instead of running some other instantiation.
#define LINMIX_DTYPE_SWITCH(DT, NAME, ...)                                 \
  [&] {                                                                    \
    switch (DT) {                                                          \
      case ::linmix::DType::kFloat32: {                                    \
        constexpr ::linmix::DType NAME = ::linmix::DType::kFloat32;        \
        return __VA_ARGS__();                                              \
      }                                                                    \
      case ::linmix::DType::kFloat16: {                                    \
        constexpr ::linmix::DType NAME = ::linmix::DType::kFloat16;        \
        return __VA_ARGS__();                                              \
      }                                                                    \
      case ::linmix::DType::kBFloat16: {                                   \
        constexpr ::linmix::DType NAME = ::linmix::DType::kBFloat16;       \
        return __VA_ARGS__();                                              \
      }                                                                    \
      case ::linmix::DType::kFloat64: {                                    \
        constexpr ::linmix::DType NAME = ::linmix::DType::kFloat64;        \
        return __VA_ARGS__();                                              \
      }                                                                    \
      default:                                                             \
        throw std::invalid_argument("linmix: unknown DType");              \
    }                                                                      \
  }()
