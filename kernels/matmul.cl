// kaas: signature: matmul(a: float32[m, k], b: float32[k, n], c: out float32[m, n], m: int32, n: int32, k: int32)
// kaas: grid: n, m
// kaas: block: 16, 16
// kaas: doc: c = a @ b, tiled through local memory (16x16 tiles)
#define TILE 16
__kernel void matmul(__global const float *a, __global const float *b, __global float *c,
                     const int m, const int n, const int k) {
    __local float ta[TILE][TILE];
    __local float tb[TILE][TILE];
    int col = get_global_id(0), row = get_global_id(1);
    int lx = get_local_id(0), ly = get_local_id(1);
    float acc = 0.0f;
    for (int t = 0; t < (k + TILE - 1) / TILE; t++) {
        int ak = t * TILE + lx, bk = t * TILE + ly;
        ta[ly][lx] = (row < m && ak < k) ? a[row * k + ak] : 0.0f;
        tb[ly][lx] = (col < n && bk < k) ? b[bk * n + col] : 0.0f;
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int i = 0; i < TILE; i++) acc += ta[ly][i] * tb[i][lx];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (row < m && col < n) c[row * n + col] = acc;
}
