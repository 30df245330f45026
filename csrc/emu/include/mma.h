// The emulated build finds this <mma.h> first on its include path (csrc/emu/include).
#pragma once
#include "emu/wmma.h"
