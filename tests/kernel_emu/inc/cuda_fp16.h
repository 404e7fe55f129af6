// Stand-in for CUDA's cuda_fp16.h (included by kernels/common.cuh) in the kernel emulator:
// __half and the fp16 intrinsics the kernels use are provided by ../emu.h.
