// o2v-jax native row write-back for the lazy row_sparse optimizer loop on CPU.
//
// set_rows(table, idx, rows) -> table with table[idx[i]] = rows[i], ids as jax's
// table.at[idx].set(rows, mode="drop") reads them: a negative id counts from the end
// (numpy's rule), and an id still outside [0, V) is skipped. The result
// aliases `table` (input_output_aliases={0: 0}), so a donated table is written in place.
//
// Why: XLA's CPU scatter is a serial per-element loop, 60-90 us for 256 rows of 300
// floats, three times per chunk (table, Adam's m and v). Rows are contiguous here, so
// the write-back is one memcpy per row (a Wikipedia-sized step is ~5% faster).
// Compiled on first use by o2v_jax/native.py; see docs/training.md.

#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

static ffi::Error SetRows(ffi::AnyBuffer table, ffi::Buffer<ffi::S32> idx,
                          ffi::AnyBuffer rows, ffi::Result<ffi::AnyBuffer> out) {
  const auto tdims = table.dimensions();
  const auto rdims = rows.dimensions();
  if (tdims.size() != 2 || rdims.size() != 2 || idx.dimensions().size() != 1) {
    return ffi::Error::InvalidArgument("set_rows: table and rows must be 2-D, idx 1-D");
  }
  if (table.element_type() != rows.element_type() ||
      out->element_type() != table.element_type()) {
    return ffi::Error::InvalidArgument("set_rows: table and rows must share a dtype");
  }
  const int64_t vocab = tdims[0];
  const int64_t n = idx.dimensions()[0];
  if (rdims[0] != n || rdims[1] != tdims[1]) {
    return ffi::Error::InvalidArgument("set_rows: rows must be (len(idx), table width)");
  }
  const size_t row_bytes = ffi::ByteWidth(table.element_type()) * static_cast<size_t>(tdims[1]);
  char* dst = static_cast<char*>(out->untyped_data());
  const char* src = static_cast<const char*>(rows.untyped_data());
  if (dst != table.untyped_data()) {  // not aliased (XLA normally makes it so): copy first
    std::memcpy(dst, table.untyped_data(), table.size_bytes());
  }
  const int32_t* ids = idx.typed_data();
  for (int64_t i = 0; i < n; ++i) {
    int64_t k = ids[i];
    if (k < 0) k += vocab;
    if (k < 0 || k >= vocab) continue;
    std::memcpy(dst + k * row_bytes, src + i * row_bytes, row_bytes);
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(O2vSetRows, SetRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
