/* Streaming (non-temporal) memory copy, for the snapshot of an async save.
 *
 * A snapshot copies every tensor into a staging buffer that nothing reads again until the
 * background write, long after the data has left the CPU caches. Plain stores first read each
 * destination cache line from memory (read-for-ownership) and then write it back: three bytes
 * of memory traffic per byte copied. Streaming stores write whole lines without reading them:
 * two. When the copy is bound by memory bandwidth, as a multi-GB snapshot is, that is up to a
 * third less time, and it is the time the training loop waits for. glibc's memcpy makes the
 * same choice only for single calls above a size derived from the cache (288 MiB on the
 * benchmark VM), larger than any one tensor of a typical model.
 *
 * Built as an optional extension: without a C compiler torchkeep falls back to numpy's copy.
 * Other architectures compile to a plain memcpy (STREAMING is then 0).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define TK_STREAMING 1
#else
#define TK_STREAMING 0
#endif

/* Below this a copy stays in the cache and plain stores are as fast. */
#define TK_MIN_STREAM_BYTES ((size_t)256 * 1024)

static void stream_copy(char *dst, const char *src, size_t n)
{
#if TK_STREAMING
    if (n >= TK_MIN_STREAM_BYTES) {
        size_t head = (16 - ((uintptr_t)dst & 15)) & 15; /* streaming stores need alignment */
        memcpy(dst, src, head);
        dst += head;
        src += head;
        n -= head;
        while (n >= 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)src);
            __m128i b = _mm_loadu_si128((const __m128i *)(src + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(src + 32));
            __m128i d = _mm_loadu_si128((const __m128i *)(src + 48));
            _mm_stream_si128((__m128i *)dst, a);
            _mm_stream_si128((__m128i *)(dst + 16), b);
            _mm_stream_si128((__m128i *)(dst + 32), c);
            _mm_stream_si128((__m128i *)(dst + 48), d);
            src += 64;
            dst += 64;
            n -= 64;
        }
        memcpy(dst, src, n);
        _mm_sfence(); /* order the streaming stores before whatever tells others we are done */
        return;
    }
#endif
    memcpy(dst, src, n);
}

static PyObject *copy(PyObject *self, PyObject *args)
{
    Py_buffer dst, src;
    if (!PyArg_ParseTuple(args, "w*y*:copy", &dst, &src)) {
        return NULL;
    }
    if (dst.len != src.len) {
        PyErr_Format(PyExc_ValueError,
                     "copy: the destination holds %zd bytes and the source %zd; "
                     "pass buffers of the same size",
                     dst.len, src.len);
        PyBuffer_Release(&dst);
        PyBuffer_Release(&src);
        return NULL;
    }
    char *d = (char *)dst.buf;
    const char *s = (const char *)src.buf;
    size_t n = (size_t)src.len;
    int overlap = d < s + n && s < d + n;
    Py_BEGIN_ALLOW_THREADS
    if (overlap) {
        memmove(d, s, n);
    } else {
        stream_copy(d, s, n);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"copy", copy, METH_VARARGS,
     "copy(dst, src): copy the bytes of buffer src into the writable buffer dst (same size),\n"
     "with streaming stores for large copies; releases the GIL."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_streamcopy", "Streaming memory copy for async-save snapshots.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__streamcopy(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "STREAMING", TK_STREAMING) < 0 ||
        PyModule_AddIntConstant(m, "MIN_STREAM_BYTES", (long)TK_MIN_STREAM_BYTES) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
