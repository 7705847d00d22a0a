"""MSL shared by the generated kernels: Apple's fragment layout and the loaders. The kernel that includes them
defines `input_t`, HEAD_DIM and THREADS first."""

HELPERS = """// (column, row) of the first of the two elements this lane holds in an 8x8 simdgroup_matrix (Apple's layout).
inline ushort2 fragment_coord(ushort lane) {
  return ushort2(4 * ((lane / 8) % 2) + 2 * (lane % 2), 4 * (lane / 16) + (lane / 2) % 4);
}

// Elements (row, col) and (row, col + 1) of a row-major matrix in fp32; zero outside the real head dim.
inline float2 load_pair(device const input_t* base, long row, long row_stride, int col, int cols) {
  float2 v = float2(0.0f);
  if (col < cols) v.x = float(base[row * row_stride + col]);
  if (col + 1 < cols) v.y = float(base[row * row_stride + col + 1]);
  return v;
}

// Fragment (block, d) of a (rows x HEAD_DIM) threadgroup tile, in fp32: element (r, c) is tile[block*8 + r][d*8 + c].
inline float2 tile_fragment(threadgroup const input_t* tile, int block, int d, ushort2 coord) {
  threadgroup const input_t* p = tile + (block * 8 + coord.y) * HEAD_DIM + d * 8 + coord.x;
  return float2(float(p[0]), float(p[1]));
}

// The same fragment transposed: element (r, c) is tile[block*8 + c][d*8 + r].
inline float2 tile_fragment_transposed(threadgroup const input_t* tile, int block, int d, ushort2 coord) {
  threadgroup const input_t* p = tile + (block * 8 + coord.x) * HEAD_DIM + d * 8 + coord.y;
  return float2(float(p[0]), float(p[HEAD_DIM]));
}

// Rows [first, first + tile_rows) of a (rows x cols) matrix into a (tile_rows x HEAD_DIM) tile, zero past
// its edges; all THREADS threads of the threadgroup take part.
inline void load_tile(threadgroup input_t* tile, int tile_rows, device const input_t* src, long row_stride,
                      long first, long rows, int cols, ushort tid) {
  for (int i = tid; i < tile_rows * HEAD_DIM; i += THREADS) {
    const int r = i / HEAD_DIM, c = i % HEAD_DIM;
    tile[i] = (first + r < rows && c < cols) ? src[(first + r) * row_stride + c] : input_t(0);
  }
}
"""
