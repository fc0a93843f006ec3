/* Found before GCC's own <amxtileintrin.h> (-I), when llama.cpp is built with GCC.

   GCC 12's _tile_loadconfig gives `ldtilecfg` an 8-byte memory operand, `*(const void **)config`,
   although the instruction reads all 64 bytes of the tile configuration. GCC then drops the
   stores that set the tiles' rows and column bytes as dead, so ggml's ggml_tile_config_init
   loads palette 1 with every tile unconfigured, and the first AMX tile instruction of a q4_0,
   q4_1 or q8_0 matmul (prompt processing; one-token steps take an AVX512-VNNI path) raises #UD:
   SIGILL on every CPU whose kernel grants AMX. The same instruction with a 64-byte operand. */
#ifndef CPUFORGE_AMXTILEINTRIN_H
#define CPUFORGE_AMXTILEINTRIN_H
#define _tile_loadconfig cpuforge_unused_gcc_tile_loadconfig
#include_next <amxtileintrin.h>
#undef _tile_loadconfig
#define _tile_loadconfig(config) __asm__ volatile("ldtilecfg\t%X0" ::"m"(*(const char(*)[64])(config)))
#endif
