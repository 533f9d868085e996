// kaas: signature: vector_add(a: float32[n], b: float32[n], out: out float32[n], n: int32)
// kaas: grid: n
// kaas: block: 64
// kaas: doc: out = a + b
__kernel void vector_add(__global const float *a, __global const float *b,
                         __global float *out, const int n) {
    int i = get_global_id(0);
    if (i < n) out[i] = a[i] + b[i];
}
