// kaas: signature: reduce_sum(a: float32[n], partial: out float32[cdiv(n, 256)], n: int32)
// kaas: grid: cdiv(n, 256) * 256
// kaas: block: 256
// kaas: post: sum
// kaas: doc: sum of a; each block reduces 256 elements in shared memory, then the partial sums are added on the device
extern "C" __global__ void reduce_sum(const float *a, float *partial, const int n) {
    __shared__ float scratch[256];
    int l = threadIdx.x, i = blockIdx.x * blockDim.x + l;
    scratch[l] = i < n ? a[i] : 0.0f;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (l < s) scratch[l] += scratch[l + s];
        __syncthreads();
    }
    if (l == 0) partial[blockIdx.x] = scratch[0];
}
