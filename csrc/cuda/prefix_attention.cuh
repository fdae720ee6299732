// Tile index math of the prefix-causal attention kernels (csrc/cuda/prefix_attention_fwd.cu, _bwd.cu).
//
// Pure integer functions, __host__ __device__, so they can be checked on the host against a brute-force mask.
// Visibility rule: key j is visible to query i iff j <= i or j < M, where M is the prefix length prefix_lens[b]
// when causal (0 when prefix_lens is None) and S when not causal (then every key is visible). Indices in
// [0, S) only; tiles may run past S (zero-filled rows), and whatever lies past S is masked or ignored.
#pragma once

#if defined(__CUDACC__)
#define AIMV2_HD __host__ __device__ __forceinline__
#else
#define AIMV2_HD inline
#endif

namespace aimv2 {
namespace attn {

AIMV2_HD int imin(int a, int b) { return a < b ? a : b; }
AIMV2_HD int imax(int a, int b) { return a > b ? a : b; }
AIMV2_HD int cdiv(int a, int b) { return (a + b - 1) / b; }

// M of the rule above: keys j < M are visible to every query.
AIMV2_HD int visible_prefix(bool causal, int prefix, int S) { return causal ? prefix : S; }

// One (query, key) pair, both in [0, S) (the masked tile bodies add their own range tests).
AIMV2_HD bool visible(int i, int j, int M) { return j <= i || j < M; }

// Query tile [m0, m0 + bm): keys >= key_end are invisible to all of its queries (never loaded). At least 1.
AIMV2_HD int query_tile_key_end(int m0, int bm, int M, int S) { return imin(S, imax(m0 + bm, M)); }

// Key tile [n0, n0 + bn): queries < query_begin see none of its keys (never loaded). A multiple of bm.
AIMV2_HD int key_tile_query_begin(int n0, int bm, int M) { return n0 < M ? 0 : (n0 / bm) * bm; }

// The tile (queries [m0, m0 + bm), keys [n0, n0 + bn)) lies inside [0, S)^2 and every pair in it is visible:
// the kernels run it without evaluating the mask. The last key j1 - 1 = n0 + bn - 1 is visible to the first
// query m0 iff n0 + bn - 1 <= m0 or n0 + bn - 1 < M, and then every key <= j1 - 1 is visible to every query
// >= m0.
AIMV2_HD bool tile_unmasked(int m0, int bm, int n0, int bn, int M, int S) {
  return n0 + bn <= imax(M, m0 + 1) && n0 + bn <= S && m0 + bm <= S;
}

}  // namespace attn
}  // namespace aimv2
