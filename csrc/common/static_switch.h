// Runtime value -> compile-time constant dispatch, in one place (the FlashAttention pattern).
#pragma once

#include "common/dtype.h"

// Calls __VA_ARGS__ (a lambda-like block) with `constexpr DType NAME` bound to the runtime dtype.
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
      default: {                                                           \
        constexpr ::linmix::DType NAME = ::linmix::DType::kFloat64;        \
        return __VA_ARGS__();                                              \
      }                                                                    \
    }                                                                      \
  }()

#define LINMIX_BOOL_SWITCH(COND, NAME, ...) \
  [&] {                                     \
    if (COND) {                             \
      constexpr bool NAME = true;           \
      return __VA_ARGS__();                 \
    } else {                                \
      constexpr bool NAME = false;          \
      return __VA_ARGS__();                 \
    }                                       \
  }()
