// CPU emulation of the CUDA execution model, enough to compile rust/kernels/*.cu with g++
// (force-included with `-include emu.h`) and run the kernels on host memory. Used by
// rust/tests/kernel_emu/ (harness.rs), which checks every kernel against the CPU reference.
//
// Model:
//  * Blocks of a grid run one after another, so `__shared__` variables can be function
//    statics (one block owns them at a time; they are not re-poisoned between blocks).
//  * The threads of a block are fibers on the calling OS thread. A fiber runs until it
//    reaches a synchronisation point (`__syncthreads`, a warp shuffle/vote/`__syncwarp`),
//    so everything between two barriers runs thread after thread in the order chosen by
//    `emu_set_schedule` (0: ascending thread and block indices, 1: descending). Running a
//    kernel under both orders and comparing the results exposes missing barriers and
//    blocks that depend on each other (races).
//  * `__syncthreads` waits for every thread of the block that has not returned yet (a
//    returned thread drops out of the barrier, like std::barrier::arrive_and_drop).
//  * Warp intrinsics exchange values among the 32 lanes of a warp for real. A full mask
//    requires all 32 lanes to exist and to be alive; anything else is undefined behaviour
//    on the GPU and reported as an error here.
//  * Memory from `emu_alloc` ends right at an inaccessible page, so a read or write past
//    the end of a buffer faults; the fault is caught and reported (`emu_fault_addr`),
//    and writes into the slack before the buffer are caught by a canary (`emu_check`).
//  * Float arithmetic is plain IEEE single precision: compile with -ffp-contract=off and
//    without -ffast-math to mirror NVRTC's --fmad=false.
//  * Fibers switch with a few lines of x86-64 assembly; other targets (or
//    -DEMU_USE_UCONTEXT) use the slower ucontext.
//
// Not modelled: threads of one barrier phase never interleave, so two threads doing an
// unsynchronised read-modify-write of one address (a lost update on the GPU) go
// unnoticed; NaN payloads and the sign of zero from fminf/fmaxf follow the host, not the
// GPU's canonical NaN; expf/logf are the host libm's (CUDA's are within 2 ulp); dynamic
// (`extern __shared__`) shared memory is not supported.
#pragma once

#include <algorithm>
#include <cmath>
#include <csetjmp>
#include <csignal>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <pthread.h>
#include <string>
#include <sys/mman.h>
#include <tuple>
#include <type_traits>
#include <unistd.h>
#include <utility>
#include <vector>
#if !defined(__x86_64__) || defined(EMU_USE_UCONTEXT)
#include <ucontext.h>
#define EMU_UCONTEXT 1
#endif

#define EMU_EXPORT extern "C" __attribute__((visibility("default")))

// ---------------------------------------------------------------------------------------
// CUDA keywords and built-in variables

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __shared__ static
#define __constant__ static
#define __launch_bounds__(...)

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

// Launches are serialised (one per library at a time), so plain globals suffice; the
// scheduler rewrites threadIdx whenever it switches to another fiber.
static uint3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
static constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------
// The runtime: fibers, barriers, warp exchange, faults

namespace emu {

enum State : unsigned char { READY, WAIT_BLOCK, WAIT_WARP, DONE };

struct Fiber {
#ifdef EMU_UCONTEXT
    ucontext_t uc;
#else
    void* sp;
#endif
    uint3 tid;
    unsigned warp, lane;
    State st;
};

struct Warp {
    unsigned exists, live, arrived, gen;
    uint64_t slot[2][32]; // double-buffered by generation parity
};

struct Stack {
    char* base; // lowest page is a guard page
    size_t len;
};

constexpr size_t STACK_BYTES = 64 * 1024;

struct Runtime {
    std::mutex launch_mutex;
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    std::vector<Stack> stacks;
    unsigned live = 0, arrived = 0;
    Fiber* cur = nullptr;
#ifdef EMU_UCONTEXT
    ucontext_t sched;
#else
    void* sched_sp = nullptr;
#endif
    void (*thunk)(void*) = nullptr;
    void* ctx = nullptr;
    const char* kernel = "";
    bool failed = false;
    std::string error;
    int schedule = 0;
    // fault handling
    sigjmp_buf fault_jmp;
    volatile sig_atomic_t in_kernel = 0;
    pthread_t launcher;
    void* volatile fault_addr = nullptr;
    volatile int fault_sig = 0;
    struct sigaction old_segv, old_bus;
    // emu_alloc registry: user pointer -> (mapping base, mapping length, user bytes)
    std::mutex alloc_mutex;
    std::map<uintptr_t, std::tuple<char*, size_t, size_t>> allocs;
};

inline Runtime& rt() {
    static Runtime r;
    return r;
}

#ifndef EMU_UCONTEXT
extern "C" void emu_ctx_switch(void** save_sp, void* next_sp) __attribute__((visibility("hidden")));
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack,
// stores the stack pointer in *save_sp and resumes the context saved at next_sp.
asm(R"(
    .pushsection .text
    .globl emu_ctx_switch
    .hidden emu_ctx_switch
    .type emu_ctx_switch, @function
    .p2align 4
emu_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_ctx_switch, .-emu_ctx_switch
    .popsection
)");
#endif

inline void block_string(char* buf, size_t n) {
    snprintf(buf, n, "block (%u,%u,%u) thread (%u,%u,%u)", blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x,
             threadIdx.y, threadIdx.z);
}

// Back to the scheduler; returns when the scheduler resumes this fiber.
inline void yield() {
    Runtime& R = rt();
    Fiber* f = R.cur;
#ifdef EMU_UCONTEXT
    swapcontext(&f->uc, &R.sched);
#else
    emu_ctx_switch(&f->sp, R.sched_sp);
#endif
}

// Records an error for the running thread and stops the launch (never returns).
[[noreturn]] __attribute__((format(printf, 1, 2))) inline void fail(const char* fmt, ...) {
    Runtime& R = rt();
    char where[128], msg[512];
    block_string(where, sizeof where);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (!R.failed) {
        R.failed = true;
        R.error = std::string("kernel ") + R.kernel + ", " + where + ": " + msg;
    }
    for (;;) yield(); // the scheduler stops at the first failure and never resumes us
}

inline void release_block() {
    Runtime& R = rt();
    R.arrived = 0;
    for (Fiber& f : R.fibers)
        if (f.st == WAIT_BLOCK) f.st = READY;
}

inline void syncthreads() {
    Runtime& R = rt();
    Fiber* f = R.cur;
    if (R.arrived + 1 == R.live) {
        release_block(); // the last arrival goes on without yielding
        return;
    }
    R.arrived++;
    f->st = WAIT_BLOCK;
    yield();
}

// All 32 lanes of the caller's warp deposit `v`; returns the 32 deposited values.
inline const uint64_t* warp_exchange(unsigned mask, uint64_t v, const char* what) {
    Runtime& R = rt();
    Fiber* f = R.cur;
    Warp& w = R.warps[f->warp];
    if (mask != 0xffffffffu) fail("%s with mask %#x: the emulator supports only full-warp masks", what, mask);
    if (w.exists != 32)
        fail("%s with a full mask in a warp of %u threads (blockDim is not a multiple of 32): undefined behaviour",
             what, w.exists);
    if (w.live != 32) fail("%s with a full mask after %u lanes of the warp returned: undefined behaviour", what, 32 - w.live);
    unsigned g = w.gen;
    w.slot[g & 1][f->lane] = v;
    if (++w.arrived == 32) {
        w.arrived = 0;
        w.gen++;
        Fiber* first = &R.fibers[f->warp * 32];
        for (int l = 0; l < 32; l++)
            if (first[l].st == WAIT_WARP) first[l].st = READY;
    } else {
        f->st = WAIT_WARP;
        yield();
    }
    return w.slot[g & 1];
}

inline unsigned lane_id() { return rt().cur->lane; }

[[noreturn]] inline void fiber_main() {
    Runtime& R = rt();
    R.thunk(R.ctx);
    Fiber* f = R.cur;
    Warp& w = R.warps[f->warp];
    f->st = DONE;
    R.live--;
    w.live--;
    if (w.arrived > 0) fail("returned while other lanes of its warp wait in a warp-synchronous call: undefined behaviour");
    if (R.arrived > 0 && R.arrived == R.live) release_block();
    for (;;) yield();
}

#ifdef EMU_UCONTEXT
inline void fiber_main_uc() { fiber_main(); }
#endif

inline void init_fiber(Fiber& f, Stack& s) {
#ifdef EMU_UCONTEXT
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = s.base + 4096;
    f.uc.uc_stack.ss_size = s.len - 4096;
    f.uc.uc_link = nullptr;
    makecontext(&f.uc, fiber_main_uc, 0);
#else
    uintptr_t top = (reinterpret_cast<uintptr_t>(s.base) + s.len) & ~uintptr_t(15);
    uint64_t* sp = reinterpret_cast<uint64_t*>(top);
    *--sp = 0;                                          // fake return address of fiber_main
    *--sp = reinterpret_cast<uint64_t>(&fiber_main);    // where emu_ctx_switch returns to
    for (int r = 0; r < 6; r++) *--sp = 0;              // rbp rbx r12 r13 r14 r15
    uint32_t mxcsr = __builtin_ia32_stmxcsr();
    uint16_t fpucw;
    asm volatile("fnstcw %0" : "=m"(fpucw));
    *--sp = uint64_t(mxcsr) | (uint64_t(fpucw) << 32);
    f.sp = sp;
#endif
}

inline void resume(Fiber& f) {
    Runtime& R = rt();
    R.cur = &f;
    threadIdx = f.tid;
#ifdef EMU_UCONTEXT
    swapcontext(&R.sched, &f.uc);
#else
    emu_ctx_switch(&R.sched_sp, f.sp);
#endif
}

inline void ensure_stacks(size_t n) {
    Runtime& R = rt();
    while (R.stacks.size() < n) {
        size_t len = STACK_BYTES + 4096;
        void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            fprintf(stderr, "emu: cannot map a fiber stack\n");
            abort();
        }
        mprotect(p, 4096, PROT_NONE);
        R.stacks.push_back(Stack{static_cast<char*>(p), len});
    }
}

// Runs the current block (blockIdx set) to completion; false on an error.
inline bool run_block() {
    Runtime& R = rt();
    unsigned n = blockDim.x * blockDim.y * blockDim.z, nw = (n + 31) / 32;
    ensure_stacks(n);
    R.fibers.resize(n);
    R.warps.resize(nw);
    for (unsigned i = 0; i < n; i++) {
        Fiber& f = R.fibers[i];
        f.tid = uint3{i % blockDim.x, (i / blockDim.x) % blockDim.y, i / (blockDim.x * blockDim.y)};
        f.warp = i / 32;
        f.lane = i % 32;
        f.st = READY;
        init_fiber(f, R.stacks[i]);
    }
    for (unsigned w = 0; w < nw; w++) {
        Warp& wp = R.warps[w];
        wp.exists = wp.live = std::min(32u, n - 32 * w);
        wp.arrived = wp.gen = 0;
    }
    R.live = n;
    R.arrived = 0;
    for (;;) {
        bool ran = false;
        for (unsigned k = 0; k < n; k++) {
            Fiber& f = R.fibers[R.schedule == 0 ? k : n - 1 - k];
            if (f.st != READY) continue;
            resume(f);
            ran = true;
            if (R.failed) return false;
        }
        if (R.live == 0) return true;
        if (!ran) {
            unsigned wb = 0, ww = 0;
            for (Fiber& f : R.fibers) {
                wb += f.st == WAIT_BLOCK;
                ww += f.st == WAIT_WARP;
            }
            char buf[256];
            snprintf(buf, sizeof buf,
                     "kernel %s, block (%u,%u,%u): deadlock: %u threads wait at __syncthreads, %u in warp-synchronous "
                     "calls, %u returned",
                     R.kernel, blockIdx.x, blockIdx.y, blockIdx.z, wb, ww, n - R.live);
            R.failed = true;
            R.error = buf;
            return false;
        }
    }
}

inline bool fault_in_stack(uintptr_t a) {
    for (Stack& s : rt().stacks)
        if (a >= reinterpret_cast<uintptr_t>(s.base) && a < reinterpret_cast<uintptr_t>(s.base) + 4096) return true;
    return false;
}

inline void on_fault(int sig, siginfo_t* si, void*) {
    Runtime& R = rt();
    if (R.in_kernel && pthread_equal(pthread_self(), R.launcher)) {
        R.fault_addr = si->si_addr;
        R.fault_sig = sig;
        siglongjmp(R.fault_jmp, 1);
    }
    // Not a kernel's fault: put the previous handler back and let the access repeat.
    sigaction(sig, sig == SIGSEGV ? &R.old_segv : &R.old_bus, nullptr);
}

// Runs a whole grid; 0 on success, else an error code with rt().error set.
inline int run_grid(const char* name, dim3 g, dim3 b, void (*thunk)(void*), void* ctx) {
    Runtime& R = rt();
    R.failed = false;
    R.error.clear();
    R.kernel = name;
    R.fault_addr = nullptr;
    unsigned long long threads = 1ull * b.x * b.y * b.z;
    if (threads == 0 || threads > 1024 || b.x > 1024 || b.y > 1024 || b.z > 64 || g.x == 0 || g.y == 0 ||
        g.z == 0 || g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535) {
        char buf[256];
        snprintf(buf, sizeof buf, "kernel %s: invalid launch configuration grid (%u,%u,%u) block (%u,%u,%u)", name,
                 g.x, g.y, g.z, b.x, b.y, b.z);
        R.error = buf;
        return 3;
    }
    R.thunk = thunk;
    R.ctx = ctx;
    gridDim = g;
    blockDim = b;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    R.launcher = pthread_self();
    sigaction(SIGSEGV, &sa, &R.old_segv);
    sigaction(SIGBUS, &sa, &R.old_bus);
    int rc = 0;
    if (sigsetjmp(R.fault_jmp, 1) == 0) {
        R.in_kernel = 1;
        // blocks in ascending linear order, or descending with schedule 1 (a kernel
        // whose blocks depend on each other then gives another result)
        unsigned long long blocks = 1ull * g.x * g.y * g.z;
        for (unsigned long long k = 0; k < blocks && !R.failed; k++) {
            unsigned long long b = R.schedule == 0 ? k : blocks - 1 - k;
            blockIdx = uint3{unsigned(b % g.x), unsigned(b / g.x % g.y), unsigned(b / (1ull * g.x * g.y))};
            run_block();
        }
        R.in_kernel = 0;
        rc = R.failed ? 1 : 0;
    } else {
        R.in_kernel = 0;
        char where[128], buf[512];
        block_string(where, sizeof where);
        uintptr_t a = reinterpret_cast<uintptr_t>(R.fault_addr);
        snprintf(buf, sizeof buf, "kernel %s, %s: %s at address %#lx%s", name, where,
                 R.fault_sig == SIGBUS ? "bus error" : "invalid memory access", (unsigned long)a,
                 fault_in_stack(a) ? " (fiber stack overflow)" : "");
        R.error = buf;
        rc = 2;
    }
    sigaction(SIGSEGV, &R.old_segv, nullptr);
    sigaction(SIGBUS, &R.old_bus, nullptr);
    return rc;
}

// ---------------------------------------------------------------------------------------
// Kernel registry: unpacks cuLaunchKernel-style parameter arrays by the kernel's own
// parameter types.

template <class T>
const char* scalar_name() {
    using U = std::remove_cv_t<T>;
    if constexpr (std::is_same_v<U, float>) return "f32";
    else if constexpr (std::is_same_v<U, double>) return "f64";
    else if constexpr (std::is_same_v<U, bool>) return "bool";
    else if constexpr (std::is_integral_v<U>) {
        constexpr bool s = std::is_signed_v<U>;
        switch (sizeof(U)) {
        case 1: return s ? "i8" : "u8";
        case 2: return s ? "i16" : "u16";
        case 4: return s ? "i32" : "u32";
        case 8: return s ? "i64" : "u64";
        }
        return "?";
    } else return "?";
}

template <class T>
std::string type_name() {
    if constexpr (std::is_pointer_v<T>) {
        using P = std::remove_pointer_t<T>;
        return std::string(std::is_const_v<P> ? "const " : "") + scalar_name<P>() + "*";
    } else {
        return scalar_name<T>();
    }
}

template <class Sig>
struct Kernel;
template <class... A>
struct Kernel<void (*)(A...)> {
    template <size_t... I>
    static std::tuple<A...> unpack(void** p, std::index_sequence<I...>) {
        return std::tuple<A...>(*static_cast<A*>(p[I])...);
    }
    static std::string signature() {
        std::string s;
        ((s += s.empty() ? "" : ",", s += type_name<A>()), ...);
        return s;
    }
};

struct Entry {
    const char* name;
    int (*launch)(const char*, dim3, dim3, void**);
    std::string (*signature)();
};

template <class Sig, Sig F>
struct Launcher;
template <class... A, void (*F)(A...)>
struct Launcher<void (*)(A...), F> {
    static int run(const char* name, dim3 g, dim3 b, void** params) {
        std::tuple<A...> args = Kernel<void (*)(A...)>::unpack(params, std::index_sequence_for<A...>{});
        // Every thread gets its own copy of the arguments, as by-value kernel parameters.
        auto body = [&args]() { std::apply(F, args); };
        return run_grid(name, g, b, [](void* c) { (*static_cast<decltype(body)*>(c))(); }, &body);
    }
};

template <auto F>
Entry entry(const char* name) {
    return Entry{name, &Launcher<decltype(F), F>::run, &Kernel<decltype(F)>::signature};
}

inline const Entry* g_entries = nullptr;
inline size_t g_count = 0;

inline bool register_kernels(const Entry* e, size_t n) {
    g_entries = e;
    g_count = n;
    return true;
}

inline const Entry* find(const char* name) {
    for (size_t i = 0; i < g_count; i++)
        if (strcmp(g_entries[i].name, name) == 0) return &g_entries[i];
    return nullptr;
}

} // namespace emu

// ---------------------------------------------------------------------------------------
// Device functions

__forceinline__ void __syncthreads() { emu::syncthreads(); }
__forceinline__ void __syncwarp(unsigned mask = 0xffffffffu) { emu::warp_exchange(mask, 0, "__syncwarp"); }
__forceinline__ void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
__forceinline__ void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

namespace emu {
template <class T>
T shfl(unsigned mask, T v, int width, const char* what, unsigned (*src_of)(unsigned lane, int arg, int width),
       int arg) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type wider than 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    unsigned lane = lane_id();
    const uint64_t* all = warp_exchange(mask, bits, what);
    unsigned src = src_of(lane, arg, width);
    T r;
    memcpy(&r, &all[src], sizeof(T));
    return r;
}
inline unsigned seg_base(unsigned lane, int width) { return lane & ~unsigned(width - 1); }
} // namespace emu

// Lanes outside the caller's width-segment read their own value, as in CUDA.
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return emu::shfl(mask, v, width, "__shfl_xor_sync", [](unsigned l, int m, int w) {
        unsigned s = l ^ unsigned(m);
        return s >= emu::seg_base(l, w) + unsigned(w) ? l : s & 31u;
    }, lane_mask);
}
template <class T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
    return emu::shfl(mask, v, width, "__shfl_sync", [](unsigned l, int s, int w) {
        return emu::seg_base(l, w) + (unsigned(s) & unsigned(w - 1));
    }, src_lane);
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return emu::shfl(mask, v, width, "__shfl_down_sync", [](unsigned l, int d, int w) {
        unsigned s = l + unsigned(d);
        return s >= emu::seg_base(l, w) + unsigned(w) ? l : s;
    }, int(delta));
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return emu::shfl(mask, v, width, "__shfl_up_sync", [](unsigned l, int d, int w) {
        return int(l) - d < int(emu::seg_base(l, w)) ? l : l - unsigned(d);
    }, int(delta));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    const uint64_t* all = emu::warp_exchange(mask, pred != 0, "__ballot_sync");
    unsigned r = 0;
    for (int l = 0; l < 32; l++) r |= unsigned(all[l] != 0) << l;
    return r;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == 0xffffffffu; }

// Reinterpretation and conversion intrinsics
__forceinline__ float __uint_as_float(unsigned u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
__forceinline__ float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}
__forceinline__ unsigned __float_as_uint(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}
__forceinline__ int __float_as_int(float f) {
    int i;
    memcpy(&i, &f, 4);
    return i;
}
__forceinline__ double __longlong_as_double(long long i) {
    double d;
    memcpy(&d, &i, 8);
    return d;
}
__forceinline__ long long __double_as_longlong(double d) {
    long long i;
    memcpy(&i, &d, 8);
    return i;
}
__forceinline__ int __float2int_rn(float x) { return int(rintf(x)); }
__forceinline__ int __float2int_rz(float x) { return int(x); }
__forceinline__ int __float2int_rd(float x) { return int(floorf(x)); }
__forceinline__ unsigned __float2uint_rn(float x) { return unsigned(rintf(x)); }
__forceinline__ float __int2float_rn(int x) { return float(x); }

// Math: the <cmath> float functions are used as they are (IEEE, correctly rounded for
// the basic operations; libm's expf/logf stand in for CUDA's, which are within 2 ulp).
__forceinline__ float rsqrtf(float x) { return 1.0f / sqrtf(x); }
__forceinline__ float __expf(float x) { return expf(x); }
__forceinline__ float __logf(float x) { return logf(x); }
__forceinline__ float __powf(float x, float y) { return powf(x, y); }
__forceinline__ float __sinf(float x) { return sinf(x); }
__forceinline__ float __cosf(float x) { return cosf(x); }
__forceinline__ float __tanhf(float x) { return tanhf(x); }
__forceinline__ float __fdividef(float a, float b) { return a / b; }
__forceinline__ float __fdiv_rn(float a, float b) { return a / b; }
__forceinline__ float __frcp_rn(float x) { return 1.0f / x; }
__forceinline__ float __fsqrt_rn(float x) { return sqrtf(x); }
__forceinline__ float __fadd_rn(float a, float b) { return a + b; }
__forceinline__ float __fsub_rn(float a, float b) { return a - b; }
__forceinline__ float __fmul_rn(float a, float b) { return a * b; }
__forceinline__ float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
__forceinline__ float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : (x == x ? x : 0.0f)); }
__forceinline__ int __popc(unsigned x) { return __builtin_popcount(x); }
__forceinline__ int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
__forceinline__ int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
__forceinline__ int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
__forceinline__ int __ffs(int x) { return __builtin_ffs(x); }
template <class T>
__forceinline__ T __ldg(const T* p) {
    return *p;
}

// CUDA's overloaded min/max for device code
#define EMU_MINMAX(T)                                                                                            \
    __forceinline__ T min(T a, T b) { return a < b ? a : b; }                                                    \
    __forceinline__ T max(T a, T b) { return a > b ? a : b; }
EMU_MINMAX(int)
EMU_MINMAX(unsigned)
EMU_MINMAX(long long)
EMU_MINMAX(unsigned long long)
#undef EMU_MINMAX
__forceinline__ float min(float a, float b) { return fminf(a, b); }
__forceinline__ float max(float a, float b) { return fmaxf(a, b); }
__forceinline__ double min(double a, double b) { return fmin(a, b); }
__forceinline__ double max(double a, double b) { return fmax(a, b); }

// Atomics (threads of a launch never run in parallel, but keep them atomic anyway)
#define EMU_ATOMIC_INT(T)                                                                                        \
    __forceinline__ T atomicAdd(T* a, T v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }                \
    __forceinline__ T atomicSub(T* a, T v) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); }                \
    __forceinline__ T atomicAnd(T* a, T v) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); }                \
    __forceinline__ T atomicOr(T* a, T v) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }                  \
    __forceinline__ T atomicXor(T* a, T v) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); }                \
    __forceinline__ T atomicExch(T* a, T v) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); }              \
    __forceinline__ T atomicCAS(T* a, T cmp, T v) {                                                              \
        __atomic_compare_exchange_n(a, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                      \
        return cmp;                                                                                              \
    }                                                                                                            \
    __forceinline__ T atomicMax(T* a, T v) {                                                                     \
        T old = __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                            \
        while (old < v && !__atomic_compare_exchange_n(a, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) { \
        }                                                                                                        \
        return old;                                                                                              \
    }                                                                                                            \
    __forceinline__ T atomicMin(T* a, T v) {                                                                     \
        T old = __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                            \
        while (old > v && !__atomic_compare_exchange_n(a, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) { \
        }                                                                                                        \
        return old;                                                                                              \
    }
EMU_ATOMIC_INT(int)
EMU_ATOMIC_INT(unsigned)
EMU_ATOMIC_INT(unsigned long long)
#undef EMU_ATOMIC_INT

namespace emu {
template <class T, class U>
T atomic_float_add(T* a, T v) {
    static_assert(sizeof(T) == sizeof(U));
    U old = __atomic_load_n(reinterpret_cast<U*>(a), __ATOMIC_SEQ_CST), nw;
    for (;;) {
        T f;
        memcpy(&f, &old, sizeof f);
        f += v;
        memcpy(&nw, &f, sizeof f);
        if (__atomic_compare_exchange_n(reinterpret_cast<U*>(a), &old, nw, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
            memcpy(&f, &old, sizeof f);
            return f;
        }
    }
}
} // namespace emu
__forceinline__ float atomicAdd(float* a, float v) { return emu::atomic_float_add<float, uint32_t>(a, v); }
__forceinline__ double atomicAdd(double* a, double v) { return emu::atomic_float_add<double, uint64_t>(a, v); }

// ---------------------------------------------------------------------------------------
// The C interface used by the Rust test (the registry file of each module calls
// EMU_REGISTER after the kernel source).

#define EMU_REGISTER(...)                                                                                        \
    static const ::emu::Entry emu_entries_[] = {__VA_ARGS__};                                                    \
    static const bool emu_registered_ = ::emu::register_kernels(emu_entries_, sizeof emu_entries_ / sizeof emu_entries_[0]);
#define EMU_KERNEL(f) ::emu::entry<&f>(#f)

// Launches kernel `name` on grid × block with cuLaunchKernel-style `params` (params[i]
// points at the value of argument i). 0: success; -1: unknown kernel; 1: the kernel did
// something undefined (see emu_error); 2: invalid memory access (emu_fault_addr);
// 3: invalid launch configuration.
EMU_EXPORT int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                          unsigned bz, void** params) {
    emu::Runtime& R = emu::rt();
    std::lock_guard<std::mutex> lock(R.launch_mutex);
    const emu::Entry* e = emu::find(name);
    if (!e) {
        R.error = std::string("unknown kernel ") + name;
        return -1;
    }
    return e->launch(e->name, dim3(gx, gy, gz), dim3(bx, by, bz), params);
}

EMU_EXPORT const char* emu_error() { return emu::rt().error.c_str(); }
EMU_EXPORT uintptr_t emu_fault_addr() { return reinterpret_cast<uintptr_t>(emu::rt().fault_addr); }

// 0: blocks, and threads between barriers, run in ascending order; 1: descending.
EMU_EXPORT void emu_set_schedule(int s) {
    emu::Runtime& R = emu::rt();
    std::lock_guard<std::mutex> lock(R.launch_mutex);
    R.schedule = s;
}

// Comma-separated parameter types of a kernel ("f32*,const i32*,u64"), or null.
EMU_EXPORT const char* emu_signature(const char* name) {
    static std::map<std::string, std::string> cache;
    emu::Runtime& R = emu::rt();
    std::lock_guard<std::mutex> lock(R.launch_mutex);
    const emu::Entry* e = emu::find(name);
    if (!e) return nullptr;
    auto it = cache.find(name);
    if (it == cache.end()) it = cache.emplace(name, e->signature()).first;
    return it->second.c_str();
}

// "Device" memory: `bytes` ending exactly at an inaccessible page, preceded by canary
// bytes up to the previous (inaccessible) page boundary.
EMU_EXPORT void* emu_alloc(size_t bytes) {
    emu::Runtime& R = emu::rt();
    size_t page = size_t(sysconf(_SC_PAGESIZE));
    size_t data = (bytes + page - 1) / page * page;
    if (data == 0) data = page;
    size_t len = data + 2 * page;
    void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return nullptr;
    char* base = static_cast<char*>(p);
    mprotect(base, page, PROT_NONE);
    mprotect(base + page + data, page, PROT_NONE);
    char* user = base + page + data - bytes;
    memset(base + page, 0xa5, size_t(user - (base + page)));
    std::lock_guard<std::mutex> lock(R.alloc_mutex);
    R.allocs[reinterpret_cast<uintptr_t>(user)] = {base, len, bytes};
    return user;
}

// 0 when the canary before the buffer is intact, 1 when something wrote into it, -1 for
// a pointer emu_alloc did not return.
EMU_EXPORT int emu_check(void* user) {
    emu::Runtime& R = emu::rt();
    std::lock_guard<std::mutex> lock(R.alloc_mutex);
    auto it = R.allocs.find(reinterpret_cast<uintptr_t>(user));
    if (it == R.allocs.end()) return -1;
    size_t page = size_t(sysconf(_SC_PAGESIZE));
    char* start = std::get<0>(it->second) + page;
    for (char* c = start; c < static_cast<char*>(user); c++)
        if (static_cast<unsigned char>(*c) != 0xa5) return 1;
    return 0;
}

EMU_EXPORT void emu_free(void* user) {
    emu::Runtime& R = emu::rt();
    std::lock_guard<std::mutex> lock(R.alloc_mutex);
    auto it = R.allocs.find(reinterpret_cast<uintptr_t>(user));
    if (it == R.allocs.end()) return;
    munmap(std::get<0>(it->second), std::get<1>(it->second));
    R.allocs.erase(it);
}

// Names of the registered kernels, comma-separated.
EMU_EXPORT const char* emu_kernels() {
    static std::string s;
    emu::Runtime& R = emu::rt();
    std::lock_guard<std::mutex> lock(R.launch_mutex);
    s.clear();
    for (size_t i = 0; i < emu::g_count; i++) {
        if (i) s += ",";
        s += emu::g_entries[i].name;
    }
    return s.c_str();
}
