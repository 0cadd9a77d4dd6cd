/* The C ABI between the torch-facing binding (bindings.cpp) and the CUDA kernels (sparse_adamw.cu,
 * group_advantage.cu).
 *
 * Plain C on purpose: the kernels compile with nvcc alone, without torch headers (torch's CPU wheels ship no CUDA
 * build), so CI compiles them for sm_80 and sm_90 on a machine without a GPU (csrc/check/compile_check.sh), and a
 * host test includes this header too. Every launch function returns 0 on success, a cudaError_t value (> 0) when
 * CUDA refuses the launch, or a negative RF_ERR_* code for an argument the binding should have rejected;
 * rf_error_string() names it. Launches are asynchronous on the given stream (a cudaStream_t passed as void*).
 *
 * Constants shared with Python are read from this file by tests (tests/ops/test_sparse_adamw.py,
 * tests/ops/test_group_advantage.py): keep the "NAME = value" spelling of the enums below.
 */
#ifndef RLVR_FAST_KERNELS_H
#define RLVR_FAST_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- error codes (negative; positive values are cudaError_t) -------------------------------------------------- */
enum {
  RF_OK = 0,
  RF_ERR_DTYPE = -1,       /* a dtype code outside the ones below */
  RF_ERR_INDEX_BYTES = -2, /* indices are neither int32 nor int64 */
  RF_ERR_CODE = -3,        /* an estimator / scale / sample-mode code out of range */
  RF_ERR_SHAPE = -4        /* a negative size, or more tiles than a grid holds */
};
const char* rf_error_string(int code);

/* ---- dtype codes of the tensors the kernels read --------------------------------------------------------------- */
enum { RF_DTYPE_FLOAT32 = 0, RF_DTYPE_BFLOAT16 = 1, RF_DTYPE_FLOAT16 = 2, RF_DTYPE_FLOAT64 = 3 };

/* =================================================================================================================
 * Sparse masked AdamW: one launch over all masked entries of many parameters (rlvr_fast.optim.sparse_adamw).
 *
 * The compact state of a bucket: exp_avg, exp_avg_sq float32 (E,), indices int32/int64 (>= the masked entries),
 * all 16-byte aligned. Segment s (one parameter) owns entries [entry_start, entry_start + count); entry_start is a
 * multiple of RF_ENTRY_ALIGN so each thread's RF_SPARSE_ADAMW_VEC consecutive entries are one aligned vector.
 * The step's table is built by the host: int32 first_tile[n_seg] (exclusive prefix sum of tiles per segment,
 * ascending) and RfAdamwSegment segments[n_seg], both in device memory. Block b steps tile b: it finds its segment
 * by binary search over first_tile.
 * ================================================================================================================= */
enum {
  RF_ENTRY_ALIGN = 16,                 /* state entries: each segment's slice starts at a multiple of this */
  RF_SPARSE_ADAMW_THREADS = 256,       /* threads per block */
  RF_SPARSE_ADAMW_VEC = 4,             /* consecutive entries per thread per step: one 16-byte vector of fp32 */
  RF_SPARSE_ADAMW_UNROLL = 4,          /* vectors per thread per tile, loaded before any is stored */
  RF_SPARSE_ADAMW_TILE = 4096          /* = THREADS * VEC * UNROLL entries per block */
};

/* Segment flags. */
enum {
  RF_SEG_DENSE = 1,     /* no indices: entry i is position i of the parameter */
  RF_SEG_VECTOR_IO = 2  /* dense, and the parameter and gradient addresses allow vector access of VEC elements */
};

/* One parameter of one step, 64 bytes. The float fields are the coefficients of rlvr_fast.optim.sparse_adamw's
 * HYPER_FIELDS, in that order (computed on the host in float64, rounded once). */
typedef struct RfAdamwSegment {
  int64_t entry_start; /* first state entry */
  int64_t count;       /* entries (>= 1) */
  uint64_t grad;       /* address of the contiguous gradient (the parameter's dtype) */
  uint64_t param;      /* address of the contiguous parameter, updated in place */
  float decay;         /* 1 - lr * weight_decay */
  float w1;            /* 1 - beta1 */
  float beta2;         /* beta2 */
  float w2;            /* 1 - beta2 */
  float step_size;     /* lr / (1 - beta1^t) */
  float bc2_sqrt;      /* sqrt(1 - beta2^t) */
  float eps;           /* eps */
  int32_t flags;       /* RF_SEG_* */
} RfAdamwSegment;

/* Tiles (blocks) a segment of `count` entries needs. */
static inline int64_t rf_sparse_adamw_tiles(int64_t count) {
  return (count + RF_SPARSE_ADAMW_TILE - 1) / RF_SPARSE_ADAMW_TILE;
}

/* RF_SEG_* flags of a segment: vector I/O of the parameter and gradient needs both addresses aligned to VEC
 * elements (a parameter that is a view at an odd offset takes the scalar path). */
static inline int32_t rf_sparse_adamw_flags(int dense, uint64_t param, uint64_t grad, int64_t elem_bytes) {
  const uint64_t vec_bytes = (uint64_t)(RF_SPARSE_ADAMW_VEC * elem_bytes);
  if (!dense) return 0;
  return RF_SEG_DENSE | (((param | grad) % vec_bytes == 0) ? RF_SEG_VECTOR_IO : 0);
}

/* One AdamW step over n_tiles tiles. param_dtype: RF_DTYPE_FLOAT32 or RF_DTYPE_BFLOAT16 (parameters and gradients);
 * index_bytes: 4 or 8. Every pointer is device memory; exp_avg, exp_avg_sq and indices are 16-byte aligned. */
int rf_sparse_adamw_launch(const int32_t* first_tile, const RfAdamwSegment* segments, int32_t n_seg,
                           int32_t n_tiles, const void* indices, int32_t index_bytes, float* exp_avg,
                           float* exp_avg_sq, int32_t param_dtype, void* stream);

/* =================================================================================================================
 * Group advantages (rlvr_fast.ops.group_advantage): one launch; a team of lanes per group (a part of a warp for
 * G <= 32, a warp for G <= RF_GA_WARP_MAX_GROUP, a block beyond), the group's statistics reduced in registers.
 * The codes are the `code` fields of ESTIMATORS, SCALES and SAMPLE_MODE_CODES.
 * ================================================================================================================= */
enum { RF_GA_GRPO = 0, RF_GA_DR_GRPO = 1, RF_GA_RLOO = 2, RF_GA_PSR = 3, RF_GA_NSR = 4, RF_GA_W_REINFORCE = 5 };
enum { RF_GA_SCALE_GROUP = 0, RF_GA_SCALE_BATCH = 1, RF_GA_SCALE_NONE = 2 };
enum { RF_GA_SAMPLE_ALL = 0, RF_GA_SAMPLE_POSITIVE = 1, RF_GA_SAMPLE_NEGATIVE = 2 };
enum {
  RF_GA_THREADS = 256,
  RF_GA_WARP_MAX_GROUP = 2048,  /* larger groups take a whole block each */
  RF_GA_BATCH_MAX_BLOCKS = 1024 /* scale="batch" (a grid-wide reduction): at most this many co-resident blocks */
};
/* Floats of scratch the batch scale needs (eight per block: count, mean, M2, scale, unit, pad). */
#define RF_GA_SCRATCH_FLOATS (8 * RF_GA_BATCH_MAX_BLOCKS)

typedef struct RfGroupAdvantageArgs {
  const void* rewards;  /* (n_groups * group_size,) of rewards_dtype */
  const float* correct; /* (n_groups * group_size,) 0/1, or NULL */
  float* advantages;    /* (n_groups * group_size,) out */
  float* mean;          /* (n_groups,) out */
  float* std;           /* (n_groups,) out, Bessel-corrected */
  float* solve_rate;    /* (n_groups,) out (0 without correct) */
  int8_t* all_equal;    /* (n_groups,) out */
  int8_t* all_correct;  /* (n_groups,) out (0 without correct) */
  int8_t* all_wrong;    /* (n_groups,) out (0 without correct) */
  int64_t n_groups;
  int64_t group_size;
  int32_t rewards_dtype; /* RF_DTYPE_* */
  int32_t estimator;     /* RF_GA_* estimator */
  int32_t scale;         /* RF_GA_SCALE_* */
  int32_t sample_mode;   /* RF_GA_SAMPLE_* */
  float eps;
  float lam;
} RfGroupAdvantageArgs;

/* scratch: RF_GA_SCRATCH_FLOATS floats of device memory, used only when estimator is grpo and scale is batch
 * (may be NULL otherwise). The batch scale runs as a cooperative launch (one grid-wide barrier). */
int rf_group_advantage_launch(const RfGroupAdvantageArgs* args, float* scratch, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* RLVR_FAST_KERNELS_H */
