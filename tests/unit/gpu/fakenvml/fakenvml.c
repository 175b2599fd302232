/*
 * A small stand-in for libnvidia-ml.so.1, loaded by the real pynvml (ctypes) through
 * LD_LIBRARY_PATH, so that spark-slurm's NVML backend is tested through the same path
 * it takes on a GPU node: real symbol names, real signatures, real units (mW, degrees
 * C, mJ), real return codes.
 *
 * Its state lives in a text file of `key=value` lines named by $FAKE_NVML_STATE; every
 * call re-reads it under flock(2), and calls that change something (a limit, the
 * energy counter, persistence) write it back. The test drives the "hardware" and
 * injects faults by editing that file (tests/unit/gpu/fakenvml/__init__.py):
 *
 *   driver=1                 0: nvmlInit fails with DRIVER_NOT_LOADED
 *   gpus=N                   physical GPUs, each with keys gpuI.<name>:
 *     minor bus uuid name    identity (minor is N in /dev/nvidiaN)
 *     min_mw max_mw default_mw requested_mw   power management limits
 *     other_limit_mw         another limiter (BMC, Domain Power Service), 0: none;
 *                            the enforced limit is the lowest of all limiters
 *     round_mw               the driver stores a set limit rounded down to this step
 *     demand_mw              what the workload would draw; power is min(demand, enforced)
 *     energy_mj energy_ns    the counter (mJ since the driver loaded) and when it was
 *                            last advanced (CLOCK_MONOTONIC); it advances by power * time
 *     temp_c util reasons    temperature in degrees C, utilisation %, clock-event bits
 *     persistence            0/1
 *     mig                    -1 not MIG-capable, 0 disabled, 1 enabled
 *     mig_slices             slices when enabled (MIG handles 0..n-1)
 *     lost                   1: every call on the GPU returns GPU_IS_LOST
 *     epoch                  bumped when a lost GPU comes back: handles taken before
 *                            stay lost until NVML is shut down and initialised again
 *     handle_error           a code nvmlDeviceGetHandleByIndex returns for this GPU
 *     fail.<function>        a code that function returns for this GPU
 *   fail.<function>=CODE     a code that function returns whatever the device
 *   delay_ms.<function>=MS   the function sleeps first (a wedged driver)
 *   calls.<function>         counted by the fake (so tests see what was called)
 *
 * Setters need root, exactly as the real library: they return NO_PERMISSION when the
 * effective uid is not 0. Handles are pointers into a static pool; a MIG handle
 * answers only what real MIG handles answer (UUID, name, parent, is-MIG).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

typedef int nvmlReturn_t;
enum {
    NVML_SUCCESS = 0, NVML_ERROR_UNINITIALIZED = 1, NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3, NVML_ERROR_NO_PERMISSION = 4, NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7, NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_GPU_IS_LOST = 15, NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
    NVML_ERROR_UNKNOWN = 999,
};

typedef struct {
    char busIdLegacy[16];
    unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;

typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;

typedef struct { unsigned int version, powerScope, powerValueMw; } nvmlPowerValue_v2_t;
#define NVML_POWER_VALUE_V2 0x0200000Cu

struct fake_dev { int used, gpu, slice; long epoch; };
typedef struct fake_dev *nvmlDevice_t;

#define MAX_KEYS 1024
#define MAX_HANDLES 512
static struct fake_dev pool[MAX_HANDLES];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int init_count;

/* ---- the state file ------------------------------------------------------------ */
static char keys[MAX_KEYS][80];
static char vals[MAX_KEYS][160];
static int nkeys, dirty, state_fd = -1;

static const char *get(const char *key) {
    for (int i = 0; i < nkeys; i++)
        if (strcmp(keys[i], key) == 0) return vals[i];
    return NULL;
}

static long long get_ll(const char *key, long long dflt) {
    const char *v = get(key);
    return v ? strtoll(v, NULL, 0) : dflt;
}

static void put(const char *key, const char *value) {
    int i;
    for (i = 0; i < nkeys; i++)
        if (strcmp(keys[i], key) == 0) break;
    if (i == nkeys) {
        if (nkeys == MAX_KEYS) return;
        nkeys++;
        snprintf(keys[i], sizeof keys[i], "%s", key);
    }
    snprintf(vals[i], sizeof vals[i], "%s", value);
    dirty = 1;
}

static void put_ll(const char *key, long long v) {
    char buf[32];
    snprintf(buf, sizeof buf, "%lld", v);
    put(key, buf);
}

static long long gpu_ll(int gpu, const char *name, long long dflt) {
    char key[80];
    snprintf(key, sizeof key, "gpu%d.%s", gpu, name);
    return get_ll(key, dflt);
}

static const char *gpu_str(int gpu, const char *name) {
    char key[80];
    snprintf(key, sizeof key, "gpu%d.%s", gpu, name);
    return get(key);
}

static void gpu_put(int gpu, const char *name, long long v) {
    char key[80];
    snprintf(key, sizeof key, "gpu%d.%s", gpu, name);
    put_ll(key, v);
}

/* Lock and read the state; 0 on success. The lock is held until leave(). */
static int load(void) {
    const char *path = getenv("FAKE_NVML_STATE");
    nkeys = 0;
    dirty = 0;
    if (path == NULL) return -1;
    state_fd = open(path, O_RDWR | O_CLOEXEC);
    if (state_fd < 0) return -1;
    if (flock(state_fd, LOCK_EX) != 0) { close(state_fd); state_fd = -1; return -1; }
    static char buf[MAX_KEYS * 240];
    ssize_t got = 0, n;
    while ((n = pread(state_fd, buf + got, sizeof buf - 1 - (size_t)got, got)) > 0) got += n;
    buf[got] = 0;
    for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
        char *eq = strchr(line, '=');
        if (eq == NULL || nkeys == MAX_KEYS) continue;
        *eq = 0;
        snprintf(keys[nkeys], sizeof keys[nkeys], "%s", line);
        snprintf(vals[nkeys], sizeof vals[nkeys], "%s", eq + 1);
        nkeys++;
    }
    return 0;
}

static void leave(void) {
    if (state_fd < 0) return;
    if (dirty) {
        static char out[MAX_KEYS * 240];
        size_t len = 0;
        for (int i = 0; i < nkeys; i++)
            len += (size_t)snprintf(out + len, sizeof out - len, "%s=%s\n", keys[i], vals[i]);
        if (ftruncate(state_fd, 0) == 0) {
            size_t done = 0;
            while (done < len) {
                ssize_t w = pwrite(state_fd, out + done, len - done, (off_t)done);
                if (w <= 0) break;
                done += (size_t)w;
            }
        }
    }
    flock(state_fd, LOCK_UN);
    close(state_fd);
    state_fd = -1;
}

/* ---- call bookkeeping ---------------------------------------------------------- */
static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Every entry point starts here: lock, load, count, delay, global fault. */
static nvmlReturn_t enter(const char *fn, int need_init) {
    pthread_mutex_lock(&lock);
    if (load() != 0) return NVML_ERROR_UNKNOWN;
    char key[80];
    snprintf(key, sizeof key, "calls.%s", fn);
    put_ll(key, get_ll(key, 0) + 1);
    snprintf(key, sizeof key, "delay_ms.%s", fn);
    long long delay = get_ll(key, 0);
    if (delay > 0) {  /* sleep without holding the file lock, as a stuck ioctl would */
        leave();
        struct timespec ts = {delay / 1000, (delay % 1000) * 1000000L};
        nanosleep(&ts, NULL);
        if (load() != 0) return NVML_ERROR_UNKNOWN;
    }
    if (need_init && init_count == 0) return NVML_ERROR_UNINITIALIZED;
    snprintf(key, sizeof key, "fail.%s", fn);
    return (nvmlReturn_t)get_ll(key, 0);
}

static nvmlReturn_t done(nvmlReturn_t ret) {
    leave();
    pthread_mutex_unlock(&lock);
    return ret;
}

#define ENTER(need_init) \
    do { nvmlReturn_t r_ = enter(__func__, need_init); if (r_) return done(r_); } while (0)

static struct fake_dev *handle_for(int gpu, int slice) {
    long epoch = (long)gpu_ll(gpu, "epoch", 0);
    int free_slot = -1;
    for (int i = 0; i < MAX_HANDLES; i++) {
        if (pool[i].used && pool[i].gpu == gpu && pool[i].slice == slice &&
            pool[i].epoch == epoch) return &pool[i];
        if (!pool[i].used && free_slot < 0) free_slot = i;
    }
    if (free_slot < 0) return NULL;
    pool[free_slot] = (struct fake_dev){1, gpu, slice, epoch};
    return &pool[free_slot];
}

/* A device handle's own checks: valid, not lost, current epoch, per-GPU fault. */
static nvmlReturn_t check_dev(nvmlDevice_t d, const char *fn) {
    if (d < pool || d >= pool + MAX_HANDLES || !d->used) return NVML_ERROR_INVALID_ARGUMENT;
    if (d->gpu >= get_ll("gpus", 0)) return NVML_ERROR_INVALID_ARGUMENT;
    if (gpu_ll(d->gpu, "lost", 0) || gpu_ll(d->gpu, "epoch", 0) != d->epoch)
        return NVML_ERROR_GPU_IS_LOST;
    char name[96];
    snprintf(name, sizeof name, "fail.%s", fn);
    return (nvmlReturn_t)gpu_ll(d->gpu, name, 0);
}

#define DEV(d) \
    do { nvmlReturn_t r_ = check_dev(d, __func__); if (r_) return done(r_); } while (0)
/* Power, thermal and clock queries exist only on the physical GPU. */
#define PHYSICAL(d) do { if ((d)->slice >= 0) return done(NVML_ERROR_NOT_SUPPORTED); } while (0)
#define OUT(p) do { if ((p) == NULL) return done(NVML_ERROR_INVALID_ARGUMENT); } while (0)

static int mig_enabled(int gpu) { return gpu_ll(gpu, "mig", -1) == 1; }

static long long enforced_mw(int gpu) {
    long long req = gpu_ll(gpu, "requested_mw", 0), other = gpu_ll(gpu, "other_limit_mw", 0);
    return other > 0 && other < req ? other : req;
}

static long long power_mw(int gpu) {
    long long demand = gpu_ll(gpu, "demand_mw", 0), cap = enforced_mw(gpu);
    return demand < cap ? demand : cap;
}

/* Advance the energy counter to now at the current power draw. */
static long long energy_now(int gpu) {
    long long t = now_ns(), last = gpu_ll(gpu, "energy_ns", 0);
    long long e = gpu_ll(gpu, "energy_mj", 0);
    if (last > 0 && t > last) e += power_mw(gpu) * (t - last) / 1000000000LL;
    gpu_put(gpu, "energy_mj", e);
    gpu_put(gpu, "energy_ns", t);
    return e;
}

/* ---- the NVML API used by spark-slurm ------------------------------------------ */
nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    ENTER(0);
    if (!get_ll("driver", 1)) return done(NVML_ERROR_DRIVER_NOT_LOADED);
    init_count++;
    return done(NVML_SUCCESS);
}

nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void) {
    ENTER(1);
    init_count--;
    return done(NVML_SUCCESS);
}

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    ENTER(1);
    OUT(count);
    *count = (unsigned int)get_ll("gpus", 0);
    return done(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    ENTER(1);
    OUT(device);
    if (index >= (unsigned int)get_ll("gpus", 0)) return done(NVML_ERROR_INVALID_ARGUMENT);
    nvmlReturn_t err = (nvmlReturn_t)gpu_ll((int)index, "handle_error", 0);
    if (err) return done(err);
    if (gpu_ll((int)index, "lost", 0)) return done(NVML_ERROR_GPU_IS_LOST);
    *device = handle_for((int)index, -1);
    return done(*device ? NVML_SUCCESS : NVML_ERROR_UNKNOWN);
}

nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t d, unsigned int *minor) {
    ENTER(1);
    DEV(d);
    PHYSICAL(d);
    OUT(minor);
    *minor = (unsigned int)gpu_ll(d->gpu, "minor", d->gpu);
    return done(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t d, nvmlPciInfo_t *pci) {
    ENTER(1);
    DEV(d);
    OUT(pci);
    memset(pci, 0, sizeof *pci);
    pci->bus = (unsigned int)gpu_ll(d->gpu, "bus", 0x18 + d->gpu);
    snprintf(pci->busId, sizeof pci->busId, "00000000:%02X:00.0", pci->bus);
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "0000:%02X:00.0", pci->bus);
    pci->pciDeviceId = 0x233010DE;
    return done(NVML_SUCCESS);
}

static nvmlReturn_t copy_text(char *out, unsigned int length, const char *text) {
    if (out == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(text) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(out, text, strlen(text) + 1);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *uuid, unsigned int length) {
    ENTER(1);
    DEV(d);
    char text[96];
    const char *base = gpu_str(d->gpu, "uuid");
    if (d->slice < 0)
        snprintf(text, sizeof text, "%s", base ? base : "GPU-unnamed");
    else  /* MIG-<parent uuid without its GPU- prefix>-<slice>, unique per slice */
        snprintf(text, sizeof text, "MIG-%s-%d", base && strlen(base) > 4 ? base + 4 : "x",
                 d->slice);
    return done(copy_text(uuid, length, text));
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char *name, unsigned int length) {
    ENTER(1);
    DEV(d);
    char text[128];
    const char *base = gpu_str(d->gpu, "name");
    snprintf(text, sizeof text, "%s%s", base ? base : "NVIDIA H100 80GB HBM3",
             d->slice >= 0 ? " MIG 1g.10gb" : "");
    return done(copy_text(name, length, text));
}

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t d, unsigned int *current, unsigned int *pending) {
    ENTER(1);
    DEV(d);
    PHYSICAL(d);
    OUT(current);
    OUT(pending);
    long long mode = gpu_ll(d->gpu, "mig", -1);
    if (mode < 0) return done(NVML_ERROR_NOT_SUPPORTED);
    *current = *pending = (unsigned int)mode;
    return done(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t d, unsigned int *count) {
    ENTER(1);
    DEV(d);
    PHYSICAL(d);
    OUT(count);
    if (gpu_ll(d->gpu, "mig", -1) < 0) return done(NVML_ERROR_NOT_SUPPORTED);
    *count = 7;
    return done(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t d, unsigned int index,
                                                 nvmlDevice_t *mig) {
    ENTER(1);
    DEV(d);
    OUT(mig);
    if (d->slice >= 0 || !mig_enabled(d->gpu)) return done(NVML_ERROR_INVALID_ARGUMENT);
    if (index >= 7) return done(NVML_ERROR_INVALID_ARGUMENT);
    if (index >= (unsigned int)gpu_ll(d->gpu, "mig_slices", 0)) return done(NVML_ERROR_NOT_FOUND);
    *mig = handle_for(d->gpu, (int)index);
    return done(*mig ? NVML_SUCCESS : NVML_ERROR_UNKNOWN);
}

nvmlReturn_t nvmlDeviceGetDeviceHandleFromMigDeviceHandle(nvmlDevice_t mig, nvmlDevice_t *parent) {
    ENTER(1);
    DEV(mig);
    OUT(parent);
    if (mig->slice < 0) return done(NVML_ERROR_INVALID_ARGUMENT);
    *parent = handle_for(mig->gpu, -1);
    return done(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceIsMigDeviceHandle(nvmlDevice_t d, unsigned int *is_mig) {
    ENTER(1);
    DEV(d);
    OUT(is_mig);
    *is_mig = d->slice >= 0;
    return done(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetPowerManagementLimitConstraints(nvmlDevice_t d, unsigned int *lo,
                                                          unsigned int *hi) {
    ENTER(1);
    DEV(d);
    PHYSICAL(d);
    OUT(lo);
    OUT(hi);
    *lo = (unsigned int)gpu_ll(d->gpu, "min_mw", 0);
    *hi = (unsigned int)gpu_ll(d->gpu, "max_mw", 0);
    return done(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetPowerManagementDefaultLimit(nvmlDevice_t d, unsigned int *mw) {
    ENTER(1);
    DEV(d);
    PHYSICAL(d);
    OUT(mw);
    *mw = (unsigned int)gpu_ll(d->gpu, "default_mw", 0);
    return done(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetPowerManagementLimit(nvmlDevice_t d, unsigned int *mw) {
    ENTER(1);
    DEV(d);
    PHYSICAL(d);
    OUT(mw);
    *mw = (unsigned int)gpu_ll(d->gpu, "requested_mw", 0);
    return done(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t d, unsigned int *mw) {
    ENTER(1);
    DEV(d);
    PHYSICAL(d);
    OUT(mw);
    *mw = (unsigned int)enforced_mw(d->gpu);
    return done(NVML_SUCCESS);
}

static nvmlReturn_t set_limit(nvmlDevice_t d, unsigned int mw) {
    if (geteuid() != 0) return NVML_ERROR_NO_PERMISSION;
    if (mw < gpu_ll(d->gpu, "min_mw", 0) || mw > gpu_ll(d->gpu, "max_mw", 0))
        return NVML_ERROR_INVALID_ARGUMENT;
    long long step = gpu_ll(d->gpu, "round_mw", 0);
    energy_now(d->gpu);  /* energy so far was drawn under the old limit */
    gpu_put(d->gpu, "requested_mw", step > 0 ? (long long)mw / step * step : (long long)mw);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceSetPowerManagementLimit(nvmlDevice_t d, unsigned int mw) {
    ENTER(1);
    DEV(d);
    PHYSICAL(d);
    return done(set_limit(d, mw));
}

nvmlReturn_t nvmlDeviceSetPowerManagementLimit_v2(nvmlDevice_t d, nvmlPowerValue_v2_t *value) {
    ENTER(1);
    DEV(d);
    PHYSICAL(d);
    OUT(value);
    if (value->version != NVML_POWER_VALUE_V2) return done(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    if (value->powerScope != 0) return done(NVML_ERROR_NOT_SUPPORTED);  /* a discrete GPU */
    return done(set_limit(d, value->powerValueMw));
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t d, unsigned int *mw) {
    ENTER(1);
    DEV(d);
    PHYSICAL(d);
    OUT(mw);
    *mw = (unsigned int)power_mw(d->gpu);
    return done(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t d, unsigned long long *mj) {
    ENTER(1);
    DEV(d);
    PHYSICAL(d);
    OUT(mj);
    *mj = (unsigned long long)energy_now(d->gpu);
    return done(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t d, int sensor, unsigned int *temp) {
    ENTER(1);
    DEV(d);
    PHYSICAL(d);
    OUT(temp);
    if (sensor != 0) return done(NVML_ERROR_INVALID_ARGUMENT);  /* NVML_TEMPERATURE_GPU */
    *temp = (unsigned int)gpu_ll(d->gpu, "temp_c", 40);
    return done(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t d, nvmlUtilization_t *util) {
    ENTER(1);
    DEV(d);
    PHYSICAL(d);
    OUT(util);
    /* "On MIG-enabled GPUs, querying device utilization rates is not currently supported." */
    if (mig_enabled(d->gpu)) return done(NVML_ERROR_NOT_SUPPORTED);
    util->gpu = (unsigned int)gpu_ll(d->gpu, "util", 0);
    util->memory = util->gpu / 2;
    return done(NVML_SUCCESS);
}

static nvmlReturn_t reasons(nvmlDevice_t d, unsigned long long *mask) {
    if (mask == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *mask = (unsigned long long)gpu_ll(d->gpu, "reasons", 0);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t d, unsigned long long *mask) {
    ENTER(1);
    DEV(d);
    PHYSICAL(d);
    return done(reasons(d, mask));
}

nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t d, unsigned long long *mask) {
    ENTER(1);
    DEV(d);
    PHYSICAL(d);
    return done(reasons(d, mask));
}

nvmlReturn_t nvmlDeviceGetPersistenceMode(nvmlDevice_t d, int *mode) {
    ENTER(1);
    DEV(d);
    PHYSICAL(d);
    OUT(mode);
    *mode = (int)gpu_ll(d->gpu, "persistence", 0);
    return done(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceSetPersistenceMode(nvmlDevice_t d, int mode) {
    ENTER(1);
    DEV(d);
    PHYSICAL(d);
    if (geteuid() != 0) return done(NVML_ERROR_NO_PERMISSION);
    if (mode != 0 && mode != 1) return done(NVML_ERROR_INVALID_ARGUMENT);
    gpu_put(d->gpu, "persistence", mode);
    return done(NVML_SUCCESS);
}
