// kaas: signature: matmul(a: float32[m, k], b: float32[k, n], c: out float32[m, n], m: int32, n: int32, k: int32)
// kaas: grid: n, m
// kaas: block: 16, 16
// kaas: doc: c = a @ b, tiled through shared memory (16x16 tiles)
#define TILE 16
extern "C" __global__ void matmul(const float *a, const float *b, float *c,
                                  const int m, const int n, const int k) {
    __shared__ float ta[TILE][TILE];
    __shared__ float tb[TILE][TILE];
    int lx = threadIdx.x, ly = threadIdx.y;
    int col = blockIdx.x * TILE + lx, row = blockIdx.y * TILE + ly;
    float acc = 0.0f;
    for (int t = 0; t < (k + TILE - 1) / TILE; t++) {
        int ak = t * TILE + lx, bk = t * TILE + ly;
        ta[ly][lx] = (row < m && ak < k) ? a[row * k + ak] : 0.0f;
        tb[ly][lx] = (col < n && bk < k) ? b[bk * n + col] : 0.0f;
        __syncthreads();
        for (int i = 0; i < TILE; i++) acc += ta[ly][i] * tb[i][lx];
        __syncthreads();
    }
    if (row < m && col < n) c[row * n + col] = acc;
}
