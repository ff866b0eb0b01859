// Compiler and pass detection shared by every infuse header.
//
// Two different questions, two macros (as Eigen's Macros.h distinguishes them):
//   INFUSE_CUDA_COMPILER  the translation unit is compiled by nvcc (host and device passes alike),
//                         so __host__/__device__ exist and CUDA headers may be included;
//   INFUSE_DEVICE_PASS    this is nvcc's device pass: code here runs on the GPU.
// INFUSE_HOST_DEVICE marks the math that both backends share.
#pragma once

#if defined(_MSVC_LANG)
#define INFUSE_CPLUSPLUS _MSVC_LANG
#else
#define INFUSE_CPLUSPLUS __cplusplus
#endif
#if INFUSE_CPLUSPLUS < 202002L
#error "infuse needs C++20: compile with -std=c++20 (with nvcc too; CMake 3.25 cannot set the CUDA standard to 20, link infuse::infuse, which passes -std=c++20 to CUDA sources)"
#endif

#if defined(__CUDACC__)
#define INFUSE_CUDA_COMPILER 1
#define INFUSE_HOST_DEVICE __host__ __device__
#define INFUSE_DEVICE __device__
#else
#define INFUSE_HOST_DEVICE
#endif

#if defined(__CUDA_ARCH__)
#define INFUSE_DEVICE_PASS 1
#endif

#if defined(__GNUC__) || defined(__clang__)
#define INFUSE_FORCE_INLINE inline __attribute__((always_inline))
#else
#define INFUSE_FORCE_INLINE inline
#endif

#define INFUSE_VERSION_MAJOR 0
#define INFUSE_VERSION_MINOR 1
#define INFUSE_VERSION_PATCH 0
