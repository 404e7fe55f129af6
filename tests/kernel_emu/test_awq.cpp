// awq.cu: awq_gemv_f32 (M = 1..9; the 128-bit path and the word path, taken for K % 32 != 0,
// G % 32 != 0 or misaligned x; bias, column offset/stride, no writes outside [col0, col0 + N)) and
// awq_dequant_f16 (bit-exact f16((q - z) * s), subnormal and large scales, grid-stride loop,
// misaligned output) against double references.
#include "emu.h"
#include "../../kernels/awq.cu"
#include <random>
static std::mt19937 rng(1);
float urand() { return std::uniform_real_distribution<float>(-1, 1)(rng); }
int fails = 0;
void check(const char* what, double got, double want, double tol) {
    if (!(std::fabs(got - want) <= tol * (1 + std::fabs(want)))) { if (fails < 20) printf("FAIL %s got %.7g want %.7g\n", what, got, want); ++fails; }
}
void run(int M, int K, int N, int G, bool with_bias, int col0, int extra_stride, bool misalign_x) {
    int KW = K / 8, NG = K / G;
    std::vector<uint32_t> qw(N * KW); for (auto& w : qw) w = rng();
    std::vector<__half> sc(N * NG), zr(N * NG);
    for (int i = 0; i < N * NG; ++i) { sc[i] = __float2half_rn(urand() * 0.05f); zr[i] = __float2half_rn((float)(rng() % 16)); }
    // occasionally subnormal / large scales
    sc[0] = __ushort_as_half(0x0003); if (N * NG > 1) sc[1] = __float2half_rn(1000.f);
    std::vector<float> xbuf(M * K + 4); float* x = xbuf.data() + (misalign_x ? 1 : 0);
    for (int i = 0; i < M * K; ++i) x[i] = urand();
    std::vector<float> bias(N); for (auto& b : bias) b = urand();
    int stride = col0 + N + extra_stride;
    std::vector<float> out(M * stride, 12345.f);
    emu_launch(dim3((N + AWQ_GEMV_ROWS_PER_BLOCK - 1) / AWQ_GEMV_ROWS_PER_BLOCK), dim3(AWQ_GEMV_THREADS), [&] {
        awq_gemv_f32(x, M, K, qw.data(), sc.data(), zr.data(), G, with_bias ? bias.data() : nullptr, out.data(), stride, col0, N); });
    // dequant kernel too
    std::vector<__half> wdb(N * K + 1);
    __half* wd = wdb.data() + (misalign_x ? 1 : 0);
    int words = N * KW;
    emu_launch(dim3(std::min((words + 255) / 256, 3)), dim3(256), [&] { awq_dequant_f16(qw.data(), sc.data(), zr.data(), G, wd, N, K); });
    char buf[200];
    for (int n = 0; n < N; ++n) {
        std::vector<float> w(K);
        for (int k = 0; k < K; ++k) {
            int q = (qw[n * KW + k / 8] >> (4 * (k % 8))) & 15;
            float z = h2f(zr[n * NG + k / G]), s = h2f(sc[n * NG + k / G]);
            w[k] = h2f(f2h((q - z) * s));
            snprintf(buf, 200, "dequant n=%d k=%d", n, k);
            if (wd[n * K + k].x != f2h((q - z) * s).x) check(buf, h2f(wd[n * K + k]), w[k], 0);
        }
        for (int m = 0; m < M; ++m) {
            double acc = with_bias ? bias[n] : 0, mag = 0;
            for (int k = 0; k < K; ++k) { acc += (double)x[m * K + k] * w[k]; mag += std::fabs((double)x[m * K + k] * w[k]); }
            snprintf(buf, 200, "gemv M=%d K=%d N=%d G=%d m=%d n=%d", M, K, N, G, m, n);
            check(buf, out[m * stride + col0 + n], acc, 1e-5 * (mag + 1));
        }
    }
    for (int m = 0; m < M; ++m) for (int c = 0; c < stride; ++c) if ((c < col0 || c >= col0 + N) && out[m * stride + c] != 12345.f) { printf("FAIL wrote outside m=%d c=%d\n", m, c); ++fails; }
}
int main() {
    for (int M : {1, 2, 3, 4, 5, 8, 9}) run(M, 256, 37, 128, true, 3, 2, false);
    run(1, 4096, 16, 128, false, 0, 0, false);
    run(2, 1024 + 32 * 5, 33, 32, true, 0, 0, false);   // K%32==0, G=32
    run(3, 200, 20, 8, true, 1, 0, false);              // K%32 != 0 -> slow path
    run(1, 240, 17, 48, false, 0, 1, false);             // G%32 != 0
    run(4, 256, 18, 64, true, 0, 0, true);              // misaligned x -> slow path
    run(8, 96, 5, 32, true, 0, 0, false);
    run(1, 64, 1, 64, false, 0, 0, false);
    printf(fails ? "awq: %d FAILURES\n" : "awq: all ok\n", fails);
    return fails != 0;
}
