/*
 * xks_fault_pkcs11.c - a fault-injection PKCS#11 module for testing xksproxy.
 *
 * The module loads a real PKCS#11 module and forwards every call to it, except
 * that the session, login, random and crypto functions first consult a one-line
 * control file:
 *
 *     ok                 forward normally (also: no control file, empty file)
 *     error CKR_<NAME>   return that code without forwarding (or a number:
 *                        "error 0x30", "error 48")
 *     slow <ms>          sleep <ms> milliseconds, then forward
 *     hang               block, re-reading the file every ~20 ms, until the
 *                        mode is no longer "hang"; then act on the new mode
 *
 * "error", "slow" and "hang" may be followed by function names (for example
 * "error CKR_DEVICE_ERROR C_UnwrapKey"): then only those functions obey it.
 *
 * Where the real module and the control file are: the file "xksfault.conf"
 * beside this module's own .so (found with dladdr), with the lines
 * "real_module = <path>" and "control = <path>"; only when that file does not
 * exist, the variables $XKS_FAULT_REAL_MODULE and $XKS_FAULT_CONTROL.  So each
 * copy of the .so can forward to its own module and obey its own control file
 * even though a process has one environment.
 *
 * Writers must replace the file atomically (write a temporary file in the same
 * directory, then rename() it over the control file).  See README.md.
 *
 * Build:
 *     gcc -O2 -Wall -Wextra -fPIC -shared -o libxksfault.so xks_fault_pkcs11.c \
 *         -ldl -lpthread
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "pkcs11_min.h"

#define XKS_EXPORT __attribute__((visibility("default")))
#define XKS_LOG_PREFIX "xks_fault_pkcs11: "

/* Longest accepted "slow" delay: one day. */
#define XKS_MAX_SLOW_MS 86400000UL
/* How often a "hang" re-reads the control file. */
#define XKS_HANG_POLL_MS 20UL
/* The per-copy configuration file, in the directory of the module's own .so. */
#define XKS_CONF_NAME "xksfault.conf"

/* ------------------------------------------------------------------------ */
/* Function indices and the layout check                                    */
/* ------------------------------------------------------------------------ */

#define XKS_ENUM_ENTRY(name, params, args) XKS_FN_##name,
enum { XKS_PKCS11_FUNCTIONS(XKS_ENUM_ENTRY, XKS_ENUM_ENTRY) XKS_FN_COUNT };
#undef XKS_ENUM_ENTRY

_Static_assert(XKS_FN_COUNT == XKS_PKCS11_FUNCTION_COUNT,
               "CK_FUNCTION_LIST must have the 68 PKCS#11 v2.40 functions");
_Static_assert(offsetof(CK_FUNCTION_LIST, C_WaitForSlotEvent) -
                       offsetof(CK_FUNCTION_LIST, C_Initialize) ==
                   (XKS_PKCS11_FUNCTION_COUNT - 1) * sizeof(CK_RV(*)(void)),
               "function pointers must be contiguous");
_Static_assert(offsetof(CK_FUNCTION_LIST, C_GetFunctionList) -
                       offsetof(CK_FUNCTION_LIST, C_Initialize) ==
                   XKS_FN_C_GetFunctionList * sizeof(CK_RV(*)(void)),
               "C_GetFunctionList is the fourth function");

/*
 * The functions that obey the control file: session, login, random, crypto,
 * object and key management functions.  Everything else (C_Initialize,
 * C_Finalize, C_GetInfo, C_GetSlotList, C_GetSlotInfo, C_GetTokenInfo,
 * C_GetMechanism*, ...) is always forwarded, so that the module can be loaded,
 * a token found and the library re-initialised while a fault is active.
 */
static const unsigned char xks_faultable[XKS_FN_COUNT] = {
    [XKS_FN_C_OpenSession] = 1,
    [XKS_FN_C_CloseSession] = 1,
    [XKS_FN_C_Login] = 1,
    [XKS_FN_C_Logout] = 1,
    [XKS_FN_C_GetSessionInfo] = 1,
    [XKS_FN_C_GenerateRandom] = 1,
    [XKS_FN_C_SeedRandom] = 1,
    [XKS_FN_C_EncryptInit] = 1,
    [XKS_FN_C_Encrypt] = 1,
    [XKS_FN_C_EncryptUpdate] = 1,
    [XKS_FN_C_EncryptFinal] = 1,
    [XKS_FN_C_DecryptInit] = 1,
    [XKS_FN_C_Decrypt] = 1,
    [XKS_FN_C_DecryptUpdate] = 1,
    [XKS_FN_C_DecryptFinal] = 1,
    [XKS_FN_C_FindObjectsInit] = 1,
    [XKS_FN_C_FindObjects] = 1,
    [XKS_FN_C_FindObjectsFinal] = 1,
    [XKS_FN_C_GetAttributeValue] = 1,
    [XKS_FN_C_SetAttributeValue] = 1,
    [XKS_FN_C_CreateObject] = 1,
    [XKS_FN_C_CopyObject] = 1,
    [XKS_FN_C_DestroyObject] = 1,
    [XKS_FN_C_GenerateKey] = 1,
    [XKS_FN_C_GenerateKeyPair] = 1,
    [XKS_FN_C_WrapKey] = 1,
    [XKS_FN_C_UnwrapKey] = 1,
    [XKS_FN_C_DeriveKey] = 1,
    [XKS_FN_C_SignInit] = 1,
    [XKS_FN_C_Sign] = 1,
    [XKS_FN_C_VerifyInit] = 1,
    [XKS_FN_C_Verify] = 1,
    [XKS_FN_C_DigestInit] = 1,
    [XKS_FN_C_Digest] = 1,
};

/* The names of the functions, by index, for "only these functions" filters. */
#define XKS_NAME_ENTRY(name, params, args) [XKS_FN_##name] = #name,
static const char *const xks_fn_names[XKS_FN_COUNT] = {
    XKS_PKCS11_FUNCTIONS(XKS_NAME_ENTRY, XKS_NAME_ENTRY)
};
#undef XKS_NAME_ENTRY

/* ------------------------------------------------------------------------ */
/* Return-value names (PKCS#11 v2.40, section 3.6 / pkcs11t.h)               */
/* ------------------------------------------------------------------------ */

struct xks_ckr_name {
    const char *name;
    CK_RV value;
};

static const struct xks_ckr_name xks_ckr_names[] = {
    {"CKR_OK", 0x00000000UL},
    {"CKR_CANCEL", 0x00000001UL},
    {"CKR_HOST_MEMORY", 0x00000002UL},
    {"CKR_SLOT_ID_INVALID", 0x00000003UL},
    {"CKR_GENERAL_ERROR", 0x00000005UL},
    {"CKR_FUNCTION_FAILED", 0x00000006UL},
    {"CKR_ARGUMENTS_BAD", 0x00000007UL},
    {"CKR_NO_EVENT", 0x00000008UL},
    {"CKR_NEED_TO_CREATE_THREADS", 0x00000009UL},
    {"CKR_CANT_LOCK", 0x0000000AUL},
    {"CKR_ATTRIBUTE_READ_ONLY", 0x00000010UL},
    {"CKR_ATTRIBUTE_SENSITIVE", 0x00000011UL},
    {"CKR_ATTRIBUTE_TYPE_INVALID", 0x00000012UL},
    {"CKR_ATTRIBUTE_VALUE_INVALID", 0x00000013UL},
    {"CKR_ACTION_PROHIBITED", 0x0000001BUL},
    {"CKR_DATA_INVALID", 0x00000020UL},
    {"CKR_DATA_LEN_RANGE", 0x00000021UL},
    {"CKR_DEVICE_ERROR", 0x00000030UL},
    {"CKR_DEVICE_MEMORY", 0x00000031UL},
    {"CKR_DEVICE_REMOVED", 0x00000032UL},
    {"CKR_ENCRYPTED_DATA_INVALID", 0x00000040UL},
    {"CKR_ENCRYPTED_DATA_LEN_RANGE", 0x00000041UL},
    {"CKR_FUNCTION_CANCELED", 0x00000050UL},
    {"CKR_FUNCTION_NOT_PARALLEL", 0x00000051UL},
    {"CKR_FUNCTION_NOT_SUPPORTED", 0x00000054UL},
    {"CKR_KEY_HANDLE_INVALID", 0x00000060UL},
    {"CKR_KEY_SIZE_RANGE", 0x00000062UL},
    {"CKR_KEY_TYPE_INCONSISTENT", 0x00000063UL},
    {"CKR_KEY_NOT_NEEDED", 0x00000064UL},
    {"CKR_KEY_CHANGED", 0x00000065UL},
    {"CKR_KEY_NEEDED", 0x00000066UL},
    {"CKR_KEY_INDIGESTIBLE", 0x00000067UL},
    {"CKR_KEY_FUNCTION_NOT_PERMITTED", 0x00000068UL},
    {"CKR_KEY_NOT_WRAPPABLE", 0x00000069UL},
    {"CKR_KEY_UNEXTRACTABLE", 0x0000006AUL},
    {"CKR_MECHANISM_INVALID", 0x00000070UL},
    {"CKR_MECHANISM_PARAM_INVALID", 0x00000071UL},
    {"CKR_OBJECT_HANDLE_INVALID", 0x00000082UL},
    {"CKR_OPERATION_ACTIVE", 0x00000090UL},
    {"CKR_OPERATION_NOT_INITIALIZED", 0x00000091UL},
    {"CKR_PIN_INCORRECT", 0x000000A0UL},
    {"CKR_PIN_INVALID", 0x000000A1UL},
    {"CKR_PIN_LEN_RANGE", 0x000000A2UL},
    {"CKR_PIN_EXPIRED", 0x000000A3UL},
    {"CKR_PIN_LOCKED", 0x000000A4UL},
    {"CKR_SESSION_CLOSED", 0x000000B0UL},
    {"CKR_SESSION_COUNT", 0x000000B1UL},
    {"CKR_SESSION_HANDLE_INVALID", 0x000000B3UL},
    {"CKR_SESSION_PARALLEL_NOT_SUPPORTED", 0x000000B4UL},
    {"CKR_SESSION_READ_ONLY", 0x000000B5UL},
    {"CKR_SESSION_EXISTS", 0x000000B6UL},
    {"CKR_SESSION_READ_ONLY_EXISTS", 0x000000B7UL},
    {"CKR_SESSION_READ_WRITE_SO_EXISTS", 0x000000B8UL},
    {"CKR_SIGNATURE_INVALID", 0x000000C0UL},
    {"CKR_SIGNATURE_LEN_RANGE", 0x000000C1UL},
    {"CKR_TEMPLATE_INCOMPLETE", 0x000000D0UL},
    {"CKR_TEMPLATE_INCONSISTENT", 0x000000D1UL},
    {"CKR_TOKEN_NOT_PRESENT", 0x000000E0UL},
    {"CKR_TOKEN_NOT_RECOGNIZED", 0x000000E1UL},
    {"CKR_TOKEN_WRITE_PROTECTED", 0x000000E2UL},
    {"CKR_UNWRAPPING_KEY_HANDLE_INVALID", 0x000000F0UL},
    {"CKR_UNWRAPPING_KEY_SIZE_RANGE", 0x000000F1UL},
    {"CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT", 0x000000F2UL},
    {"CKR_USER_ALREADY_LOGGED_IN", 0x00000100UL},
    {"CKR_USER_NOT_LOGGED_IN", 0x00000101UL},
    {"CKR_USER_PIN_NOT_INITIALIZED", 0x00000102UL},
    {"CKR_USER_TYPE_INVALID", 0x00000103UL},
    {"CKR_USER_ANOTHER_ALREADY_LOGGED_IN", 0x00000104UL},
    {"CKR_USER_TOO_MANY_TYPES", 0x00000105UL},
    {"CKR_WRAPPED_KEY_INVALID", 0x00000110UL},
    {"CKR_WRAPPED_KEY_LEN_RANGE", 0x00000112UL},
    {"CKR_WRAPPING_KEY_HANDLE_INVALID", 0x00000113UL},
    {"CKR_WRAPPING_KEY_SIZE_RANGE", 0x00000114UL},
    {"CKR_WRAPPING_KEY_TYPE_INCONSISTENT", 0x00000115UL},
    {"CKR_RANDOM_SEED_NOT_SUPPORTED", 0x00000120UL},
    {"CKR_RANDOM_NO_RNG", 0x00000121UL},
    {"CKR_DOMAIN_PARAMS_INVALID", 0x00000130UL},
    {"CKR_CURVE_NOT_SUPPORTED", 0x00000140UL},
    {"CKR_BUFFER_TOO_SMALL", 0x00000150UL},
    {"CKR_SAVED_STATE_INVALID", 0x00000160UL},
    {"CKR_INFORMATION_SENSITIVE", 0x00000170UL},
    {"CKR_STATE_UNSAVEABLE", 0x00000180UL},
    {"CKR_CRYPTOKI_NOT_INITIALIZED", 0x00000190UL},
    {"CKR_CRYPTOKI_ALREADY_INITIALIZED", 0x00000191UL},
    {"CKR_MUTEX_BAD", 0x000001A0UL},
    {"CKR_MUTEX_NOT_LOCKED", 0x000001A1UL},
    {"CKR_NEW_PIN_MODE", 0x000001B0UL},
    {"CKR_NEXT_OTP", 0x000001B1UL},
    {"CKR_EXCEEDED_MAX_ITERATIONS", 0x000001B5UL},
    {"CKR_FIPS_SELF_TEST_FAILED", 0x000001B6UL},
    {"CKR_LIBRARY_LOAD_FAILED", 0x000001B7UL},
    {"CKR_PIN_TOO_WEAK", 0x000001B8UL},
    {"CKR_PUBLIC_KEY_INVALID", 0x000001B9UL},
    {"CKR_FUNCTION_REJECTED", 0x00000200UL},
    {"CKR_VENDOR_DEFINED", 0x80000000UL},
};

/* ------------------------------------------------------------------------ */
/* Logging                                                                  */
/* ------------------------------------------------------------------------ */

__attribute__((format(printf, 1, 2))) static void xks_log(const char *fmt, ...)
{
    char msg[1024];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    /* One formatted write, so that lines from several threads do not interleave. */
    fprintf(stderr, XKS_LOG_PREFIX "%s\n", msg);
}

/* ------------------------------------------------------------------------ */
/* The control file                                                         */
/* ------------------------------------------------------------------------ */

enum xks_kind { XKS_MODE_OK, XKS_MODE_ERROR, XKS_MODE_SLOW, XKS_MODE_HANG };

struct xks_mode {
    enum xks_kind kind;
    CK_RV rv;         /* XKS_MODE_ERROR */
    unsigned long ms; /* XKS_MODE_SLOW */
    int filtered;     /* only the functions marked in "only" obey the mode */
    unsigned char only[XKS_FN_COUNT];
};

/* What identifies one version of the control file without reading it. */
struct xks_file_key {
    dev_t dev;
    ino_t ino;
    off_t size;
    struct timespec mtim;
    struct timespec ctim;
};

static char *g_control_path; /* set once, by xks_load() */

static pthread_mutex_t g_mode_lock = PTHREAD_MUTEX_INITIALIZER;
static int g_cache_valid;                /* guarded by g_mode_lock */
static struct xks_file_key g_cache_key;  /* guarded by g_mode_lock */
static struct xks_mode g_cache_mode;     /* guarded by g_mode_lock */

static void xks_key_from_stat(struct xks_file_key *key, const struct stat *st)
{
    memset(key, 0, sizeof *key);
    key->dev = st->st_dev;
    key->ino = st->st_ino;
    key->size = st->st_size;
    key->mtim = st->st_mtim;
    key->ctim = st->st_ctim;
}

static int xks_key_equal(const struct xks_file_key *a, const struct xks_file_key *b)
{
    return a->dev == b->dev && a->ino == b->ino && a->size == b->size &&
           a->mtim.tv_sec == b->mtim.tv_sec && a->mtim.tv_nsec == b->mtim.tv_nsec &&
           a->ctim.tv_sec == b->ctim.tv_sec && a->ctim.tv_nsec == b->ctim.tv_nsec;
}

static int xks_is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\v' || c == '\f';
}

/* Splits off the next whitespace-separated word of *cursor ("" at the end). */
static char *xks_next_word(char **cursor)
{
    char *p = *cursor;
    char *word;

    while (*p != '\0' && xks_is_space(*p))
        p++;
    word = p;
    while (*p != '\0' && !xks_is_space(*p))
        p++;
    if (*p != '\0')
        *p++ = '\0';
    *cursor = p;
    return word;
}

/* Parses an unsigned number in decimal, or in hex with a 0x prefix. */
static int xks_parse_ulong(const char *text, unsigned long *out)
{
    int base = 10;
    const char *digits = text;
    char *end = NULL;
    unsigned long value;
    const char *p;

    if (text[0] == '0' && (text[1] == 'x' || text[1] == 'X')) {
        base = 16;
        digits = text + 2;
    }
    if (*digits == '\0')
        return 0;
    for (p = digits; *p != '\0'; p++) {
        int ok = base == 16 ? ((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f') ||
                               (*p >= 'A' && *p <= 'F'))
                            : (*p >= '0' && *p <= '9');
        if (!ok)
            return 0;
    }
    errno = 0;
    value = strtoul(digits, &end, base);
    if (errno != 0 || end == NULL || *end != '\0')
        return 0;
    *out = value;
    return 1;
}

static int xks_parse_ckr(const char *text, CK_RV *out)
{
    size_t i;
    unsigned long value;

    for (i = 0; i < sizeof xks_ckr_names / sizeof xks_ckr_names[0]; i++) {
        if (strcasecmp(text, xks_ckr_names[i].name) == 0) {
            *out = xks_ckr_names[i].value;
            return 1;
        }
    }
    if (xks_parse_ulong(text, &value)) {
        *out = (CK_RV)value;
        return 1;
    }
    return 0;
}

static void xks_mode_reset(struct xks_mode *mode)
{
    memset(mode, 0, sizeof *mode);
    mode->kind = XKS_MODE_OK;
    mode->rv = CKR_OK;
}

/*
 * Parses the rest of a control line as function names: each must name a
 * faultable function (case-sensitive, as in the specification).  None at all
 * means every faultable function.
 */
static int xks_parse_functions(char *cursor, struct xks_mode *mode, const char **why)
{
    char *word;
    size_t i;

    while (*(word = xks_next_word(&cursor)) != '\0') {
        for (i = 0; i < XKS_FN_COUNT; i++) {
            if (xks_fn_names[i] != NULL && strcmp(word, xks_fn_names[i]) == 0)
                break;
        }
        if (i == XKS_FN_COUNT) {
            *why = "unknown function name (expected C_* names such as C_Encrypt)";
            return 0;
        }
        if (!xks_faultable[i]) {
            *why = "that function is never faulted (see the README's list)";
            return 0;
        }
        mode->only[i] = 1;
        mode->filtered = 1;
    }
    return 1;
}

/*
 * Parses the first line of the control file.  Returns 0, with *why set, if it
 * is not one of: "", "ok", "error <CKR name or number> [C_* ...]",
 * "slow <ms> [C_* ...]", "hang [C_* ...]".  Keywords and CKR names are
 * case-insensitive; surrounding blanks are ignored.
 */
static int xks_parse_line(char *line, struct xks_mode *mode, const char **why)
{
    char *cursor = line;
    char *verb = xks_next_word(&cursor);
    char *arg;
    unsigned long ms;

    xks_mode_reset(mode);
    *why = NULL;

    if (*verb == '\0' || strcasecmp(verb, "ok") == 0) {
        if (*xks_next_word(&cursor) != '\0') {
            *why = "'ok' takes no argument";
            return 0;
        }
        return 1;
    }
    if (strcasecmp(verb, "hang") == 0) {
        mode->kind = XKS_MODE_HANG;
        return xks_parse_functions(cursor, mode, why);
    }
    arg = xks_next_word(&cursor);
    if (strcasecmp(verb, "error") == 0) {
        if (!xks_parse_ckr(arg, &mode->rv)) {
            *why = "'error' needs a CKR_* name or a number such as 0x30";
            return 0;
        }
        mode->kind = XKS_MODE_ERROR;
        return xks_parse_functions(cursor, mode, why);
    }
    if (strcasecmp(verb, "slow") == 0) {
        if (!xks_parse_ulong(arg, &ms) || ms > XKS_MAX_SLOW_MS) {
            *why = "'slow' needs a number of milliseconds (at most 86400000)";
            return 0;
        }
        mode->kind = XKS_MODE_SLOW;
        mode->ms = ms;
        return xks_parse_functions(cursor, mode, why);
    }
    *why = "unknown mode (expected ok, error, slow or hang)";
    return 0;
}

/*
 * Reads and parses the control file.  The key is taken from the open file
 * descriptor, so it always describes the content that was read.
 * Returns 0 if the file could not be opened (it is then treated as missing).
 */
static int xks_read_control(struct xks_file_key *key, struct xks_mode *mode)
{
    char buf[256];
    size_t used = 0;
    struct stat st;
    const char *why = NULL;
    char *newline;
    size_t line_len;
    int fd;

    fd = open(g_control_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    if (fstat(fd, &st) != 0) {
        close(fd);
        return 0;
    }
    xks_key_from_stat(key, &st);
    while (used < sizeof buf - 1) {
        ssize_t n = read(fd, buf + used, sizeof buf - 1 - used);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        used += (size_t)n;
    }
    close(fd);
    buf[used] = '\0';

    newline = memchr(buf, '\n', used);
    line_len = newline != NULL ? (size_t)(newline - buf) : used;
    xks_mode_reset(mode);
    if (newline == NULL && used == sizeof buf - 1) {
        xks_log("%s: first line is too long; behaving as 'ok'", g_control_path);
        return 1;
    }
    if (memchr(buf, '\0', line_len) != NULL) {
        xks_log("%s: not a text line; behaving as 'ok'", g_control_path);
        return 1;
    }
    buf[line_len] = '\0';
    if (!xks_parse_line(buf, mode, &why)) {
        xks_log("%s: cannot parse control line (%s); behaving as 'ok'", g_control_path, why);
        xks_mode_reset(mode);
    }
    return 1;
}

/*
 * The current mode.  Costs one stat() and a short critical section when the
 * control file has not changed; the file is read and parsed again only when
 * its device, inode, size, mtime or ctime (with nanoseconds) change.
 * The mutex is never held across file I/O, sleeping or forwarding.
 */
static void xks_current_mode(struct xks_mode *mode)
{
    struct stat st;
    struct xks_file_key key;
    struct xks_mode parsed;
    int hit = 0;

    xks_mode_reset(mode);
    if (g_control_path == NULL)
        return;

    if (stat(g_control_path, &st) != 0) {
        pthread_mutex_lock(&g_mode_lock);
        g_cache_valid = 0;
        pthread_mutex_unlock(&g_mode_lock);
        return;
    }
    xks_key_from_stat(&key, &st);

    pthread_mutex_lock(&g_mode_lock);
    if (g_cache_valid && xks_key_equal(&g_cache_key, &key)) {
        *mode = g_cache_mode;
        hit = 1;
    }
    pthread_mutex_unlock(&g_mode_lock);
    if (hit)
        return;

    if (!xks_read_control(&key, &parsed))
        return; /* vanished between stat() and open(): "ok" */

    /*
     * Two threads may re-read concurrently and store in either order; a stale
     * entry has a key that differs from the file's, so the next call re-reads.
     */
    pthread_mutex_lock(&g_mode_lock);
    g_cache_key = key;
    g_cache_mode = parsed;
    g_cache_valid = 1;
    pthread_mutex_unlock(&g_mode_lock);
    *mode = parsed;
}

static void xks_sleep_ms(unsigned long ms)
{
    struct timespec left;

    left.tv_sec = (time_t)(ms / 1000UL);
    left.tv_nsec = (long)(ms % 1000UL) * 1000000L;
    while (nanosleep(&left, &left) != 0 && errno == EINTR) {
    }
}

/*
 * Applies the control file to one call of function *fn*.  Returns 1, with *rv
 * set, if the call must fail without being forwarded; 0 if it must be
 * forwarded (possibly after a delay).
 */
static int xks_inject(int fn, CK_RV *rv)
{
    struct xks_mode mode;

    for (;;) {
        xks_current_mode(&mode);
        if (mode.filtered && !mode.only[fn])
            return 0;
        switch (mode.kind) {
        case XKS_MODE_ERROR:
            *rv = mode.rv;
            return 1;
        case XKS_MODE_SLOW:
            xks_sleep_ms(mode.ms);
            return 0;
        case XKS_MODE_HANG:
            xks_sleep_ms(XKS_HANG_POLL_MS);
            continue;
        case XKS_MODE_OK:
        default:
            return 0;
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Loading the real module                                                  */
/* ------------------------------------------------------------------------ */

typedef CK_RV (*xks_get_function_list_fn)(CK_FUNCTION_LIST_PTR_PTR);

#define XKS_DECLARE_WRAPPER(name, params, args) static CK_RV fw_##name params;
XKS_PKCS11_FUNCTIONS(XKS_DECLARE_WRAPPER, XKS_DECLARE_WRAPPER)
#undef XKS_DECLARE_WRAPPER

/*
 * The function list handed to the application.  Its version is fixed at 2.40
 * whatever the real module reports: the list has the v2.x layout, and a 3.x
 * version here would invite callers to read the 3.0 members it does not have.
 */
#define XKS_LIST_ENTRY(name, params, args) .name = fw_##name,
static CK_FUNCTION_LIST g_list = {
    .version = {2, 40},
    XKS_PKCS11_FUNCTIONS(XKS_LIST_ENTRY, XKS_LIST_ENTRY)
};
#undef XKS_LIST_ENTRY

static pthread_once_t g_load_once = PTHREAD_ONCE_INIT;
static CK_FUNCTION_LIST_PTR g_real; /* set once, by xks_load() */

/*
 * "<directory of this module's .so>/xksfault.conf" (malloc'd), or NULL when the
 * directory is unknown.  dladdr() names the file this copy was loaded from, so
 * every copy of the .so finds its own configuration.
 */
static char *xks_conf_path(void)
{
    Dl_info info;
    const char *slash;
    size_t dir_len;
    char *path;

    if (dladdr((const void *)&g_list, &info) == 0 || info.dli_fname == NULL)
        return NULL;
    slash = strrchr(info.dli_fname, '/');
    if (slash == NULL)
        return NULL;
    dir_len = (size_t)(slash - info.dli_fname);
    path = malloc(dir_len + 1 + sizeof XKS_CONF_NAME);
    if (path == NULL)
        return NULL;
    memcpy(path, info.dli_fname, dir_len);
    path[dir_len] = '/';
    memcpy(path + dir_len + 1, XKS_CONF_NAME, sizeof XKS_CONF_NAME);
    return path;
}

/* *value* as a path: absolute as it is, relative to the directory of *conf*. */
static char *xks_resolve(const char *conf, const char *value)
{
    const char *slash = strrchr(conf, '/');
    size_t dir_len = slash != NULL ? (size_t)(slash - conf) : 0;
    size_t value_len = strlen(value);
    char *path;

    if (value[0] == '/' || slash == NULL)
        return strdup(value);
    path = malloc(dir_len + 1 + value_len + 1);
    if (path == NULL)
        return NULL;
    memcpy(path, conf, dir_len);
    path[dir_len] = '/';
    memcpy(path + dir_len + 1, value, value_len + 1);
    return path;
}

/* Removes leading and trailing blanks in place. */
static char *xks_trim(char *text)
{
    char *end;

    while (*text != '\0' && xks_is_space(*text))
        text++;
    end = text + strlen(text);
    while (end > text && xks_is_space(end[-1]))
        end--;
    *end = '\0';
    return text;
}

/*
 * Reads the per-copy configuration: "name = value" lines, '#' comments and
 * blank lines; the names are real_module (required) and control.  Returns 1
 * with *real and *control set (malloc'd; *control may stay NULL), or 0 after
 * logging every problem.
 */
static int xks_read_conf(const char *conf, char **real, char **control)
{
    char line[4096];
    unsigned lineno = 0;
    int ok = 1;
    FILE *f = fopen(conf, "re");

    if (f == NULL) {
        xks_log("cannot read %s: %s", conf, strerror(errno));
        return 0;
    }
    while (fgets(line, sizeof line, f) != NULL) {
        char *key;
        char *value;
        char *eq;
        char **target;

        lineno++;
        if (strchr(line, '\n') == NULL && !feof(f)) {
            xks_log("%s:%u: line too long", conf, lineno);
            ok = 0;
            break;
        }
        key = xks_trim(line);
        if (*key == '\0' || *key == '#')
            continue;
        eq = strchr(key, '=');
        if (eq == NULL) {
            xks_log("%s:%u: expected 'name = value'", conf, lineno);
            ok = 0;
            continue;
        }
        *eq = '\0';
        key = xks_trim(key);
        value = xks_trim(eq + 1);
        if (strcmp(key, "real_module") == 0) {
            target = real;
        } else if (strcmp(key, "control") == 0) {
            target = control;
        } else {
            xks_log("%s:%u: unknown setting '%s' (expected real_module or control)", conf,
                    lineno, key);
            ok = 0;
            continue;
        }
        if (*value == '\0') {
            xks_log("%s:%u: '%s' needs a path", conf, lineno, key);
            ok = 0;
            continue;
        }
        free(*target);
        *target = xks_resolve(conf, value);
        if (*target == NULL) {
            xks_log("%s:%u: out of memory", conf, lineno);
            ok = 0;
        }
    }
    fclose(f);
    if (ok && *real == NULL) {
        xks_log("%s: no 'real_module = <path>' line", conf);
        ok = 0;
    }
    return ok;
}

/* dlopen()s the real module at *path* (named in *source*) and keeps its list. */
static void xks_open_real(const char *path, const char *source)
{
    xks_get_function_list_fn get_list;
    CK_FUNCTION_LIST_PTR list = NULL;
    void *handle;
    void *sym;
    CK_RV rv;

    /* Never dlclose()d: the application may hold pointers into it until exit. */
    handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (handle == NULL) {
        xks_log("cannot load the real module %s (from %s): %s", path, source, dlerror());
        return;
    }
    sym = dlsym(handle, "C_GetFunctionList");
    if (sym == NULL) {
        xks_log("%s has no C_GetFunctionList", path);
        return;
    }
    memcpy(&get_list, &sym, sizeof get_list);
    if (get_list == fw_C_GetFunctionList) {
        xks_log("the real module %s (from %s) is this fault-injection module itself", path,
                source);
        return;
    }
    rv = get_list(&list);
    if (rv != CKR_OK || list == NULL) {
        xks_log("C_GetFunctionList of %s failed: 0x%lx", path, (unsigned long)rv);
        return;
    }
    g_real = list;
}

/*
 * Finds the real module and the control file: from xksfault.conf beside this
 * .so if that file exists (even when unusable: then nothing is loaded), else
 * from the environment.
 */
static void xks_load(void)
{
    char *conf = xks_conf_path();
    char *real = NULL;
    char *control = NULL;
    struct stat st;

    if (conf != NULL && (stat(conf, &st) == 0 || errno != ENOENT)) {
        if (xks_read_conf(conf, &real, &control)) {
            g_control_path = control;
            xks_open_real(real, conf);
        } else {
            free(control);
        }
        free(real);
        free(conf);
        return;
    }
    free(conf);

    const char *env_control = getenv("XKS_FAULT_CONTROL");
    const char *env_real = getenv("XKS_FAULT_REAL_MODULE");

    if (env_control != NULL && env_control[0] != '\0') {
        g_control_path = strdup(env_control);
        if (g_control_path == NULL)
            xks_log("out of memory copying XKS_FAULT_CONTROL; faults disabled");
    }
    if (env_real == NULL || env_real[0] == '\0') {
        xks_log("XKS_FAULT_REAL_MODULE is not set (and there is no " XKS_CONF_NAME
                " beside this module): it must name the real PKCS#11 module");
        return;
    }
    xks_open_real(env_real, "XKS_FAULT_REAL_MODULE");
}

/* The real module's function list, loading it on first use; NULL if it failed. */
static CK_FUNCTION_LIST_PTR xks_real(void)
{
    pthread_once(&g_load_once, xks_load);
    return g_real;
}

/* ------------------------------------------------------------------------ */
/* The wrappers, and the exported C_* symbols (aliases of the wrappers)     */
/* ------------------------------------------------------------------------ */

static CK_RV fw_C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR ppFunctionList)
{
    if (ppFunctionList == NULL)
        return CKR_ARGUMENTS_BAD;
    if (xks_real() == NULL)
        return CKR_GENERAL_ERROR;
    *ppFunctionList = &g_list;
    return CKR_OK;
}
XKS_EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR ppFunctionList)
    __attribute__((alias("fw_C_GetFunctionList")));

#define XKS_DEFINE_WRAPPER(name, params, args)                                      \
    static CK_RV fw_##name params                                                   \
    {                                                                               \
        CK_FUNCTION_LIST_PTR real = xks_real();                                     \
        CK_RV rv = CKR_OK;                                                          \
        if (real == NULL)                                                           \
            return CKR_GENERAL_ERROR;                                               \
        if (real->name == NULL)                                                     \
            return CKR_FUNCTION_NOT_SUPPORTED;                                      \
        if (xks_faultable[XKS_FN_##name] && xks_inject(XKS_FN_##name, &rv))         \
            return rv;                                                              \
        return real->name args;                                                     \
    }                                                                               \
    XKS_EXPORT CK_RV name params __attribute__((alias("fw_" #name)));
#define XKS_SKIP(name, params, args)
XKS_PKCS11_FUNCTIONS(XKS_DEFINE_WRAPPER, XKS_SKIP)
#undef XKS_DEFINE_WRAPPER
#undef XKS_SKIP
