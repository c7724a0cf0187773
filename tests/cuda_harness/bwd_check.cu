/*
 * bwd_check.cu: standalone check of taca_bwd_cuda (no torch), small enough for
 * compute-sanitizer. Random inputs, a float64 CPU reference (forward and gradients),
 * outputs poisoned with NaN before every run, two runs compared bitwise.
 *
 * Build (from the repo root; benchmarks/gpu_bwd_run.sh does this):
 *   gcc -O2 -std=c99 -Icsrc -c csrc/taca_common.c -o /tmp/taca_common.o
 *   nvcc -std=c++17 -O3 -Icsrc -Icsrc/cuda -gencode=arch=compute_90a,code=sm_90a \
 *     tests/cuda_harness/bwd_check.cu csrc/cuda/taca_bwd*.cu /tmp/taca_common.o -o /tmp/bwd_check
 * Run: /tmp/bwd_check [--quick]   exit status 0 when every case passes.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "taca.h"

/* taca_fwd.cu defines this in the real build; the harness links only the backward. */
int taca_cuda_record_error(cudaError_t err, const char *where) {
    fprintf(stderr, "CUDA error at %s: %s\n", where, cudaGetErrorString(err));
    return TACA_ERR_CUDA;
}

#define CK(x)                                                                       \
    do {                                                                            \
        cudaError_t e_ = (x);                                                       \
        if (e_ != cudaSuccess) {                                                    \
            fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); \
            exit(2);                                                                \
        }                                                                           \
    } while (0)

struct Case {
    int B, H, N, D, tb, te;
    float g0, g1, grev;
    bool bf16, bhnd_storage;
};

static uint16_t to16(float x, bool bf16) {
    if (bf16) {
        __nv_bfloat16 v = __float2bfloat16(x);
        return *reinterpret_cast<uint16_t *>(&v);
    }
    __half v = __float2half(x);
    return *reinterpret_cast<uint16_t *>(&v);
}
static float from16(uint16_t x, bool bf16) {
    if (bf16) return __bfloat162float(*reinterpret_cast<__nv_bfloat16 *>(&x));
    return __half2float(*reinterpret_cast<__half *>(&x));
}

static int run_case(const Case &c, std::mt19937 &rng) {
    const int B = c.B, H = c.H, N = c.N, D = c.D;
    const size_t n_el = (size_t)B * H * N * D;
    // Element strides of a (B, N, H, D) view: either that storage or (B, H, N, D) storage.
    taca_strides st;
    if (c.bhnd_storage) st = {(int64_t)H * N * D, (int64_t)D, (int64_t)N * D};
    else st = {(int64_t)N * H * D, (int64_t)H * D, (int64_t)D};
    auto idx = [&](int b, int n, int h, int d) {
        return (size_t)(b * st.b + n * st.n + h * st.h + d);
    };
    std::normal_distribution<float> nd(0.f, 1.f);
    std::vector<uint16_t> hq(n_el), hk(n_el), hv(n_el), hdo(n_el), ho(n_el);
    for (auto *t : {&hq, &hk, &hv, &hdo})
        for (auto &x : *t) x = to16(nd(rng), c.bf16);
    std::vector<float> gam = {c.g0, c.g1};
    gam.resize(B, c.g0);
    const float scale = 1.0f / std::sqrt((float)D);

    std::vector<double> rdq(n_el, 0), rdk(n_el, 0), rdv(n_el, 0);
    std::vector<float> hlse((size_t)B * H * N);
    std::vector<double> P((size_t)N * N), dS((size_t)N * N), M((size_t)N * N);
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h) {
            auto val = [&](const std::vector<uint16_t> &t, int n, int d) {
                return (double)from16(t[idx(b, n, h, d)], c.bf16);
            };
            for (int i = 0; i < N; ++i) {
                const bool qt = i >= c.tb && i < c.te;
                double mx = -1e300;
                for (int j = 0; j < N; ++j) {
                    const bool kt = j >= c.tb && j < c.te;
                    const double m = qt == kt ? 1.0 : (qt ? c.grev : gam[b]);
                    double s = 0;
                    for (int d = 0; d < D; ++d) s += val(hq, i, d) * val(hk, j, d);
                    s *= (double)scale * m;
                    M[(size_t)i * N + j] = m;
                    P[(size_t)i * N + j] = s;
                    mx = s > mx ? s : mx;
                }
                double sum = 0;
                for (int j = 0; j < N; ++j) sum += std::exp(P[(size_t)i * N + j] - mx);
                const double lse = mx + std::log(sum);
                hlse[((size_t)b * H + h) * N + i] = (float)lse;
                for (int j = 0; j < N; ++j) P[(size_t)i * N + j] = std::exp(P[(size_t)i * N + j] - lse);
                double delta = 0;
                for (int d = 0; d < D; ++d) {
                    double o = 0;
                    for (int j = 0; j < N; ++j) o += P[(size_t)i * N + j] * val(hv, j, d);
                    ho[idx(b, i, h, d)] = to16((float)o, c.bf16);
                    delta += o * val(hdo, i, d);
                }
                for (int j = 0; j < N; ++j) {
                    double dp = 0;
                    for (int d = 0; d < D; ++d) dp += val(hdo, i, d) * val(hv, j, d);
                    dS[(size_t)i * N + j] = P[(size_t)i * N + j] * (dp - delta) * M[(size_t)i * N + j];
                }
            }
            for (int i = 0; i < N; ++i)
                for (int j = 0; j < N; ++j) {
                    const double p = P[(size_t)i * N + j], ds = dS[(size_t)i * N + j];
                    for (int d = 0; d < D; ++d) {
                        rdv[idx(b, j, h, d)] += p * val(hdo, i, d);
                        rdk[idx(b, j, h, d)] += scale * ds * val(hq, i, d);
                        rdq[idx(b, i, h, d)] += scale * ds * val(hk, j, d);
                    }
                }
        }

    const size_t bytes = n_el * 2;
    void *dq_, *dk_, *dv_, *q_, *k_, *v_, *o_, *do_;
    float *lse_, *g_;
    CK(cudaMalloc(&q_, bytes)); CK(cudaMalloc(&k_, bytes)); CK(cudaMalloc(&v_, bytes));
    CK(cudaMalloc(&o_, bytes)); CK(cudaMalloc(&do_, bytes));
    CK(cudaMalloc(&dq_, bytes)); CK(cudaMalloc(&dk_, bytes)); CK(cudaMalloc(&dv_, bytes));
    CK(cudaMalloc(&lse_, hlse.size() * 4)); CK(cudaMalloc(&g_, B * 4));
    CK(cudaMemcpy(q_, hq.data(), bytes, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(k_, hk.data(), bytes, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(v_, hv.data(), bytes, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(o_, ho.data(), bytes, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(do_, hdo.data(), bytes, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(lse_, hlse.data(), hlse.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(g_, gam.data(), B * 4, cudaMemcpyHostToDevice));

    taca_bwd_params p;
    memset(&p, 0, sizeof(p));
    p.q = q_; p.k = k_; p.v = v_; p.out = o_; p.dout = do_; p.lse = lse_;
    p.dq = dq_; p.dk = dk_; p.dv = dv_;
    p.q_stride = p.k_stride = p.v_stride = p.out_stride = p.dout_stride = st;
    p.dq_stride = p.dk_stride = p.dv_stride = st;
    p.batch = B; p.seqlen = N; p.heads = H; p.head_dim = D;
    p.seqlen_k = N; p.heads_kv = H;
    p.text_begin = p.q_text_begin = c.tb; p.text_end = p.q_text_end = c.te;
    p.gamma = g_; p.gamma_reverse = c.grev; p.scale = scale;
    p.dtype = c.bf16 ? TACA_BF16 : TACA_F16;
    p.deterministic = 1;
    const size_t ws = taca_bwd_workspace_size(&p);
    void *ws_ = nullptr;
    CK(cudaMalloc(&ws_, ws ? ws : 16));
    CK(cudaMemset(ws_, 0xff, ws ? ws : 16));  // poison: the kernel must not read stale workspace
    p.workspace = ws_;
    p.workspace_bytes = ws;

    std::vector<uint16_t> out[2][3];
    for (int rep = 0; rep < 2; ++rep) {
        CK(cudaMemset(dq_, 0xff, bytes)); CK(cudaMemset(dk_, 0xff, bytes)); CK(cudaMemset(dv_, 0xff, bytes));
        int s = taca_bwd_cuda(&p, nullptr);
        if (s != TACA_OK) {
            fprintf(stderr, "taca_bwd_cuda: %s\n", taca_status_string(s));
            return 1;
        }
        CK(cudaDeviceSynchronize());
        void *src[3] = {dq_, dk_, dv_};
        for (int t = 0; t < 3; ++t) {
            out[rep][t].resize(n_el);
            CK(cudaMemcpy(out[rep][t].data(), src[t], bytes, cudaMemcpyDeviceToHost));
        }
    }
    const char *names[3] = {"dq", "dk", "dv"};
    const std::vector<double> *refs[3] = {&rdq, &rdk, &rdv};
    int fail = 0;
    printf("B=%d H=%d N=%d D=%d text=[%d,%d) g=%.2f,%.2f grev=%.2f %s %s:", B, H, N, D, c.tb, c.te,
           c.g0, c.g1, c.grev, c.bf16 ? "bf16" : "fp16", c.bhnd_storage ? "bhnd-view" : "bnhd");
    for (int t = 0; t < 3; ++t) {
        if (memcmp(out[0][t].data(), out[1][t].data(), bytes) != 0) {
            printf(" %s NOT DETERMINISTIC", names[t]);
            fail = 1;
        }
        double err = 0, mag = 0;
        bool finite = true;
        for (int b = 0; b < B; ++b)
            for (int n = 0; n < N; ++n)
                for (int h = 0; h < H; ++h)
                    for (int d = 0; d < D; ++d) {
                        const size_t i = idx(b, n, h, d);
                        const double x = from16(out[0][t][i], c.bf16);
                        if (!std::isfinite(x)) finite = false;
                        err = std::fmax(err, std::fabs(x - (*refs[t])[i]));
                        mag = std::fmax(mag, std::fabs((*refs[t])[i]));
                    }
        const double rel = err / (mag + 1e-12);
        // Sanity bound only (the tolerance rule against PyTorch lives in tests/test_cuda_bwd.py):
        // bf16 rounding of inputs, P and dS gives relative errors near 1e-2 at most.
        const bool ok = finite && rel < (c.bf16 ? 3e-2 : 6e-3);
        printf(" %s err=%.3g rel=%.3g%s", names[t], err, rel, ok ? "" : (finite ? " FAIL" : " NONFINITE"));
        fail |= !ok;
    }
    printf("\n");
    cudaFree(q_); cudaFree(k_); cudaFree(v_); cudaFree(o_); cudaFree(do_);
    cudaFree(dq_); cudaFree(dk_); cudaFree(dv_); cudaFree(lse_); cudaFree(g_); cudaFree(ws_);
    return fail;
}

int main(int argc, char **argv) {
    const bool quick = argc > 1 && strcmp(argv[1], "--quick") == 0;
    std::mt19937 rng(1234);
    std::vector<Case> cases = {
        {1, 2, 174, 64, 0, 77, 1.3f, 1.3f, 1.0f, true, false},
        {2, 1, 300, 128, 200, 300, 1.25f, 0.8f, 1.1f, false, true},
        {1, 1, 1, 64, 0, 1, 1.2f, 1.2f, 1.0f, true, false},
        {1, 2, 98, 33, 0, 1, 1.5f, 1.5f, 0.9f, true, true},
        {1, 1, 174, 200, 97, 174, 1.2f, 1.2f, 1.3f, false, false},
        {1, 1, 130, 96, 0, 0, 1.2f, 1.2f, 1.0f, true, false},
        {1, 1, 257, 128, 0, 257, 1.2f, 1.2f, 1.0f, true, false},
        {1, 1, 2100, 64, 2023, 2100, 1.3f, 1.3f, 0.8f, true, false},  // 17 key tiles: 2 chains
    };
    if (quick) cases.resize(4);
    int fail = 0;
    for (const Case &c : cases) fail |= run_case(c, rng);
    printf(fail ? "bwd_check: FAIL\n" : "bwd_check: all passed\n");
    return fail;
}
