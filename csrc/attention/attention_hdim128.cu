// Kernels for head dim 128 (fp16 and bf16); one file per head dim so builds run in parallel.
#include "launch.cuh"

MAE_FAST_ATTENTION_HDIM(128)
