// kaas: signature: mandelbrot(out: out int32[height, width], width: int32, height: int32, x0: float32, x1: float32, y0: float32, y1: float32, max_iter: int32)
// kaas: grid: width, height
// kaas: block: 16, 16
// kaas: doc: escape iteration counts of the Mandelbrot set on a width x height grid over [x0, x1] x [y0, y1]
__kernel void mandelbrot(__global int *out, const int width, const int height,
                         const float x0, const float x1, const float y0, const float y1,
                         const int max_iter) {
    int px = get_global_id(0), py = get_global_id(1);
    if (px >= width || py >= height) return;
    float cr = x0 + (x1 - x0) * px / (float)width;
    float ci = y0 + (y1 - y0) * py / (float)height;
    float zr = 0.0f, zi = 0.0f;
    int it = 0;
    while (it < max_iter && zr * zr + zi * zi <= 4.0f) {
        float t = zr * zr - zi * zi + cr;
        zi = 2.0f * zr * zi + ci;
        zr = t;
        it++;
    }
    out[py * width + px] = it;
}
