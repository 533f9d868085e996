// kaas: signature: vector_add(a: float32[n], b: float32[n], out: out float32[n], n: int32)
// kaas: grid: n
// kaas: block: 256
// kaas: doc: out = a + b
extern "C" __global__ void vector_add(const float *a, const float *b, float *out, const int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a[i] + b[i];
}
