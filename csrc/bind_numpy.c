/*
 * bind_numpy.c: module taca._numpy_C, the CPU kernels (taca_fwd_cpu / taca_bwd_cpu) on numpy
 * arrays, without torch. taca/numpy.py is the public wrapper; these functions are nevertheless
 * safe to call directly with anything: every argument is checked here and a bad one raises
 * TypeError or ValueError naming it (never a crash).
 *
 *   forward(q, k, v, *, text_len, text_first=True, gamma=1.0, gamma_reverse=1.0, scale=None,
 *           layout="bhnd", return_lse=False, return_text_mass=False, num_threads=0)
 *       -> (out, lse or None, text_mass or None)
 *   backward(dout, q, k, v, out, lse, *, text_len, text_first=True, gamma=1.0,
 *            gamma_reverse=1.0, scale=None, layout="bhnd", num_threads=0) -> (dq, dk, dv)
 *
 * q, k, v...: float32 or float64 ndarrays, (B, H, N, D) for "bhnd" or (B, N, H, D) for "bnhd",
 * passed to C by element strides (copied only if D is not contiguous, a stride is negative or
 * not a multiple of the item size, or the data is unaligned or byte-swapped). Outputs are new
 * C-contiguous arrays in the input layout; lse/text_mass are (B, H, N) float32 (float64 for
 * float64 inputs). gamma, gamma_reverse and scale reach the kernel as double for float64 inputs.
 * One shared text span on one token set, equal heads, no mask. The GIL is released while a
 * kernel runs.
 * Build: setup.py (taca._numpy_C), linked with libtaca_core.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_API_VERSION
#include <numpy/arrayobject.h>

#include <math.h>
#include <string.h>

#include "taca.h"

#define MAX_THREADS 1024

/* A non-TypeError/ValueError raised while converting `name` becomes a ValueError naming it. */
static void normalize_error(const char *name) {
    PyObject *type, *value, *tb;
    if (!PyErr_Occurred()) return;
    if (PyErr_ExceptionMatches(PyExc_TypeError) || PyErr_ExceptionMatches(PyExc_ValueError) ||
        PyErr_ExceptionMatches(PyExc_MemoryError))
        return;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    PyErr_Format(PyExc_ValueError, "taca: invalid %s (%S)", name, value ? value : Py_None);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
}

static int is_real_scalar(PyObject *o) {
    if (PyBool_Check(o)) return 0;
    if (PyFloat_Check(o) || PyLong_Check(o)) return 1;
    return PyArray_IsScalar(o, Floating) || PyArray_IsScalar(o, Integer);
}

/* A real number (Python or numpy scalar, not bool) as double; -1 with an exception if not. */
static int get_real(PyObject *o, const char *name, double *out) {
    if (!is_real_scalar(o)) {
        PyErr_Format(PyExc_TypeError, "taca: %s must be a real number, got %s", name,
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    *out = PyFloat_AsDouble(o);
    if (*out == -1.0 && PyErr_Occurred()) {
        normalize_error(name);
        return -1;
    }
    return 0;
}

/* A flag: bool, numpy bool or the ints 0/1. */
static int get_flag(PyObject *o, const char *name, int *out) {
    if (PyBool_Check(o) || PyArray_IsScalar(o, Bool)) {
        *out = PyObject_IsTrue(o);
        return *out < 0 ? -1 : 0;
    }
    if (PyLong_Check(o) || PyArray_IsScalar(o, Integer)) {
        int overflow = 0;
        long long x = PyLong_Check(o) ? PyLong_AsLongLongAndOverflow(o, &overflow) : 0;
        if (!PyLong_Check(o)) {
            PyObject *i = PyNumber_Index(o);
            if (!i) {
                normalize_error(name);
                return -1;
            }
            x = PyLong_AsLongLongAndOverflow(i, &overflow);
            Py_DECREF(i);
        }
        if (x == -1 && PyErr_Occurred()) {
            normalize_error(name);
            return -1;
        }
        if (overflow || (x != 0 && x != 1)) {
            PyErr_Format(PyExc_ValueError, "taca: %s must be a bool", name);
            return -1;
        }
        *out = (int)x;
        return 0;
    }
    PyErr_Format(PyExc_TypeError, "taca: %s must be a bool, got %s", name, Py_TYPE(o)->tp_name);
    return -1;
}

/* An integer (Python or numpy, not bool) as long long; *overflow set if out of range. */
static int get_int(PyObject *o, const char *name, long long *out, int *overflow) {
    PyObject *i;
    if (PyBool_Check(o) || !(PyLong_Check(o) || PyArray_IsScalar(o, Integer))) {
        PyErr_Format(PyExc_TypeError, "taca: %s must be an int, got %s", name,
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    i = PyNumber_Index(o);
    if (!i) {
        normalize_error(name);
        return -1;
    }
    *overflow = 0;
    *out = PyLong_AsLongLongAndOverflow(i, overflow);
    Py_DECREF(i);
    if (*out == -1 && PyErr_Occurred()) {
        normalize_error(name);
        return -1;
    }
    return 0;
}

/* layout: 0 for "bhnd", 1 for "bnhd". */
static int get_layout(PyObject *o, int *bnhd) {
    if (!PyUnicode_Check(o)) {
        PyErr_Format(PyExc_TypeError, "taca: layout must be a str, got %s", Py_TYPE(o)->tp_name);
        return -1;
    }
    if (PyUnicode_CompareWithASCIIString(o, "bhnd") == 0) {
        *bnhd = 0;
        return 0;
    }
    if (PyUnicode_CompareWithASCIIString(o, "bnhd") == 0) {
        *bnhd = 1;
        return 0;
    }
    PyErr_Format(PyExc_ValueError, "taca: layout=%R is not one of ('bhnd', 'bnhd')", o);
    return -1;
}

static int get_threads(PyObject *o, int *nt) {
    long long x;
    int overflow;
    if (get_int(o, "num_threads", &x, &overflow) < 0) return -1;
    if (overflow > 0 || x > MAX_THREADS) {
        PyErr_Format(PyExc_ValueError, "taca: num_threads must be <= %d (<= 0: default)",
                     MAX_THREADS);
        return -1;
    }
    *nt = (overflow < 0 || x <= 0) ? 0 : (int)x;
    return 0;
}

/* gamma: a real number or a (B,) array-like of them, written as B values of the kernel's
 * accumulation type (taca.h): double for float64 inputs, float (rounded once) for float32;
 * checked finite and > 0 in that type. buf has room for max(B, 1) doubles. */
static int get_gamma(PyObject *o, npy_intp B, int f64, double *buf) {
    PyArrayObject *a = NULL;
    const double *g;
    npy_intp b, n;
    if (is_real_scalar(o)) {
        double x;
        if (get_real(o, "gamma", &x) < 0) return -1;
        buf[0] = x;
        for (b = 0; b < B; ++b) buf[b] = x;
        n = B > 0 ? B : 1;
    } else {
        if (PyBool_Check(o) || PyUnicode_Check(o) || PyBytes_Check(o) || o == Py_None) {
            PyErr_Format(PyExc_TypeError, "taca: gamma must be a float or a (B,) array, got %s",
                         Py_TYPE(o)->tp_name);
            return -1;
        }
        a = (PyArrayObject *)PyArray_FROM_OTF(o, NPY_FLOAT64, NPY_ARRAY_IN_ARRAY);
        if (!a) {
            normalize_error("gamma");
            return -1;
        }
        if (PyArray_NDIM(a) > 1 || (PyArray_NDIM(a) == 1 && PyArray_DIM(a, 0) != B)) {
            PyErr_Format(PyExc_ValueError,
                         "taca: gamma must be a float or a (B,) array with B=%zd, got %d "
                         "dimensions of sizes starting %zd",
                         (Py_ssize_t)B, PyArray_NDIM(a),
                         (Py_ssize_t)(PyArray_NDIM(a) ? PyArray_DIM(a, 0) : 1));
            Py_DECREF(a);
            return -1;
        }
        g = (const double *)PyArray_DATA(a);
        for (b = 0; b < B; ++b) buf[b] = PyArray_NDIM(a) == 0 ? g[0] : g[b];
        n = B;
        if (PyArray_NDIM(a) == 0 && B == 0) buf[0] = g[0], n = 1;
        Py_DECREF(a);
    }
    for (b = 0; b < n; ++b) {
        const double x = f64 ? buf[b] : (double)(float)buf[b];
        if (!isfinite(x) || !(x > 0.0)) {
            PyObject *val = PyFloat_FromDouble(x);
            if (val) {
                PyErr_Format(PyExc_ValueError, "taca: gamma[%zd]=%R must be finite and > 0%s",
                             (Py_ssize_t)b, val, f64 ? "" : " (as float32)");
                Py_DECREF(val);
            }
            return -1;
        }
    }
    if (!f64) { /* float32 kernel: floats over the same memory (float b never overtakes double b) */
        float *fb = (float *)buf;
        for (b = 0; b < n; ++b) fb[b] = (float)buf[b];
    }
    return 0;
}

/*
 * Checks one (B, ., ., D) tensor and returns a new reference to an array the kernel can read
 * (the input itself, or a C-contiguous native copy), with its (b, n, h) element strides.
 * *typenum: NPY_NOTYPE on the first tensor (taken from it), then required to match.
 */
static PyArrayObject *as_tensor(PyObject *o, const char *name, int bnhd, int *typenum,
                                npy_intp shape[4], int first, taca_strides *st) {
    PyArrayObject *a, *c;
    npy_intp item, s[4];
    int d, ok = 1;
    if (!PyArray_Check(o)) {
        PyErr_Format(PyExc_TypeError, "taca: %s must be a numpy.ndarray, got %s", name,
                     Py_TYPE(o)->tp_name);
        return NULL;
    }
    a = (PyArrayObject *)o;
    if (PyArray_NDIM(a) != 4) {
        PyErr_Format(PyExc_ValueError, "taca: %s must have 4 dimensions (%s), got %d", name,
                     bnhd ? "B, N, H, D" : "B, H, N, D", PyArray_NDIM(a));
        return NULL;
    }
    if (PyArray_TYPE(a) != NPY_FLOAT && PyArray_TYPE(a) != NPY_DOUBLE) {
        PyErr_Format(PyExc_TypeError, "taca: %s must be float32 or float64, got %R", name,
                     (PyObject *)PyArray_DESCR(a));
        return NULL;
    }
    if (first) {
        *typenum = PyArray_TYPE(a);
        for (d = 0; d < 4; ++d) shape[d] = PyArray_DIM(a, d);
    } else {
        if (PyArray_TYPE(a) != *typenum) {
            PyErr_Format(PyExc_TypeError, "taca: %s has dtype %R, expected %s like the first tensor",
                         name, (PyObject *)PyArray_DESCR(a),
                         *typenum == NPY_FLOAT ? "float32" : "float64");
            return NULL;
        }
        for (d = 0; d < 4; ++d) {
            if (PyArray_DIM(a, d) != shape[d]) {
                PyErr_Format(PyExc_ValueError,
                             "taca: %s has shape (%zd, %zd, %zd, %zd), expected (%zd, %zd, %zd, %zd)",
                             name, (Py_ssize_t)PyArray_DIM(a, 0), (Py_ssize_t)PyArray_DIM(a, 1),
                             (Py_ssize_t)PyArray_DIM(a, 2), (Py_ssize_t)PyArray_DIM(a, 3),
                             (Py_ssize_t)shape[0], (Py_ssize_t)shape[1], (Py_ssize_t)shape[2],
                             (Py_ssize_t)shape[3]);
                return NULL;
            }
        }
    }
    item = PyArray_ITEMSIZE(a);
    for (d = 0; d < 4; ++d) {
        /* the stride of a dimension of size <= 1 is never used */
        s[d] = PyArray_DIM(a, d) <= 1 ? 0 : PyArray_STRIDE(a, d);
        if (s[d] < 0 || s[d] % item != 0) ok = 0;
    }
    if (PyArray_DIM(a, 3) > 1 && s[3] != item) ok = 0;
    if (!PyArray_ISALIGNED(a) || !PyArray_ISNOTSWAPPED(a)) ok = 0;
    if (ok) {
        Py_INCREF(a);
        c = a;
    } else {
        c = (PyArrayObject *)PyArray_FROM_OTF(o, *typenum, NPY_ARRAY_IN_ARRAY);
        if (!c) return NULL;
        for (d = 0; d < 4; ++d) s[d] = PyArray_DIM(c, d) <= 1 ? 0 : PyArray_STRIDE(c, d);
    }
    st->b = s[0] / item;
    st->h = (bnhd ? s[2] : s[1]) / item;
    st->n = (bnhd ? s[1] : s[2]) / item;
    return c;
}

static void out_strides(const npy_intp shape[4], int bnhd, taca_strides *st) {
    /* C-contiguous array of `shape` */
    int64_t s2 = shape[3], s1 = s2 * shape[2], s0 = s1 * shape[1];
    st->b = s0;
    st->h = bnhd ? s2 : s1;
    st->n = bnhd ? s1 : s2;
}

static PyObject *status_error(int st) {
    if (st == TACA_ERR_ALLOC) return PyErr_NoMemory();
    PyErr_Format(PyExc_ValueError, "taca: kernel rejected the arguments: %s",
                 taca_status_string(st));
    return NULL;
}

/* Scalar keyword arguments shared by forward and backward, checked against (B, N, D). */
typedef struct {
    int64_t tb, te;
    double gamma_reverse, scale;
    int bnhd, text_first, num_threads;
} common_args;

static int parse_common(PyObject *text_len, PyObject *text_first, PyObject *gamma_reverse,
                        PyObject *scale, PyObject *layout, PyObject *num_threads,
                        common_args *ca) {
    double x;
    if (text_len == NULL) {
        PyErr_SetString(PyExc_TypeError, "taca: text_len is required");
        return -1;
    }
    if (get_layout(layout, &ca->bnhd) < 0) return -1;
    if (get_flag(text_first, "text_first", &ca->text_first) < 0) return -1;
    if (get_real(gamma_reverse, "gamma_reverse", &x) < 0) return -1;
    ca->gamma_reverse = x;
    if (!isfinite(ca->gamma_reverse) || !(ca->gamma_reverse > 0.0)) {
        PyErr_Format(PyExc_ValueError, "taca: gamma_reverse=%R must be finite and > 0",
                     gamma_reverse);
        return -1;
    }
    if (scale == Py_None) {
        ca->scale = NAN; /* resolved in resolve_common() */
    } else {
        if (get_real(scale, "scale", &x) < 0) return -1;
        ca->scale = x;
        if (!isfinite(ca->scale)) {
            PyErr_Format(PyExc_ValueError, "taca: scale=%R must be finite", scale);
            return -1;
        }
    }
    if (get_threads(num_threads, &ca->num_threads) < 0) return -1;
    return 0;
}

static int resolve_common(PyObject *text_len, const npy_intp shape[4], common_args *ca) {
    const int64_t N = ca->bnhd ? shape[1] : shape[2], D = shape[3];
    long long L;
    int overflow;
    if (get_int(text_len, "text_len", &L, &overflow) < 0) return -1;
    if (overflow || L < 0 || L > N) {
        PyErr_Format(PyExc_ValueError, "taca: text_len=%S must be in [0, %lld] (the sequence length)",
                     text_len, (long long)N);
        return -1;
    }
    if (D < 1 || D > TACA_MAX_HEAD_DIM) {
        PyErr_Format(PyExc_ValueError, "taca: head dim D=%lld must be in [1, %d]", (long long)D,
                     TACA_MAX_HEAD_DIM);
        return -1;
    }
    ca->tb = ca->text_first ? 0 : N - L;
    ca->te = ca->text_first ? L : N;
    if (isnan(ca->scale)) ca->scale = 1.0 / sqrt((double)D);
    return 0;
}

static char *fwd_kwlist[] = {"q", "k", "v", "text_len", "text_first", "gamma", "gamma_reverse",
                             "scale", "layout", "return_lse", "return_text_mass", "num_threads",
                             NULL};

static PyObject *py_forward(PyObject *self, PyObject *args, PyObject *kwargs) {
    PyObject *oq, *ok, *ov, *text_len = NULL, *text_first = Py_True, *gamma = NULL,
                                *gamma_reverse = NULL, *scale = Py_None, *layout = NULL,
                                *ret_lse = Py_False, *ret_tm = Py_False, *num_threads = NULL;
    PyObject *one = NULL, *bhnd = NULL, *zero = NULL, *result = NULL;
    PyArrayObject *q = NULL, *k = NULL, *v = NULL, *out = NULL, *lse = NULL, *tm = NULL;
    double *gbuf = NULL;
    npy_intp shape[4], sshape[3];
    int typenum = NPY_NOTYPE, want_lse, want_tm, st;
    common_args ca;
    taca_fwd_params p;
    (void)self;

    one = PyFloat_FromDouble(1.0);
    bhnd = PyUnicode_FromString("bhnd");
    zero = PyLong_FromLong(0);
    if (!one || !bhnd || !zero) goto fail;
    gamma = gamma_reverse = one;
    layout = bhnd;
    num_threads = zero;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|$OOOOOOOOO:forward", fwd_kwlist, &oq, &ok,
                                     &ov, &text_len, &text_first, &gamma, &gamma_reverse, &scale,
                                     &layout, &ret_lse, &ret_tm, &num_threads))
        goto fail;
    if (parse_common(text_len, text_first, gamma_reverse, scale, layout, num_threads, &ca) < 0)
        goto fail;
    if (get_flag(ret_lse, "return_lse", &want_lse) < 0) goto fail;
    if (get_flag(ret_tm, "return_text_mass", &want_tm) < 0) goto fail;
    memset(&p, 0, sizeof(p));
    if (!(q = as_tensor(oq, "q", ca.bnhd, &typenum, shape, 1, &p.q_stride))) goto fail;
    if (!(k = as_tensor(ok, "k", ca.bnhd, &typenum, shape, 0, &p.k_stride))) goto fail;
    if (!(v = as_tensor(ov, "v", ca.bnhd, &typenum, shape, 0, &p.v_stride))) goto fail;
    if (resolve_common(text_len, shape, &ca) < 0) goto fail;
    if (!(gbuf = (double *)PyMem_Malloc((size_t)(shape[0] > 0 ? shape[0] : 1) * sizeof(double)))) {
        PyErr_NoMemory();
        goto fail;
    }
    if (get_gamma(gamma, shape[0], typenum == NPY_DOUBLE, gbuf) < 0) goto fail;

    if (!(out = (PyArrayObject *)PyArray_SimpleNew(4, shape, typenum))) goto fail;
    sshape[0] = shape[0];
    sshape[1] = ca.bnhd ? shape[2] : shape[1];
    sshape[2] = ca.bnhd ? shape[1] : shape[2];
    if (want_lse && !(lse = (PyArrayObject *)PyArray_SimpleNew(3, sshape, typenum))) goto fail;
    if (want_tm && !(tm = (PyArrayObject *)PyArray_SimpleNew(3, sshape, typenum))) goto fail;

    p.q = PyArray_DATA(q);
    p.k = PyArray_DATA(k);
    p.v = PyArray_DATA(v);
    p.out = PyArray_DATA(out);
    p.lse = lse ? PyArray_DATA(lse) : NULL;
    p.text_mass = tm ? PyArray_DATA(tm) : NULL;
    out_strides(shape, ca.bnhd, &p.out_stride);
    p.batch = shape[0];
    p.heads = sshape[1];
    p.seqlen = sshape[2];
    p.head_dim = shape[3];
    p.seqlen_k = p.seqlen;
    p.heads_kv = p.heads;
    p.text_begin = p.q_text_begin = ca.tb;
    p.text_end = p.q_text_end = ca.te;
    p.gamma = gbuf;
    p.gamma_reverse = ca.gamma_reverse;
    p.scale = ca.scale;
    p.dtype = typenum == NPY_DOUBLE ? TACA_F64 : TACA_F32;
    p.num_threads = ca.num_threads;
    Py_BEGIN_ALLOW_THREADS
    st = taca_fwd_cpu(&p);
    Py_END_ALLOW_THREADS
    if (st != TACA_OK) {
        status_error(st);
        goto fail;
    }
    result = Py_BuildValue("(OOO)", out, lse ? (PyObject *)lse : Py_None,
                           tm ? (PyObject *)tm : Py_None);
fail:
    Py_XDECREF(one);
    Py_XDECREF(bhnd);
    Py_XDECREF(zero);
    Py_XDECREF(q);
    Py_XDECREF(k);
    Py_XDECREF(v);
    Py_XDECREF(out);
    Py_XDECREF(lse);
    Py_XDECREF(tm);
    PyMem_Free(gbuf);
    return result;
}

static char *bwd_kwlist[] = {"dout", "q", "k", "v", "out", "lse", "text_len", "text_first",
                             "gamma", "gamma_reverse", "scale", "layout", "num_threads", NULL};

static PyObject *py_backward(PyObject *self, PyObject *args, PyObject *kwargs) {
    PyObject *odo, *oq, *ok, *ov, *oo, *olse, *text_len = NULL, *text_first = Py_True,
                                               *gamma = NULL, *gamma_reverse = NULL,
                                               *scale = Py_None, *layout = NULL,
                                               *num_threads = NULL;
    PyObject *one = NULL, *bhnd = NULL, *zero = NULL, *result = NULL;
    PyArrayObject *dout = NULL, *q = NULL, *k = NULL, *v = NULL, *out = NULL, *lse = NULL,
                  *dq = NULL, *dk = NULL, *dv = NULL;
    double *gbuf = NULL;
    npy_intp shape[4];
    int typenum = NPY_NOTYPE, st;
    common_args ca;
    taca_bwd_params p;
    (void)self;

    one = PyFloat_FromDouble(1.0);
    bhnd = PyUnicode_FromString("bhnd");
    zero = PyLong_FromLong(0);
    if (!one || !bhnd || !zero) goto fail;
    gamma = gamma_reverse = one;
    layout = bhnd;
    num_threads = zero;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOO|$OOOOOOO:backward", bwd_kwlist, &odo,
                                     &oq, &ok, &ov, &oo, &olse, &text_len, &text_first, &gamma,
                                     &gamma_reverse, &scale, &layout, &num_threads))
        goto fail;
    if (parse_common(text_len, text_first, gamma_reverse, scale, layout, num_threads, &ca) < 0)
        goto fail;
    memset(&p, 0, sizeof(p));
    if (!(dout = as_tensor(odo, "dout", ca.bnhd, &typenum, shape, 1, &p.dout_stride))) goto fail;
    if (!(q = as_tensor(oq, "q", ca.bnhd, &typenum, shape, 0, &p.q_stride))) goto fail;
    if (!(k = as_tensor(ok, "k", ca.bnhd, &typenum, shape, 0, &p.k_stride))) goto fail;
    if (!(v = as_tensor(ov, "v", ca.bnhd, &typenum, shape, 0, &p.v_stride))) goto fail;
    if (!(out = as_tensor(oo, "out", ca.bnhd, &typenum, shape, 0, &p.out_stride))) goto fail;
    if (resolve_common(text_len, shape, &ca) < 0) goto fail;
    p.batch = shape[0];
    p.heads = ca.bnhd ? shape[2] : shape[1];
    p.seqlen = ca.bnhd ? shape[1] : shape[2];
    p.head_dim = shape[3];

    if (!PyArray_Check(olse)) {
        PyErr_Format(PyExc_TypeError, "taca: lse must be a numpy.ndarray, got %s",
                     Py_TYPE(olse)->tp_name);
        goto fail;
    }
    if (PyArray_TYPE((PyArrayObject *)olse) != NPY_FLOAT &&
        PyArray_TYPE((PyArrayObject *)olse) != NPY_DOUBLE) {
        PyErr_Format(PyExc_TypeError, "taca: lse must be float32 or float64, got %R",
                     (PyObject *)PyArray_DESCR((PyArrayObject *)olse));
        goto fail;
    }
    if (PyArray_NDIM((PyArrayObject *)olse) != 3 ||
        PyArray_DIM((PyArrayObject *)olse, 0) != p.batch ||
        PyArray_DIM((PyArrayObject *)olse, 1) != p.heads ||
        PyArray_DIM((PyArrayObject *)olse, 2) != p.seqlen) {
        PyErr_Format(PyExc_ValueError, "taca: lse must have shape (B, H, N) = (%lld, %lld, %lld)",
                     (long long)p.batch, (long long)p.heads, (long long)p.seqlen);
        goto fail;
    }
    lse = (PyArrayObject *)PyArray_FROM_OTF(olse, typenum, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
    if (!lse) goto fail;

    if (!(gbuf = (double *)PyMem_Malloc((size_t)(shape[0] > 0 ? shape[0] : 1) * sizeof(double)))) {
        PyErr_NoMemory();
        goto fail;
    }
    if (get_gamma(gamma, shape[0], typenum == NPY_DOUBLE, gbuf) < 0) goto fail;
    if (!(dq = (PyArrayObject *)PyArray_SimpleNew(4, shape, typenum))) goto fail;
    if (!(dk = (PyArrayObject *)PyArray_SimpleNew(4, shape, typenum))) goto fail;
    if (!(dv = (PyArrayObject *)PyArray_SimpleNew(4, shape, typenum))) goto fail;
    out_strides(shape, ca.bnhd, &p.dq_stride);
    p.dk_stride = p.dv_stride = p.dq_stride;
    p.q = PyArray_DATA(q);
    p.k = PyArray_DATA(k);
    p.v = PyArray_DATA(v);
    p.out = PyArray_DATA(out);
    p.dout = PyArray_DATA(dout);
    p.lse = PyArray_DATA(lse);
    p.dq = PyArray_DATA(dq);
    p.dk = PyArray_DATA(dk);
    p.dv = PyArray_DATA(dv);
    p.seqlen_k = p.seqlen;
    p.heads_kv = p.heads;
    p.text_begin = p.q_text_begin = ca.tb;
    p.text_end = p.q_text_end = ca.te;
    p.gamma = gbuf;
    p.gamma_reverse = ca.gamma_reverse;
    p.scale = ca.scale;
    p.dtype = typenum == NPY_DOUBLE ? TACA_F64 : TACA_F32;
    p.num_threads = ca.num_threads;
    p.deterministic = 1;
    Py_BEGIN_ALLOW_THREADS
    st = taca_bwd_cpu(&p);
    Py_END_ALLOW_THREADS
    if (st != TACA_OK) {
        status_error(st);
        goto fail;
    }
    result = Py_BuildValue("(OOO)", dq, dk, dv);
fail:
    Py_XDECREF(one);
    Py_XDECREF(bhnd);
    Py_XDECREF(zero);
    Py_XDECREF(dout);
    Py_XDECREF(q);
    Py_XDECREF(k);
    Py_XDECREF(v);
    Py_XDECREF(out);
    Py_XDECREF(lse);
    Py_XDECREF(dq);
    Py_XDECREF(dk);
    Py_XDECREF(dv);
    PyMem_Free(gbuf);
    return result;
}

static PyMethodDef methods[] = {
    {"forward", (PyCFunction)(void (*)(void))py_forward, METH_VARARGS | METH_KEYWORDS,
     "forward(q, k, v, *, text_len, text_first=True, gamma=1.0, gamma_reverse=1.0, scale=None, "
     "layout='bhnd', return_lse=False, return_text_mass=False, num_threads=0)\n--\n\n"
     "Gamma-scaled joint attention on the CPU kernel. q, k, v: float32/float64 (B, H, N, D) "
     "('bhnd') or (B, N, H, D) ('bnhd'). Returns (out, lse or None, text_mass or None); out in "
     "the input layout, lse and text_mass (B, H, N)."},
    {"backward", (PyCFunction)(void (*)(void))py_backward, METH_VARARGS | METH_KEYWORDS,
     "backward(dout, q, k, v, out, lse, *, text_len, text_first=True, gamma=1.0, "
     "gamma_reverse=1.0, scale=None, layout='bhnd', num_threads=0)\n--\n\n"
     "Gradients of forward: returns (dq, dk, dv) in the input layout. lse: (B, H, N) from "
     "forward(..., return_lse=True)."},
    {NULL, NULL, 0, NULL}};

static int module_exec(PyObject *m) {
    import_array1(-1);
    if (PyModule_AddIntConstant(m, "MAX_HEAD_DIM", TACA_MAX_HEAD_DIM) < 0) return -1;
    return 0;
}

static PyModuleDef_Slot slots[] = {{Py_mod_exec, (void *)module_exec}, {0, NULL}};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    "taca._numpy_C",
    "taca's CPU kernels on numpy arrays (see taca.numpy for the public API).",
    0,
    methods,
    slots,
    NULL,
    NULL,
    NULL};

PyMODINIT_FUNC PyInit__numpy_C(void) { return PyModuleDef_Init(&moduledef); }
