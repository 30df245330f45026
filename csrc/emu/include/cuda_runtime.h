// The emulated build finds this <cuda_runtime.h> first on its include path (csrc/emu/include).
#pragma once
#include "emu/cuda_emu.h"
