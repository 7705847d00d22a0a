// Metal threads on the CPU: one fiber per Metal thread, switched in user space.
//
// A threadgroup runs on one OS thread. Its fibers run in a fixed order until each one blocks at a
// threadgroup barrier or a SIMD collective, or ends. A barrier releases when every thread still alive
// waits at it (Apple GPUs let ended threads drop out); a SIMD collective runs, in the last lane to
// arrive, over every lane of the SIMD group still alive. Threads that wait at different barriers or
// collectives can never meet: that, and a group with nothing left to run, is reported as an error
// naming the kernel and the MSL lines, never a hang.
#pragma once
#define MSL_FN inline
#define MSL_TARGET_CPU 1
#include "msl_math.h"

namespace msl_sys {
extern "C" {
int snprintf(char*, size_t, const char*, ...);
}
}  // namespace msl_sys

// ---- user-space context switch: save callee-saved registers on the current stack, swap stacks ----
extern "C" void msl_fiber_switch(void** save_sp, void* new_sp);
#if defined(__APPLE__)
#define MSL_ASM_SYMBOL "_msl_fiber_switch"
#define MSL_ASM_HEADER ".globl _msl_fiber_switch\n.private_extern _msl_fiber_switch\n"
#else
#define MSL_ASM_SYMBOL "msl_fiber_switch"
#define MSL_ASM_HEADER ".globl msl_fiber_switch\n.hidden msl_fiber_switch\n.type msl_fiber_switch,@function\n"
#endif
#if defined(__x86_64__)
asm(".text\n" MSL_ASM_HEADER MSL_ASM_SYMBOL ":\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n  ret\n");
#define MSL_FRAME_WORDS 8  // six registers, the entry address, and a fake return address
#define MSL_FRAME_ENTRY_SLOT 6
#elif defined(__aarch64__)
asm(".text\n" MSL_ASM_HEADER ".p2align 2\n" MSL_ASM_SYMBOL ":\n"
    "  sub sp, sp, #160\n"
    "  stp x19, x20, [sp, #0]\n  stp x21, x22, [sp, #16]\n  stp x23, x24, [sp, #32]\n"
    "  stp x25, x26, [sp, #48]\n  stp x27, x28, [sp, #64]\n  stp x29, x30, [sp, #80]\n"
    "  stp d8, d9, [sp, #96]\n  stp d10, d11, [sp, #112]\n  stp d12, d13, [sp, #128]\n  stp d14, d15, [sp, #144]\n"
    "  mov x2, sp\n  str x2, [x0]\n  mov sp, x1\n"
    "  ldp x19, x20, [sp, #0]\n  ldp x21, x22, [sp, #16]\n  ldp x23, x24, [sp, #32]\n"
    "  ldp x25, x26, [sp, #48]\n  ldp x27, x28, [sp, #64]\n  ldp x29, x30, [sp, #80]\n"
    "  ldp d8, d9, [sp, #96]\n  ldp d10, d11, [sp, #112]\n  ldp d12, d13, [sp, #128]\n  ldp d14, d15, [sp, #144]\n"
    "  add sp, sp, #160\n  ret\n");
#define MSL_FRAME_WORDS 20  // 160 bytes of saved registers; x30 (the entry address) is word 11
#define MSL_FRAME_ENTRY_SLOT 11
#else
#error "the Metal emulator's fibers support x86-64 and arm64"
#endif

namespace msl {

constexpr int SIMD_WIDTH = 32;
constexpr int MAX_THREADS = 1024;
constexpr size_t FIBER_STACK_BYTES = 256 * 1024;

namespace cpu {

enum State { READY, AT_BARRIER, AT_COLLECTIVE, ENDED };

struct SimdGroup;
typedef void (*CollectiveOp)(SimdGroup&);

struct Thread {
  void* sp;
  State state;
  int site;  // MSL line of the barrier or collective it waits at
  uint3 position_in_threadgroup;
  uint index_in_threadgroup;
  uint lane;
  uint simdgroup;
  void* arg;  // this lane's operands of the pending collective
};

struct SimdGroup {
  Thread* lanes[SIMD_WIDTH];
  int size;     // lanes that exist (a partial threadgroup can end in a partial SIMD group)
  int alive;    // lanes that have not ended
  int arrived;  // lanes waiting at the pending collective
  uint waiting; // bit mask of those lanes
  int site;
  CollectiveOp op;
};

struct Group {
  const Launch* launch;
  const char* kernel;
  uint3 position, size, groups_per_grid, threads_per_grid;
  Thread* threads;
  int count, alive;
  SimdGroup simdgroups[MAX_THREADS / SIMD_WIDTH];
  int simdgroup_count;
  int barrier_arrived, barrier_site;
  char* arena;
  ulong arena_bytes;  // the kernel's threadgroup memory
  int ready[MAX_THREADS + 1];
  int head, tail;
  void* scheduler_sp;
  void (*body)(const Launch*);
  bool failed;
  char message[512];
};

inline thread_local Group* group;
inline thread_local Thread* current;

// The memory a launch runs in, owned by the host: one per OS thread that runs threadgroups, shared by every
// library, so that nothing stays behind when the thread ends. The fiber stacks follow it.
struct Workspace {
  alignas(64) char arena[32768];
  Thread threads[MAX_THREADS];
};
constexpr size_t WORKSPACE_HEADER_BYTES = (sizeof(Workspace) + 63) & ~(size_t)63;

inline void push_ready(Thread* t) {
  t->state = READY;
  group->ready[group->tail] = (int)(t - group->threads);
  group->tail = (group->tail + 1) % (MAX_THREADS + 1);
}

inline void yield_to_scheduler() { msl_fiber_switch(&current->sp, group->scheduler_sp); }

// Stop the whole threadgroup with a message; never returns to the calling thread.
template <class... A>
[[noreturn]] inline void fail(const char* fmt, A... args) {
  if (!group->failed) {
    int n = msl_sys::snprintf(group->message, sizeof(group->message), "kernel %s: ", group->kernel);
    msl_sys::snprintf(group->message + n, sizeof(group->message) - n, fmt, args...);
    group->failed = true;
  }
  for (;;) yield_to_scheduler();
}

inline void run_collective(SimdGroup& sg) {
  sg.op(sg);
  for (int i = 0; i < sg.size; ++i)
    if (sg.waiting & (1u << i)) {
      sg.lanes[i]->arg = nullptr;
      if (sg.lanes[i] != current) push_ready(sg.lanes[i]);
    }
  sg.arrived = 0;
  sg.waiting = 0;
}

inline void release_barrier() {
  for (int i = 0; i < group->count; ++i)
    if (group->threads[i].state == AT_BARRIER && &group->threads[i] != current) push_ready(&group->threads[i]);
  group->barrier_arrived = 0;
}

// Every lane of the SIMD group still alive must reach the same collective; the last one runs `op`.
inline void collective(void* arg, CollectiveOp op, int site) {
  Thread* t = current;
  SimdGroup& sg = group->simdgroups[t->simdgroup];
  if (sg.arrived == 0) {
    sg.site = site;
    sg.op = op;
  } else if (sg.site != site) {
    fail("SIMD group %u diverged: lanes wait at a SIMD collective on MSL line %d and line %d",
         t->simdgroup, sg.site, site);
  }
  t->arg = arg;
  t->site = site;
  t->state = AT_COLLECTIVE;
  sg.arrived++;
  sg.waiting |= 1u << t->lane;
  if (sg.arrived == sg.alive) {
    run_collective(sg);
    t->state = READY;
  } else {
    yield_to_scheduler();
  }
}

inline void barrier(int site) {
  Thread* t = current;
  if (group->barrier_arrived == 0) {
    group->barrier_site = site;
  } else if (group->barrier_site != site) {
    fail("threads diverged: they wait at threadgroup_barrier on MSL line %d and line %d", group->barrier_site, site);
  }
  t->site = site;
  t->state = AT_BARRIER;
  group->barrier_arrived++;
  if (group->barrier_arrived == group->alive) {
    release_barrier();
    t->state = READY;
  } else {
    yield_to_scheduler();
  }
}

inline void thread_ended() {
  Thread* t = current;
  t->state = ENDED;
  group->alive--;
  SimdGroup& sg = group->simdgroups[t->simdgroup];
  sg.alive--;
  if (sg.arrived > 0 && sg.arrived == sg.alive) run_collective(sg);
  if (group->barrier_arrived > 0 && group->barrier_arrived == group->alive) release_barrier();
}

extern "C" inline void msl_fiber_entry() {
  group->body(group->launch);
  thread_ended();
  yield_to_scheduler();
  __builtin_unreachable();
}

inline void describe_deadlock() {
  int at_barrier = 0, at_collective = 0, barrier_line = 0, collective_line = 0;
  for (int i = 0; i < group->count; ++i) {
    const Thread& t = group->threads[i];
    if (t.state == AT_BARRIER) { at_barrier++; barrier_line = t.site; }
    if (t.state == AT_COLLECTIVE) { at_collective++; collective_line = t.site; }
  }
  int n = msl_sys::snprintf(group->message, sizeof(group->message),
                            "kernel %s: deadlock in threadgroup (%u,%u,%u): ", group->kernel,
                            group->position.x, group->position.y, group->position.z);
  msl_sys::snprintf(group->message + n, sizeof(group->message) - n,
                    "%d threads wait at threadgroup_barrier (MSL line %d) and %d at a SIMD collective "
                    "(MSL line %d) that the others never reach",
                    at_barrier, barrier_line, at_collective, collective_line);
  group->failed = true;
}

inline void run_group(Group& g, char* stacks) {
  group = &g;
  g.alive = g.count;
  g.barrier_arrived = 0;
  g.head = g.tail = 0;
  g.simdgroup_count = (g.count + SIMD_WIDTH - 1) / SIMD_WIDTH;
  for (int s = 0; s < g.simdgroup_count; ++s) {
    SimdGroup& sg = g.simdgroups[s];
    sg.size = (s + 1) * SIMD_WIDTH <= g.count ? SIMD_WIDTH : g.count - s * SIMD_WIDTH;
    sg.alive = sg.size;
    sg.arrived = 0;
    sg.waiting = 0;
  }
  for (int i = 0; i < g.count; ++i) {
    Thread& t = g.threads[i];
    t.index_in_threadgroup = (uint)i;
    t.position_in_threadgroup = uint3((uint)i % g.size.x, ((uint)i / g.size.x) % g.size.y, (uint)i / (g.size.x * g.size.y));
    t.lane = (uint)i % SIMD_WIDTH;
    t.simdgroup = (uint)i / SIMD_WIDTH;
    t.arg = nullptr;
    g.simdgroups[t.simdgroup].lanes[t.lane] = &t;
    ulong top = ((ulong)(stacks + (i + 1) * FIBER_STACK_BYTES)) & ~(ulong)15;
    void** frame = (void**)(top - MSL_FRAME_WORDS * sizeof(void*));
    for (int w = 0; w < MSL_FRAME_WORDS; ++w) frame[w] = nullptr;
    frame[MSL_FRAME_ENTRY_SLOT] = (void*)&msl_fiber_entry;
    t.sp = frame;
    push_ready(&t);
  }
  while (g.head != g.tail && !g.failed) {
    current = &g.threads[g.ready[g.head]];
    g.head = (g.head + 1) % (MAX_THREADS + 1);
    msl_fiber_switch(&g.scheduler_sp, current->sp);
  }
  if (!g.failed && g.alive > 0) describe_deadlock();
}

// Run threadgroups [first, last) of the grid (linear index, x fastest) in `workspace`, which has a fiber stack for
// every thread of a threadgroup. Returns 0, or 1 with `error` set.
inline int launch(const Launch* L, uint first, uint last, char* error, int error_len, void* workspace,
                  void (*body)(const Launch*), ulong threadgroup_bytes, const char* kernel) {
  static_assert(sizeof(Workspace::arena) >= 32768, "Apple GPUs give a threadgroup 32 KiB");
  Workspace* ws = (Workspace*)workspace;
  Group g;
  g.launch = L;
  g.kernel = kernel;
  g.body = body;
  g.threads = ws->threads;
  g.arena = ws->arena;
  g.arena_bytes = threadgroup_bytes;
  g.threads_per_grid = uint3(L->threads[0], L->threads[1], L->threads[2]);
  uint3 gs(L->group_size[0], L->group_size[1], L->group_size[2]);
  g.groups_per_grid = (g.threads_per_grid + gs - 1u) / gs;
  int status = 0;
  for (uint linear = first; linear < last; ++linear) {
    uint3 p(linear % g.groups_per_grid.x, (linear / g.groups_per_grid.x) % g.groups_per_grid.y,
            linear / (g.groups_per_grid.x * g.groups_per_grid.y));
    g.position = p;
    // Non-uniform dispatch: the last threadgroup of a dimension holds only the threads that exist.
    g.size = metal::min(gs, g.threads_per_grid - p * gs);
    g.count = (int)(g.size.x * g.size.y * g.size.z);
    g.failed = false;
    // Threadgroup memory starts as garbage: all-ones bytes are NaN in half, bfloat and float.
    __builtin_memset(g.arena, 0xff, threadgroup_bytes);
    run_group(g, (char*)workspace + WORKSPACE_HEADER_BYTES);
    if (g.failed) {
      msl_sys::snprintf(error, (size_t)error_len, "%s", g.message);
      status = 1;
      break;
    }
  }
  group = nullptr;
  current = nullptr;
  return status;
}

}  // namespace cpu

// ---- what kernels see ----
inline char* threadgroup_arena() { return cpu::group->arena; }
inline ulong threadgroup_arena_bytes() { return cpu::group->arena_bytes; }
inline uint lane_id() { return cpu::current->lane; }
inline uint3 thread_position_in_grid(const Launch* L) {
  return cpu::group->position * uint3(L->group_size[0], L->group_size[1], L->group_size[2]) +
         cpu::current->position_in_threadgroup;
}
inline uint3 threadgroup_position_in_grid(const Launch*) { return cpu::group->position; }
inline uint3 thread_position_in_threadgroup(const Launch*) { return cpu::current->position_in_threadgroup; }
inline uint thread_index_in_threadgroup(const Launch*) { return cpu::current->index_in_threadgroup; }
inline uint3 threads_per_threadgroup(const Launch*) { return cpu::group->size; }
inline uint3 threadgroups_per_grid(const Launch*) { return cpu::group->groups_per_grid; }
inline uint3 threads_per_grid(const Launch*) { return cpu::group->threads_per_grid; }
inline uint simdgroup_index_in_threadgroup(const Launch*) { return cpu::current->simdgroup; }
inline uint thread_index_in_simdgroup(const Launch*) { return cpu::current->lane; }
inline uint simdgroups_per_threadgroup(const Launch*) { return (uint)cpu::group->simdgroup_count; }
inline uint threads_per_simdgroup(const Launch*) { return SIMD_WIDTH; }
inline uint thread_execution_width(const Launch*) { return SIMD_WIDTH; }

// An access of `size` bytes at byte `offset` of a buffer (or, for buffer -1, of threadgroup memory).
[[noreturn]] inline void report_out_of_bounds(int buffer, const char* name, long offset, long size, long bytes) {
  if (buffer < 0)
    cpu::fail("threadgroup memory: element %ld is out of bounds (a %ld-byte access at byte %ld; the kernel has %ld "
              "bytes)", offset / size, size, offset, bytes);
  cpu::fail("buffer %d (%s): element %ld is out of bounds (a %ld-byte access at byte %ld; the bound tensor holds "
            "%ld bytes)", buffer, name, offset / size, size, offset, bytes);
}

[[noreturn]] inline void report_misaligned(int buffer, const char* name, long offset, long size, long alignment) {
  if (buffer == -2)
    cpu::fail("%s: a misaligned %ld-byte access at address %#lx (Metal needs %ld-byte alignment)", name, size, offset,
              alignment);
  if (buffer < 0)
    cpu::fail("threadgroup memory: a misaligned %ld-byte access at byte %ld (Metal needs %ld-byte alignment)", size,
              offset, alignment);
  cpu::fail("buffer %d (%s): a misaligned %ld-byte access at byte %ld (Metal needs %ld-byte alignment)", buffer, name,
            size, offset, alignment);
}

inline void* out_of_bounds_sink() { return nullptr; }

[[noreturn]] inline void report_transposed_origin() {
  cpu::fail("simdgroup_load/store with transpose_matrix and a nonzero matrix_origin: Apple does not document "
            "how they combine; offset the pointer instead");
}

inline void threadgroup_barrier_at(int site) { cpu::barrier(site); }
inline void simdgroup_barrier_at(int site) { cpu::collective(nullptr, [](cpu::SimdGroup&) {}, site); }

// Collectives: `Arg` lives on each lane's stack; the op reads every waiting lane's Arg.
template <class Arg, class F>
inline void for_waiting(cpu::SimdGroup& sg, F f) {
  for (int i = 0; i < sg.size; ++i)
    if (sg.waiting & (1u << i)) f(i, *(Arg*)sg.lanes[i]->arg);
}
template <class T> inline T garbage() { T t; __builtin_memset(&t, 0xff, sizeof(T)); return t; }

// Reductions and scans run over the lanes of each group of `width` lanes (32: the SIMD group; 4: a quad).
template <class T> struct ReduceArg { T in, out; int width; };
template <class T, class F> inline T reduce_at(T x, F combine, int site, int width = SIMD_WIDTH) {
  ReduceArg<T> a{x, x, width};
  cpu::collective(&a, [](cpu::SimdGroup& sg) {
    int w = ((ReduceArg<T>*)cpu::current->arg)->width;
    for (int g = 0; g < SIMD_WIDTH; g += w) {
      bool first = true;
      T acc{};
      for_waiting<ReduceArg<T>>(sg, [&](int i, ReduceArg<T>& l) {
        if (i / w == g / w) { acc = first ? l.in : F()(acc, l.in); first = false; } });
      for_waiting<ReduceArg<T>>(sg, [&](int i, ReduceArg<T>& l) { if (i / w == g / w) l.out = acc; });
    }
  }, site);
  return a.out;
}

// `identity` is what an exclusive scan gives its group's first lane.
template <class T> struct ScanArg { T in, out, identity; bool inclusive; int width; };
template <class T, class F> inline T prefix_at(T x, T identity, bool inclusive, F combine, int site,
                                               int width = SIMD_WIDTH) {
  ScanArg<T> a{x, x, identity, inclusive, width};
  cpu::collective(&a, [](cpu::SimdGroup& sg) {
    int w = ((ScanArg<T>*)cpu::current->arg)->width;
    for (int g = 0; g < SIMD_WIDTH; g += w) {
      bool first = true;
      T acc{};
      for_waiting<ScanArg<T>>(sg, [&](int i, ScanArg<T>& l) {
        if (i / w != g / w) return;
        T before = first ? l.identity : acc;
        acc = first ? l.in : F()(acc, l.in);
        first = false;
        l.out = l.inclusive ? acc : before;
      });
    }
  }, site);
  return a.out;
}

// Lane `from(lane)` supplies the value; a lane that is not waiting (ended or absent) supplies garbage.
template <class T> struct ShuffleArg { T in, out; int from; };
template <class T> inline T shuffle_at(T x, int from, int site) {
  ShuffleArg<T> a{x, x, from};
  cpu::collective(&a, [](cpu::SimdGroup& sg) {
    for_waiting<ShuffleArg<T>>(sg, [&](int, ShuffleArg<T>& l) {
      bool ok = l.from >= 0 && l.from < sg.size && (sg.waiting & (1u << l.from));
      l.out = ok ? ((ShuffleArg<T>*)sg.lanes[l.from]->arg)->in : garbage<T>();
    });
  }, site);
  return a.out;
}

struct BallotArg { bool in; ulong out; };
inline ulong ballot_at(bool x, int site) {
  BallotArg a{x, 0};
  cpu::collective(&a, [](cpu::SimdGroup& sg) {
    ulong mask = 0;
    for_waiting<BallotArg>(sg, [&](int i, BallotArg& l) { if (l.in) mask |= 1ul << i; });
    for_waiting<BallotArg>(sg, [&](int, BallotArg& l) { l.out = mask | ((ulong)sg.waiting << 32); });
  }, site);
  return a.out;
}

// D = A * B + C over the whole SIMD group; products accumulate in float and round once to D's type.
template <class TD, class TA, class TB, class TC> struct MatArg {
  simdgroup_matrix<TD, 8, 8>* d; const simdgroup_matrix<TA, 8, 8>* a; const simdgroup_matrix<TB, 8, 8>* b;
  const simdgroup_matrix<TC, 8, 8>* c;
};
template <class TD, class TA, class TB, class TC>
inline void matmul_at(MatArg<TD, TA, TB, TC>& arg, int site) {
  cpu::collective(&arg, [](cpu::SimdGroup& sg) {
    if (sg.size != SIMD_WIDTH || sg.waiting != 0xffffffffu)
      cpu::fail("simdgroup_matrix operation on MSL line %d needs all 32 lanes of the SIMD group", cpu::current->site);
    float A[8][8], B[8][8], C[8][8];
    for_waiting<MatArg<TD, TA, TB, TC>>(sg, [&](int i, MatArg<TD, TA, TB, TC>& l) {
      int r = lane_row(i), c = lane_col(i);
      for (int j = 0; j < 2; ++j) {
        A[r][c + j] = (float)l.a->elements.v[j];
        B[r][c + j] = (float)l.b->elements.v[j];
        C[r][c + j] = l.c ? (float)l.c->elements.v[j] : 0.0f;
      }
    });
    for_waiting<MatArg<TD, TA, TB, TC>>(sg, [&](int i, MatArg<TD, TA, TB, TC>& l) {
      int r = lane_row(i), c = lane_col(i);
      for (int j = 0; j < 2; ++j) {
        float s = C[r][c + j];
        for (int k = 0; k < 8; ++k) s += A[r][k] * B[k][c + j];
        l.d->elements.v[j] = TD(s);
      }
    });
  }, site);
}

}  // namespace msl

#include "msl_builtins.h"

// Bytes of a workspace for threadgroups of up to `threads` threads.
extern "C" ulong msl_workspace_bytes(uint threads) {
  return ::msl::cpu::WORKSPACE_HEADER_BYTES + (ulong)threads * ::msl::FIBER_STACK_BYTES;
}

// The entry point of kernel `name` (its host name), its threadgroup memory and its
// [[max_total_threads_per_threadgroup]] (0: none).
#define MSL_KERNEL_ENTRY(name, threadgroup_bytes, max_threads)                                                   \
  extern "C" int msl_launch_##name(const ::msl::Launch* L, uint first, uint last, char* err, int n, void* ws) { \
    return ::msl::cpu::launch(L, first, last, err, n, ws, &msl_entry_##name, threadgroup_bytes, #name);        \
  }                                                                                                             \
  extern "C" ulong msl_threadgroup_bytes_##name() { return threadgroup_bytes; }                                 \
  extern "C" uint msl_max_threads_##name() { return max_threads; }
