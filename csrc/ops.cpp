// Schemas of the compiled ops (namespace torch.ops.aimv2) and the Python module aimv2_kernels._C.
//
// Every op is an out-variant launcher: the Python side allocates its outputs (through
// aimv2_kernels._alloc.new_output, so tests can poison them) and wraps the call in a
// torch.library.custom_op with a fake implementation and autograd. Kernels live in
// <op>_cpu.cpp (TORCH_LIBRARY_IMPL(aimv2, CPU, m)) and cuda/<op>_glue.cpp (TORCH_LIBRARY_IMPL(aimv2, CUDA, m)),
// so one Python wiring (aimv2_kernels/compiled/) serves the "cpu" and "cuda" backends.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(aimv2, m) {
  // Per-patch-normalized MSE, one value per prediction row (see aimv2_kernels.patch_mse_loss).
  //   pred (B, L, P) fp32/bf16/fp16, images (B, C, H, W) same dtype, L = N - target_offset, P = C*p*p.
  //   rows (optional output): fp32 (B, L), contiguous; mean_P (pred - target)^2, 0 where row l is not counted
  //         (l + target_offset < prefix_lens[b]).
  //   grad (optional output): pred's shape and dtype, contiguous; grad_rows[b, l] * 2 (pred - target) / P,
  //         0 where not counted. grad_rows (optional input, floating (B, L)) is 1 when absent.
  // The forward passes rows only; the backward passes grad_rows and grad, recomputing the target in fp32
  // and rounding the gradient once (saving a low-precision gradient and scaling it later rounds twice).
  m.def(
      "patch_mse_rows_out(Tensor pred, Tensor images, int patch_size, Tensor? prefix_lens, "
      "int target_offset, float eps, Tensor? grad_rows, Tensor(a!)? rows, Tensor(b!)? grad) -> ()");

  // Softmax cross-entropy rows (see aimv2_kernels.cross_entropy; formulas in csrc/cross_entropy_cpu.cpp).
  //   logits (N, V) fp32/bf16/fp16, unit column stride; targets (N,) any integer dtype, in [0, V) or ignore_index.
  //   saved_lse (optional, floating (N,), used in float64): the rows' lse from an earlier call; then only grad is
  //         computed.
  //   grad_scale (optional, floating, one element or (N,)): multiplies each row's gradient; 1 when absent.
  //   loss_rows, lse (optional outputs): contiguous (N,), fp32 and float64. grad (optional output): logits' shape and
  //         dtype.
  // cross_entropy_rows_inplace writes the gradient over the logits (the caller's buffer); it always computes it.
  m.def(
      "cross_entropy_rows_out(Tensor logits, Tensor targets, int ignore_index, float label_smoothing, "
      "float z_loss, Tensor? saved_lse, Tensor? grad_scale, Tensor(a!)? loss_rows, Tensor(b!)? lse, "
      "Tensor(c!)? grad) -> ()");
  m.def(
      "cross_entropy_rows_inplace(Tensor(a!) logits, Tensor targets, int ignore_index, float label_smoothing, "
      "float z_loss, Tensor? saved_lse, Tensor? grad_scale, Tensor(b!)? loss_rows, Tensor(c!)? lse) -> ()");

  // Prefix-causal attention (see aimv2_kernels.prefix_attention), out-variant launchers on fresh outputs.
  //   q, k, v (B, H, S, D), one dtype; prefix_lens: integer (B,) in [0, S], or None (plain causal); ignored when
  //   causal is False. Key j is visible to query i iff !causal or j <= i or j < prefix_lens[b].
  //   out: q's shape and dtype, contiguous. lse: fp32 (B, H, S), contiguous, base 2:
  //   log2 sum_j 2^(scale * log2(e) * q_i . k_j) over the visible keys.
  m.def(
      "prefix_attention_forward_out(Tensor q, Tensor k, Tensor v, Tensor? prefix_lens, bool causal, "
      "float scale, Tensor(a!) out, Tensor(b!) lse) -> ()");
  // grad_q, grad_k, grad_v: q's shape and dtype, contiguous; the probabilities are recomputed from lse.
  m.def(
      "prefix_attention_backward_out(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? prefix_lens, bool causal, float scale, Tensor(a!) grad_q, Tensor(b!) grad_k, "
      "Tensor(c!) grad_v) -> ()");
}

// The Python module only carries build facts; importing it runs the registrations above. Plain CPython API
// rather than pybind11: nothing is bound, and it keeps the build light.
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
#define AIMV2_STR_(x) #x
#define AIMV2_STR(x) AIMV2_STR_(x)
#define AIMV2_PYINIT_(name) PyInit_##name
#define AIMV2_PYINIT(name) AIMV2_PYINIT_(name)

static PyMethodDef kNoMethods[] = {{nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef kModule = {PyModuleDef_HEAD_INIT, AIMV2_STR(TORCH_EXTENSION_NAME),
                                     "aimv2-kernels compiled ops (torch.ops.aimv2)", -1, kNoMethods};

PyMODINIT_FUNC AIMV2_PYINIT(TORCH_EXTENSION_NAME)(void) {
  PyObject* module = PyModule_Create(&kModule);
  if (module == nullptr) return nullptr;
#ifdef AIMV2_WITH_CUDA
  PyObject* with_cuda = Py_True;
#else
  PyObject* with_cuda = Py_False;
#endif
  if (PyModule_AddObjectRef(module, "WITH_CUDA", with_cuda) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
