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
 * Vendor profiles: the line "profile = <name>" of xksfault.conf (or, without
 * that file, $XKS_FAULT_PROFILE) makes the module behave, for single-part
 * CKM_AES_GCM, as that vendor's PKCS#11 library does: who makes the IV, where
 * it comes back, which parameters are refused, and the code of a failed tag
 * check.  FIPS-mode HSMs generate GCM IVs themselves, each in its own way, and
 * the proxy must be tested against every way on SoftHSM.  The default profile,
 * "softhsm", forwards everything unchanged.  See "Vendor profiles" below and
 * in README.md.
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
_Static_assert(sizeof(CK_GCM_PARAMS) == 6 * sizeof(CK_ULONG),
               "CK_GCM_PARAMS has the v2.40 header's six members, ulIvBits included");

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
/* Vendor profiles: names and per-vendor constants                          */
/* ------------------------------------------------------------------------ */

/*
 * How the module behaves for single-part CKM_AES_GCM (section "Vendor profiles
 * in front of SoftHSM" below; the table is in README.md).  Chosen once per copy
 * of the module, by xks_load().
 */
enum xks_profile {
    XKS_PROFILE_SOFTHSM,            /* SoftHSM itself: everything forwarded unchanged */
    XKS_PROFILE_CLOUDHSM,           /* AWS CloudHSM, client SDK 5 */
    XKS_PROFILE_LUNA_FIPS,          /* Thales Luna 7, FIPS mode, firmware < 7.9.3 */
    XKS_PROFILE_LUNA,               /* Thales Luna, firmware >= 7.9.3, FIPS partition */
    XKS_PROFILE_NSHIELD,            /* Entrust nShield, FIPS 140-3 Security World */
    XKS_PROFILE_PROTECTSERVER_FIPS, /* Thales ProtectServer 3, PTK >= 7.1, FIPS mode */
    XKS_PROFILE_LOST_IV,            /* no vendor: an HSM that loses the IV it made */
    XKS_PROFILE_COUNT
};

/* The names of "profile = <name>"; xksproxy.dev.faultinject.PROFILES lists the same. */
static const char *const xks_profile_names[XKS_PROFILE_COUNT] = {
    [XKS_PROFILE_SOFTHSM] = "softhsm",
    [XKS_PROFILE_CLOUDHSM] = "cloudhsm",
    [XKS_PROFILE_LUNA_FIPS] = "luna-fips",
    [XKS_PROFILE_LUNA] = "luna",
    [XKS_PROFILE_NSHIELD] = "nshield",
    [XKS_PROFILE_PROTECTSERVER_FIPS] = "protectserver-fips",
    [XKS_PROFILE_LOST_IV] = "lost-iv",
};

/* Every name, for error messages. */
#define XKS_PROFILE_LIST \
    "softhsm, cloudhsm, luna-fips, luna, nshield, protectserver-fips or lost-iv"

/*
 * What a GCM C_Decrypt returns in place of SoftHSM's CKR_GENERAL_ERROR when the
 * tag check fails; 0 leaves SoftHSM's code.
 */
static const CK_RV xks_tag_failure_rv[XKS_PROFILE_COUNT] = {
    /* undocumented: the standard's code */
    [XKS_PROFILE_CLOUDHSM] = CKR_ENCRYPTED_DATA_INVALID,
    /* documented by Thales for Luna (it is also the standard's code) */
    [XKS_PROFILE_LUNA_FIPS] = CKR_ENCRYPTED_DATA_INVALID,
    [XKS_PROFILE_LUNA] = CKR_ENCRYPTED_DATA_INVALID,
    /* documented by Entrust: nShield reports a bad tag as a failed function */
    [XKS_PROFILE_NSHIELD] = CKR_FUNCTION_FAILED,
    /* undocumented: the standard's code */
    [XKS_PROFILE_PROTECTSERVER_FIPS] = CKR_ENCRYPTED_DATA_INVALID,
};

static enum xks_profile g_profile; /* set once, by xks_load() */

/* The profile called *name* (exact, case-sensitive); 0 if there is none. */
static int xks_profile_from_name(const char *name, enum xks_profile *out)
{
    int i;

    for (i = 0; i < XKS_PROFILE_COUNT; i++) {
        if (strcmp(name, xks_profile_names[i]) == 0) {
            *out = (enum xks_profile)i;
            return 1;
        }
    }
    return 0;
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
 * What the wrappers forward to, set once by xks_load(): the real module's own
 * list for the "softhsm" profile, else g_profiled, a copy of it in which the
 * profile's functions replace a few entries.  The wrappers apply the control
 * file before forwarding, and the profile's functions call g_real directly,
 * so each call of the application is faulted (or slowed) once, and never the
 * extra calls a profile makes (C_GenerateRandom for an IV, size queries).
 */
static CK_FUNCTION_LIST_PTR g_forward;
static CK_FUNCTION_LIST g_profiled;
/* The token clock's file ("token_clock = <path>"), or NULL: no clock on the token. */
static char *g_clock_path;

static int xks_install_profile(void);

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
 * blank lines; the names are real_module (required), control and profile.
 * Returns 1 with *real and *control set (malloc'd; *control may stay NULL) and
 * *profile set if there is a profile line, or 0 after logging every problem.
 */
static int xks_read_conf(const char *conf, char **real, char **control, char **clock,
                         enum xks_profile *profile)
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
        if (strcmp(key, "profile") == 0) {
            /* A name, not a path. */
            if (!xks_profile_from_name(value, profile)) {
                xks_log("%s:%u: unknown profile '%s' (expected " XKS_PROFILE_LIST ")", conf,
                        lineno, value);
                ok = 0;
            }
            continue;
        }
        if (strcmp(key, "real_module") == 0) {
            target = real;
        } else if (strcmp(key, "control") == 0) {
            target = control;
        } else if (strcmp(key, "token_clock") == 0) {
            target = clock;
        } else {
            xks_log("%s:%u: unknown setting '%s' (expected real_module, control, token_clock "
                    "or profile)",
                    conf, lineno, key);
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
 * Finds the real module, the control file and the profile: from xksfault.conf
 * beside this .so if that file exists (even when unusable: then nothing is
 * loaded), else from the environment.
 */
static void xks_load(void)
{
    char *conf = xks_conf_path();
    char *real = NULL;
    char *control = NULL;
    char *clock = NULL;
    struct stat st;

    if (conf != NULL && (stat(conf, &st) == 0 || errno != ENOENT)) {
        if (xks_read_conf(conf, &real, &control, &clock, &g_profile)) {
            g_control_path = control;
            g_clock_path = clock;
            xks_open_real(real, conf);
        } else {
            free(control);
            free(clock);
        }
        free(real);
        free(conf);
        if (g_real != NULL && !xks_install_profile())
            g_real = NULL;
        return;
    }
    free(conf);

    const char *env_control = getenv("XKS_FAULT_CONTROL");
    const char *env_real = getenv("XKS_FAULT_REAL_MODULE");
    const char *env_profile = getenv("XKS_FAULT_PROFILE");
    const char *env_clock = getenv("XKS_FAULT_TOKEN_CLOCK");

    if (env_profile != NULL && env_profile[0] != '\0' &&
        !xks_profile_from_name(env_profile, &g_profile)) {
        xks_log("XKS_FAULT_PROFILE: unknown profile '%s' (expected " XKS_PROFILE_LIST ")",
                env_profile);
        return;
    }
    if (env_control != NULL && env_control[0] != '\0') {
        g_control_path = strdup(env_control);
        if (g_control_path == NULL)
            xks_log("out of memory copying XKS_FAULT_CONTROL; faults disabled");
    }
    if (env_clock != NULL && env_clock[0] != '\0') {
        g_clock_path = strdup(env_clock);
        if (g_clock_path == NULL)
            xks_log("out of memory copying XKS_FAULT_TOKEN_CLOCK; no token clock");
    }
    if (env_real == NULL || env_real[0] == '\0') {
        xks_log("XKS_FAULT_REAL_MODULE is not set (and there is no " XKS_CONF_NAME
                " beside this module): it must name the real PKCS#11 module");
        return;
    }
    xks_open_real(env_real, "XKS_FAULT_REAL_MODULE");
    if (g_real != NULL && !xks_install_profile())
        g_real = NULL;
}

/*
 * The function list the wrappers forward to (the real module's, or its copy
 * with the profile's functions), loading it on first use; NULL if it failed.
 */
static CK_FUNCTION_LIST_PTR xks_real(void)
{
    pthread_once(&g_load_once, xks_load);
    return g_real != NULL ? g_forward : NULL;
}

/* ------------------------------------------------------------------------ */
/* Vendor profiles in front of SoftHSM (single-part CKM_AES_GCM)            */
/* ------------------------------------------------------------------------ */

/*
 * FIPS-mode HSMs make AES-GCM encryption IVs themselves, and each vendor
 * returns them its own way; SoftHSM takes the caller's IV.  A profile turns
 * SoftHSM into one vendor's module: it checks the CK_GCM_PARAMS as that vendor
 * does, makes the IV with SoftHSM's C_GenerateRandom on the same session,
 * hands SoftHSM a private copy of the parameters carrying that IV (never the
 * caller's structure: the caller's IV is not the one used), and returns the IV
 * where the vendor does.  Refusal codes marked "undocumented" are emulation
 * choices: the vendor documents that the call is refused, not with which code.
 * Every other mechanism, and everything in the "softhsm" profile, is forwarded
 * unchanged.
 *
 * Per-session state (struct xks_op) remembers, between C_EncryptInit and the
 * C_Encrypt that ends the operation, the IV and where it goes; and between
 * C_DecryptInit and C_Decrypt, the code of a failed tag check.
 */

/* Longest IV a profile generates (Luna's 16 bytes). */
#define XKS_GEN_IV_MAX 16UL
/*
 * Not vendor behaviour but the shim's own safety: SoftHSM copies ulIvLen bytes
 * of pIv and ulAADLen bytes of pAAD into buffers it allocates, and exits the
 * process if the allocation fails (it takes any IV length it can allocate).  A
 * profile refuses lengths beyond these (far beyond what any vendor accepts: their
 * IVs are 12 or 16 bytes) with CKR_MECHANISM_PARAM_INVALID, so that no length up
 * to ULONG_MAX can bring the application down.
 */
#define XKS_MAX_IV_LEN 4096UL
#define XKS_MAX_AAD_LEN (16UL * 1024UL * 1024UL)

/* Where the IV made for an encryption goes. */
enum xks_iv_out {
    XKS_IV_NOT_RETURNED, /* lost-iv; and ProtectServer, which wrote it at init */
    XKS_IV_WRITTEN_BACK, /* into the caller's pIv, by the C_Encrypt that returns data */
    XKS_IV_APPENDED      /* after the tag: the output is ciphertext || tag || IV */
};

/* What a profile does with one encryption's IV, decided at C_EncryptInit. */
struct xks_iv_plan {
    CK_ULONG len;         /* length of the IV SoftHSM gets (at most XKS_GEN_IV_MAX) */
    CK_ULONG from_caller; /* its first bytes come from the caller's pIv; the rest is generated */
    enum xks_iv_out out;
    int write_at_init;    /* written into the caller's pIv by C_EncryptInit (ProtectServer) */
};

enum xks_op_kind { XKS_OP_ENCRYPT = 1, XKS_OP_DECRYPT = 2 };

/* One active GCM operation of a profile, on one session. */
struct xks_op {
    struct xks_op *next;
    CK_SESSION_HANDLE session;
    enum xks_op_kind kind;
    unsigned long serial;  /* tells this operation from a later one on the same session */
    enum xks_iv_out out;   /* XKS_OP_ENCRYPT */
    CK_BYTE iv[XKS_GEN_IV_MAX];
    CK_ULONG iv_len;
    CK_BYTE_PTR caller_iv; /* XKS_IV_WRITTEN_BACK: the caller's pIv */
    CK_RV tag_failure_rv;  /* XKS_OP_DECRYPT: replaces CKR_GENERAL_ERROR (0: kept) */
};

/*
 * The active operations, at most one of each kind per session.  The mutex is
 * held only to search and change the list, never while calling SoftHSM: a call
 * works on a copy of its entry and removes it by serial, so that an entry
 * replaced meanwhile (by a new C_EncryptInit) is never removed by mistake.
 */
static pthread_mutex_t g_ops_lock = PTHREAD_MUTEX_INITIALIZER;
static struct xks_op *g_ops;       /* guarded by g_ops_lock */
static unsigned long g_ops_serial; /* guarded by g_ops_lock */

#define XKS_ANY_SERIAL 0UL

/*
 * Removes the entries of *session* (every session if *all*) whose kind is in
 * the mask *kinds* and, unless XKS_ANY_SERIAL, whose serial is *serial*.
 * The caller holds g_ops_lock.
 */
static void xks_ops_remove_locked(int all, CK_SESSION_HANDLE session, unsigned kinds,
                                  unsigned long serial)
{
    struct xks_op **link = &g_ops;

    while (*link != NULL) {
        struct xks_op *op = *link;

        if ((all || op->session == session) && (kinds & (unsigned)op->kind) != 0 &&
            (serial == XKS_ANY_SERIAL || op->serial == serial)) {
            *link = op->next;
            free(op);
        } else {
            link = &op->next;
        }
    }
}

static void xks_ops_remove(int all, CK_SESSION_HANDLE session, unsigned kinds,
                           unsigned long serial)
{
    pthread_mutex_lock(&g_ops_lock);
    xks_ops_remove_locked(all, session, kinds, serial);
    pthread_mutex_unlock(&g_ops_lock);
}

/* Forgets the operation of *kind* on *session*, if any. */
static void xks_op_forget(CK_SESSION_HANDLE session, enum xks_op_kind kind)
{
    xks_ops_remove(0, session, (unsigned)kind, XKS_ANY_SERIAL);
}

/* Forgets *op*, a copy taken by xks_op_find(), unless it was replaced since. */
static void xks_op_end(const struct xks_op *op)
{
    xks_ops_remove(0, op->session, (unsigned)op->kind, op->serial);
}

/* Makes *op* (malloc'd, filled in) the active operation of its kind on its session. */
static void xks_op_insert(struct xks_op *op)
{
    pthread_mutex_lock(&g_ops_lock);
    xks_ops_remove_locked(0, op->session, (unsigned)op->kind, XKS_ANY_SERIAL);
    op->serial = ++g_ops_serial;
    if (op->serial == XKS_ANY_SERIAL)
        op->serial = ++g_ops_serial; /* after a wrap-around: 0 means "any" */
    op->next = g_ops;
    g_ops = op;
    pthread_mutex_unlock(&g_ops_lock);
}

/* Copies the operation of *kind* on *session* into *out*; 0 if there is none. */
static int xks_op_find(CK_SESSION_HANDLE session, enum xks_op_kind kind, struct xks_op *out)
{
    struct xks_op *op;
    int found = 0;

    pthread_mutex_lock(&g_ops_lock);
    for (op = g_ops; op != NULL; op = op->next) {
        if (op->session == session && op->kind == kind) {
            *out = *op;
            out->next = NULL;
            found = 1;
            break;
        }
    }
    pthread_mutex_unlock(&g_ops_lock);
    return found;
}

/*
 * Forgets the operations of sessions that no longer exist (after
 * C_CloseAllSessions, which names a slot, not sessions): a session SoftHSM no
 * longer knows has no operation.
 */
static void xks_ops_prune_closed(void)
{
    CK_SESSION_HANDLE *handles;
    size_t count = 0;
    size_t i;
    struct xks_op *op;

    pthread_mutex_lock(&g_ops_lock);
    for (op = g_ops; op != NULL; op = op->next)
        count++;
    handles = count > 0 ? calloc(count, sizeof *handles) : NULL;
    if (handles != NULL) {
        i = 0;
        for (op = g_ops; op != NULL; op = op->next)
            handles[i++] = op->session;
    }
    pthread_mutex_unlock(&g_ops_lock);
    if (handles == NULL) {
        if (count > 0) /* out of memory: forgetting too much beats keeping stale pointers */
            xks_ops_remove(1, 0, XKS_OP_ENCRYPT | XKS_OP_DECRYPT, XKS_ANY_SERIAL);
        return;
    }
    for (i = 0; i < count; i++) {
        CK_SESSION_INFO info;
        CK_RV rv = g_real->C_GetSessionInfo(handles[i], &info);

        if (rv == CKR_SESSION_HANDLE_INVALID || rv == CKR_SESSION_CLOSED ||
            rv == CKR_CRYPTOKI_NOT_INITIALIZED)
            xks_ops_remove(0, handles[i], XKS_OP_ENCRYPT | XKS_OP_DECRYPT, XKS_ANY_SERIAL);
    }
    free(handles);
}

/*
 * PKCS#11 says that a C_Encrypt or C_Decrypt ends the operation unless it
 * answers a size query (no output buffer, CKR_OK) or returns
 * CKR_BUFFER_TOO_SMALL.
 */
static int xks_operation_continues(CK_RV rv, const CK_BYTE *output)
{
    return (rv == CKR_OK && output == NULL) || rv == CKR_BUFFER_TOO_SMALL;
}

/*
 * Ends SoftHSM's active encryption (decryption) on *session*.  PKCS#11 v2.40
 * has no way to cancel an operation, but a completed C_Encrypt (C_Decrypt)
 * ends it: encrypt (decrypt) an empty message into a private buffer, big enough
 * for a GCM tag alone, and drop the result.  Used where a vendor module, per
 * the standard, ends the operation although SoftHSM would not (a NULL argument
 * to C_Encrypt), or where the shim refuses what SoftHSM accepted.
 */
static void xks_abort_encrypt(CK_SESSION_HANDLE session)
{
    CK_BYTE in[1] = {0};
    CK_BYTE out[64];
    CK_ULONG out_len = sizeof out;

    (void)g_real->C_Encrypt(session, in, 0, out, &out_len);
}

static void xks_abort_decrypt(CK_SESSION_HANDLE session)
{
    CK_BYTE in[1] = {0};
    CK_BYTE out[64];
    CK_ULONG out_len = sizeof out;

    (void)g_real->C_Decrypt(session, in, 0, out, &out_len);
}

static int xks_all_zero(const CK_BYTE *bytes, CK_ULONG len)
{
    CK_ULONG i;

    for (i = 0; i < len; i++) {
        if (bytes[i] != 0)
            return 0;
    }
    return 1;
}

/* ulIvBits == ulIvLen * 8, without overflowing. */
static int xks_iv_bits_match(const CK_GCM_PARAMS *params)
{
    return params->ulIvLen <= ULONG_MAX / 8 && params->ulIvBits == params->ulIvLen * 8;
}

/*
 * CloudHSM's IV length: "either field may carry the length", ulIvLen first,
 * else ulIvBits (whole bytes only); 0 when neither does.
 */
static CK_ULONG xks_either_iv_len(const CK_GCM_PARAMS *params)
{
    if (params->ulIvLen != 0)
        return params->ulIvLen;
    if (params->ulIvBits % 8 != 0)
        return 0;
    return params->ulIvBits / 8;
}

/*
 * The checks every profile makes on a GCM mechanism, for encryption and
 * decryption alike; on success *params* is a private copy of the caller's
 * CK_GCM_PARAMS (copied, so that an unaligned pParameter is read safely and the
 * caller's structure is never modified).
 */
static CK_RV xks_gcm_params(const CK_MECHANISM *mechanism, CK_GCM_PARAMS *params)
{
    if (mechanism->pParameter == NULL || mechanism->ulParameterLen != sizeof(CK_GCM_PARAMS))
        return CKR_MECHANISM_PARAM_INVALID;
    memcpy(params, mechanism->pParameter, sizeof *params);
    /* The shim's own safety (see XKS_MAX_AAD_LEN): SoftHSM would copy from pAAD. */
    if (params->ulAADLen > XKS_MAX_AAD_LEN || (params->pAAD == NULL && params->ulAADLen != 0))
        return CKR_MECHANISM_PARAM_INVALID;
    return CKR_OK;
}

/*
 * What the profile does with the IV of an encryption with *params*, or why it
 * refuses them.  Every refusal is CKR_MECHANISM_PARAM_INVALID: the vendors
 * document (or are reported) to refuse these parameters, none documents the
 * code.
 */
static CK_RV xks_plan_encrypt_iv(const CK_GCM_PARAMS *params, struct xks_iv_plan *plan)
{
    CK_ULONG len;

    memset(plan, 0, sizeof *plan);
    switch (g_profile) {
    case XKS_PROFILE_CLOUDHSM:
    case XKS_PROFILE_NSHIELD:
        /*
         * CloudHSM: the HSM always makes a 12-byte IV and writes it into the
         * caller's pIv, which must hold 12 zero bytes (a non-zero IV, and
         * ulIvLen = ulIvBits = 0, are refused; code undocumented).  nShield in
         * a FIPS 140-3 Security World: undocumented; the AWS reference proxy
         * treats it exactly like CloudHSM, and so does this profile.
         */
        len = xks_either_iv_len(params);
        if (len != 12 || params->pIv == NULL || !xks_all_zero(params->pIv, len))
            return CKR_MECHANISM_PARAM_INVALID;
        plan->len = 12;
        plan->out = XKS_IV_WRITTEN_BACK;
        return CKR_OK;
    case XKS_PROFILE_LUNA_FIPS:
        /*
         * Luna 7 in FIPS mode before firmware 7.9.3: pIv is ignored (it may be
         * NULL; silently replacing a caller's IV is undocumented), the HSM
         * makes a 16-byte IV and appends it after the tag.  ulIvBits must be
         * ulIvLen * 8 (code undocumented).
         */
        if (!xks_iv_bits_match(params))
            return CKR_MECHANISM_PARAM_INVALID;
        plan->len = 16;
        plan->out = XKS_IV_APPENDED;
        return CKR_OK;
    case XKS_PROFILE_LUNA:
        /*
         * Luna firmware >= 7.9.3: (ulIvLen, ulIvBits) selects the behaviour.
         * (0, 0) and (0, 128): a 16-byte IV is made; (0, 96): a 12-byte IV;
         * (16, 96): the caller's first 4 bytes and 12 made ones.  (12, 96) and
         * (16, 128) use the caller's IV, which only a non-FIPS partition
         * allows: refused here, as on the FIPS partition this profile is.
         * Anything else is not in the table (code undocumented).
         */
        if (params->ulIvLen == 0 && (params->ulIvBits == 0 || params->ulIvBits == 128)) {
            plan->len = 16;
        } else if (params->ulIvLen == 0 && params->ulIvBits == 96) {
            plan->len = 12;
        } else if (params->ulIvLen == 16 && params->ulIvBits == 96 && params->pIv != NULL) {
            plan->len = 16;
            plan->from_caller = 4;
        } else {
            return CKR_MECHANISM_PARAM_INVALID;
        }
        plan->out = XKS_IV_APPENDED;
        return CKR_OK;
    case XKS_PROFILE_PROTECTSERVER_FIPS:
        /*
         * ProtectServer 3 (PTK >= 7.1) in FIPS mode: "user specified IV not
         * allowed"; an all-zero IV asks the HSM to make one, of ulIvLen bytes
         * (12 or 16 here), and a NULL pIv is an error.  That the IV is written
         * into pIv by C_EncryptInit is inferred from the documentation, not
         * stated by it.  Codes undocumented; ulIvBits is not looked at.
         */
        if (params->pIv == NULL || (params->ulIvLen != 12 && params->ulIvLen != 16) ||
            !xks_all_zero(params->pIv, params->ulIvLen))
            return CKR_MECHANISM_PARAM_INVALID;
        plan->len = params->ulIvLen;
        plan->out = XKS_IV_NOT_RETURNED;
        plan->write_at_init = 1;
        return CKR_OK;
    case XKS_PROFILE_LOST_IV:
        /* Not a vendor: makes its own 12-byte IV and tells nobody. */
        plan->len = 12;
        plan->out = XKS_IV_NOT_RETURNED;
        return CKR_OK;
    case XKS_PROFILE_SOFTHSM:
    case XKS_PROFILE_COUNT:
    default:
        break;
    }
    return CKR_GENERAL_ERROR; /* not reached: the "softhsm" profile has no hooks */
}

/*
 * The profile's checks of a decryption's IV, which is the caller's in every
 * profile; may adjust the private *params* that SoftHSM gets.
 */
static CK_RV xks_check_decrypt_iv(CK_GCM_PARAMS *params)
{
    CK_ULONG len;

    switch (g_profile) {
    case XKS_PROFILE_CLOUDHSM:
        /*
         * The IV length, carried by either field as for encryption, must be 12:
         * CloudHSM only makes 12-byte IVs (refusing others is undocumented).
         * SoftHSM reads ulIvLen alone, so its copy gets both fields set.
         */
        len = xks_either_iv_len(params);
        if (len != 12)
            return CKR_MECHANISM_PARAM_INVALID;
        params->ulIvLen = 12;
        params->ulIvBits = 96;
        break;
    case XKS_PROFILE_LUNA_FIPS:
    case XKS_PROFILE_LUNA:
        /* Luna: ulIvBits must be ulIvLen * 8 (code undocumented). */
        if (!xks_iv_bits_match(params))
            return CKR_MECHANISM_PARAM_INVALID;
        break;
    case XKS_PROFILE_NSHIELD:
    case XKS_PROFILE_PROTECTSERVER_FIPS:
    case XKS_PROFILE_LOST_IV:
    case XKS_PROFILE_SOFTHSM:
    case XKS_PROFILE_COUNT:
    default:
        break;
    }
    /* The shim's own safety (see XKS_MAX_IV_LEN): SoftHSM would copy from pIv. */
    if (params->ulIvLen > XKS_MAX_IV_LEN || (params->pIv == NULL && params->ulIvLen != 0))
        return CKR_MECHANISM_PARAM_INVALID;
    return CKR_OK;
}

static int xks_is_gcm(const CK_MECHANISM *mechanism)
{
    return mechanism != NULL && mechanism->mechanism == CKM_AES_GCM;
}

/*
 * After a C_EncryptInit / C_DecryptInit of SoftHSM that returned *rv*, the
 * previous operation of that kind is over, unless SoftHSM refused because it
 * is still active.
 */
static void xks_op_forget_unless_active(CK_SESSION_HANDLE session, enum xks_op_kind kind,
                                        CK_RV rv)
{
    if (rv != CKR_OPERATION_ACTIVE)
        xks_op_forget(session, kind);
}

static CK_RV xp_C_EncryptInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                              CK_OBJECT_HANDLE hKey)
{
    CK_GCM_PARAMS params;
    CK_MECHANISM mechanism;
    struct xks_iv_plan plan;
    struct xks_op *op;
    CK_BYTE_PTR caller_iv;
    CK_RV rv;

    if (!xks_is_gcm(pMechanism)) {
        rv = g_real->C_EncryptInit(hSession, pMechanism, hKey);
        xks_op_forget_unless_active(hSession, XKS_OP_ENCRYPT, rv);
        return rv;
    }
    rv = xks_gcm_params(pMechanism, &params);
    if (rv == CKR_OK)
        rv = xks_plan_encrypt_iv(&params, &plan);
    if (rv != CKR_OK) {
        xks_op_forget(hSession, XKS_OP_ENCRYPT);
        return rv;
    }
    /* Allocated before SoftHSM starts the operation, which could not be undone. */
    op = calloc(1, sizeof *op);
    if (op == NULL)
        return CKR_HOST_MEMORY;
    caller_iv = params.pIv;
    if (plan.from_caller > 0)
        memcpy(op->iv, caller_iv, plan.from_caller);
    /* The HSM's own RNG makes the IV: an internal call, never faulted. */
    rv = g_real->C_GenerateRandom(hSession, op->iv + plan.from_caller,
                                  plan.len - plan.from_caller);
    if (rv != CKR_OK) {
        free(op);
        xks_op_forget(hSession, XKS_OP_ENCRYPT);
        return rv;
    }
    params.pIv = op->iv;
    params.ulIvLen = plan.len;
    params.ulIvBits = plan.len * 8;
    mechanism.mechanism = CKM_AES_GCM;
    mechanism.pParameter = &params;
    mechanism.ulParameterLen = sizeof params;
    rv = g_real->C_EncryptInit(hSession, &mechanism, hKey);
    if (rv != CKR_OK) {
        free(op);
        xks_op_forget_unless_active(hSession, XKS_OP_ENCRYPT, rv);
        return rv;
    }
    if (plan.write_at_init)
        memcpy(caller_iv, op->iv, plan.len);
    op->session = hSession;
    op->kind = XKS_OP_ENCRYPT;
    op->out = plan.out;
    op->iv_len = plan.len;
    op->caller_iv = plan.out == XKS_IV_WRITTEN_BACK ? caller_iv : NULL;
    xks_op_insert(op);
    return CKR_OK;
}

/*
 * C_Encrypt of an operation whose IV goes after the tag: SoftHSM's output
 * (ciphertext || tag), then the IV.  Size queries and CKR_BUFFER_TOO_SMALL
 * count the IV, and leave the operation active, as PKCS#11 requires.
 */
static CK_RV xks_encrypt_appending(const struct xks_op *op, CK_BYTE_PTR pData,
                                   CK_ULONG ulDataLen, CK_BYTE_PTR pEncryptedData,
                                   CK_ULONG_PTR pulEncryptedDataLen)
{
    CK_ULONG inner = 0;
    CK_ULONG total;
    CK_ULONG written;
    CK_RV rv;

    /* SoftHSM's own length, asked without the caller's buffer: an internal call. */
    rv = g_real->C_Encrypt(op->session, pData, ulDataLen, NULL, &inner);
    if (rv != CKR_OK)
        return rv;
    if (inner > ULONG_MAX - op->iv_len) {
        xks_abort_encrypt(op->session);
        return CKR_DATA_LEN_RANGE;
    }
    total = inner + op->iv_len;
    if (pEncryptedData == NULL) {
        *pulEncryptedDataLen = total;
        return CKR_OK;
    }
    if (*pulEncryptedDataLen < total) {
        *pulEncryptedDataLen = total;
        return CKR_BUFFER_TOO_SMALL;
    }
    /* Only the room before the IV: SoftHSM never writes where the IV goes. */
    written = inner;
    rv = g_real->C_Encrypt(op->session, pData, ulDataLen, pEncryptedData, &written);
    if (rv == CKR_BUFFER_TOO_SMALL) { /* SoftHSM changed its mind about the length */
        *pulEncryptedDataLen = written <= ULONG_MAX - op->iv_len ? written + op->iv_len
                                                                 : ULONG_MAX;
        return rv;
    }
    if (rv != CKR_OK)
        return rv;
    if (written > inner) { /* cannot happen: SoftHSM wrote past the room it was given */
        xks_log("SoftHSM's C_Encrypt wrote %lu bytes into %lu", (unsigned long)written,
                (unsigned long)inner);
        return CKR_GENERAL_ERROR;
    }
    memcpy(pEncryptedData + written, op->iv, op->iv_len);
    *pulEncryptedDataLen = written + op->iv_len;
    return CKR_OK;
}

static CK_RV xp_C_Encrypt(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen,
                          CK_BYTE_PTR pEncryptedData, CK_ULONG_PTR pulEncryptedDataLen)
{
    struct xks_op op;
    CK_RV rv;

    if (!xks_op_find(hSession, XKS_OP_ENCRYPT, &op))
        return g_real->C_Encrypt(hSession, pData, ulDataLen, pEncryptedData,
                                 pulEncryptedDataLen);
    if (pData == NULL || pulEncryptedDataLen == NULL) {
        /* SoftHSM would return this and keep its operation; PKCS#11 ends it. */
        xks_abort_encrypt(hSession);
        xks_op_end(&op);
        return CKR_ARGUMENTS_BAD;
    }
    if (op.out == XKS_IV_APPENDED) {
        rv = xks_encrypt_appending(&op, pData, ulDataLen, pEncryptedData, pulEncryptedDataLen);
    } else {
        rv = g_real->C_Encrypt(hSession, pData, ulDataLen, pEncryptedData, pulEncryptedDataLen);
        /* CloudHSM returns the IV with the data, not with a size query. */
        if (rv == CKR_OK && pEncryptedData != NULL && op.out == XKS_IV_WRITTEN_BACK)
            memcpy(op.caller_iv, op.iv, op.iv_len);
    }
    if (!xks_operation_continues(rv, pEncryptedData))
        xks_op_end(&op);
    return rv;
}

static CK_RV xp_C_DecryptInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                              CK_OBJECT_HANDLE hKey)
{
    CK_GCM_PARAMS params;
    CK_MECHANISM mechanism;
    struct xks_op *op = NULL;
    CK_RV rv;

    if (!xks_is_gcm(pMechanism)) {
        rv = g_real->C_DecryptInit(hSession, pMechanism, hKey);
        xks_op_forget_unless_active(hSession, XKS_OP_DECRYPT, rv);
        return rv;
    }
    rv = xks_gcm_params(pMechanism, &params);
    if (rv == CKR_OK)
        rv = xks_check_decrypt_iv(&params);
    if (rv != CKR_OK) {
        xks_op_forget(hSession, XKS_OP_DECRYPT);
        return rv;
    }
    if (xks_tag_failure_rv[g_profile] != 0) {
        op = calloc(1, sizeof *op);
        if (op == NULL)
            return CKR_HOST_MEMORY;
    }
    mechanism.mechanism = CKM_AES_GCM;
    mechanism.pParameter = &params;
    mechanism.ulParameterLen = sizeof params;
    rv = g_real->C_DecryptInit(hSession, &mechanism, hKey);
    if (rv != CKR_OK || op == NULL) {
        free(op);
        xks_op_forget_unless_active(hSession, XKS_OP_DECRYPT, rv);
        return rv;
    }
    op->session = hSession;
    op->kind = XKS_OP_DECRYPT;
    op->tag_failure_rv = xks_tag_failure_rv[g_profile];
    xks_op_insert(op);
    return CKR_OK;
}

static CK_RV xp_C_Decrypt(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedData,
                          CK_ULONG ulEncryptedDataLen, CK_BYTE_PTR pData,
                          CK_ULONG_PTR pulDataLen)
{
    struct xks_op op;
    CK_RV rv;

    if (!xks_op_find(hSession, XKS_OP_DECRYPT, &op))
        return g_real->C_Decrypt(hSession, pEncryptedData, ulEncryptedDataLen, pData,
                                 pulDataLen);
    if (pEncryptedData == NULL || pulDataLen == NULL) {
        /* SoftHSM would return this and keep its operation; PKCS#11 ends it. */
        xks_abort_decrypt(hSession);
        xks_op_end(&op);
        return CKR_ARGUMENTS_BAD;
    }
    rv = g_real->C_Decrypt(hSession, pEncryptedData, ulEncryptedDataLen, pData, pulDataLen);
    /* SoftHSM's answer to a failed tag check (its GCM decryption has no other failure). */
    if (rv == CKR_GENERAL_ERROR)
        rv = op.tag_failure_rv;
    if (!xks_operation_continues(rv, pData))
        xks_op_end(&op);
    return rv;
}

static CK_RV xp_C_CloseSession(CK_SESSION_HANDLE hSession)
{
    CK_RV rv = g_real->C_CloseSession(hSession);

    if (rv == CKR_OK || rv == CKR_SESSION_HANDLE_INVALID || rv == CKR_SESSION_CLOSED)
        xks_ops_remove(0, hSession, XKS_OP_ENCRYPT | XKS_OP_DECRYPT, XKS_ANY_SERIAL);
    return rv;
}

static CK_RV xp_C_CloseAllSessions(CK_SLOT_ID slotID)
{
    CK_RV rv = g_real->C_CloseAllSessions(slotID);

    if (rv == CKR_OK)
        xks_ops_prune_closed();
    return rv;
}

static CK_RV xp_C_Finalize(CK_VOID_PTR pReserved)
{
    CK_RV rv = g_real->C_Finalize(pReserved);

    /* Every session is gone (or there were none). */
    if (rv == CKR_OK || rv == CKR_CRYPTOKI_NOT_INITIALIZED)
        xks_ops_remove(1, 0, XKS_OP_ENCRYPT | XKS_OP_DECRYPT, XKS_ANY_SERIAL);
    return rv;
}

/*
 * The token clock: with "token_clock = <path>", C_GetTokenInfo reports
 * CKF_CLOCK_ON_TOKEN and a utcTime of this host's clock plus the offset in that
 * file (one signed number of seconds, e.g. "-600" or "691200"; no file or an
 * unreadable one: 0), read at each call.  The file "off" reports no clock.
 * So a test can give an HSM a clock of its own, as Luna and nShield tokens
 * have, and move it.
 */
static CK_RV xp_C_GetTokenInfo(CK_SLOT_ID slotID, CK_TOKEN_INFO_PTR pInfo)
{
    CK_RV rv = g_real->C_GetTokenInfo(slotID, pInfo);
    char text[64] = "";
    char stamp[32];
    long offset = 0;
    time_t when;
    struct tm tm;
    FILE *f;

    if (rv != CKR_OK || pInfo == NULL)
        return rv;
    f = fopen(g_clock_path, "re");
    if (f != NULL) {
        if (fgets(text, sizeof text, f) == NULL)
            text[0] = '\0';
        fclose(f);
    }
    if (strncmp(xks_trim(text), "off", 3) == 0)
        return rv;
    offset = strtol(text, NULL, 10);
    when = time(NULL) + (time_t)offset;
    if (gmtime_r(&when, &tm) == NULL || strftime(stamp, sizeof stamp, "%Y%m%d%H%M%S00", &tm) != 16)
        return rv;
    memcpy(pInfo->utcTime, stamp, sizeof pInfo->utcTime);
    pInfo->flags |= CKF_CLOCK_ON_TOKEN;
    return rv;
}

/*
 * Points g_forward at the list the wrappers forward to: the real module's for
 * "softhsm", else a copy in which the profile's functions replace those that
 * start, do and end GCM operations and those that end sessions.  Returns 0,
 * after logging, if the real module lacks a function a profile needs.
 */
static int xks_install_profile(void)
{
    g_profiled = *g_real;
    if (g_clock_path != NULL) {
        if (g_real->C_GetTokenInfo == NULL) {
            xks_log("token_clock needs C_GetTokenInfo, which the real module does not have");
            return 0;
        }
        g_profiled.C_GetTokenInfo = xp_C_GetTokenInfo;
    }
    if (g_profile == XKS_PROFILE_SOFTHSM) {
        g_forward = g_clock_path != NULL ? &g_profiled : g_real;
        return 1;
    }
    if (g_real->C_Finalize == NULL || g_real->C_CloseSession == NULL ||
        g_real->C_CloseAllSessions == NULL || g_real->C_GetSessionInfo == NULL ||
        g_real->C_EncryptInit == NULL || g_real->C_Encrypt == NULL ||
        g_real->C_DecryptInit == NULL || g_real->C_Decrypt == NULL ||
        g_real->C_GenerateRandom == NULL) {
        xks_log("profile '%s' needs C_Finalize, C_CloseSession, C_CloseAllSessions, "
                "C_GetSessionInfo, C_EncryptInit, C_Encrypt, C_DecryptInit, C_Decrypt and "
                "C_GenerateRandom, which the real module does not all have",
                xks_profile_names[g_profile]);
        return 0;
    }
    g_profiled.C_Finalize = xp_C_Finalize;
    g_profiled.C_CloseSession = xp_C_CloseSession;
    g_profiled.C_CloseAllSessions = xp_C_CloseAllSessions;
    g_profiled.C_EncryptInit = xp_C_EncryptInit;
    g_profiled.C_Encrypt = xp_C_Encrypt;
    g_profiled.C_DecryptInit = xp_C_DecryptInit;
    g_profiled.C_Decrypt = xp_C_Decrypt;
    g_forward = &g_profiled;
    return 1;
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
