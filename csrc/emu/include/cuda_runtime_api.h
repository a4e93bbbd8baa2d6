// Shadow of the CUDA toolkit header for the emulation build: the emulator stands in for it.
#pragma once

#include "emu/emu.h"
